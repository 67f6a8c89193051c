"""Every Hugging Face Hub interaction: downloads into the Hub cache, loading HF objects by folder
or Hub id, uploads, and the errors that say how to work offline.

Before the first request of a process the Hub endpoint is probed once (a HEAD request with a
3-second timeout, through the usual proxy settings). Offline (``HF_HUB_OFFLINE=1`` or
``offline=True``) or when the probe fails, only the local Hub cache is used, so a missing file fails
within a few seconds instead of after the client's retries, with a :class:`HubError` that names
``HF_HUB_OFFLINE`` and the local alternatives. This holds for every kind of Hub id: checkpoints,
encoder pickles, tokenizers, encoders, judges and datasets.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .errors import ElflmError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)*")  # legacy ids (t5-small), org/repo, org/repo/file
PROBE_TIMEOUT = 3.0  # seconds for the one reachability probe of the endpoint
_OFFLINE_WHY = "offline mode is on (HF_HUB_OFFLINE=1)"


class HubError(ElflmError, OSError):
    """A Hub repository or file could not be had, or a Hugging Face folder (local or downloaded)
    could not be loaded; the message says why and how to go on (e.g. how to work offline)."""


def is_hub_id(name) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_REPO_ID.fullmatch(str(name))) and not Path(name).exists()


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it has the form ``org/name``, else a ``ValueError`` saying so."""
    if not _REPO_ID.fullmatch(str(repo_id)):
        raise ValueError(f"repository id {repo_id!r}: expected the form 'org/name' (a Hub user or organisation / name)")
    return str(repo_id)


def is_hub_file(name) -> bool:
    """``org/name/path/in/repo`` (a file of a Hub repository) that is not an existing local path."""
    text = str(name)
    return text.count("/") >= 2 and bool(_NAME.fullmatch(text)) and not Path(text).exists()


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else ``HF_HUB_OFFLINE`` as it is set now (huggingface_hub reads it
    once, when first imported)."""
    if offline is not None:
        return offline
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if env is None else env.strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    """The Hub endpoint: ``$HF_ENDPOINT`` or huggingface_hub's default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


@functools.lru_cache(maxsize=8)
def _probe(url: str) -> str | None:
    """None when ``url`` answers (any HTTP status), else why not; asked once per process."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"the Hub ({url}) cannot be reached: {type(reason).__name__}: {reason}"
    return None


def unavailable(offline: bool | None = None) -> str | None:
    """Why the Hub cannot be used now (offline mode, or the endpoint does not answer), or None."""
    return _OFFLINE_WHY if is_offline(offline) else _probe(endpoint())


def cache_root() -> Path:
    """Where elflm keeps what it derives from Hub downloads (converted checkpoints, prepared
    datasets): ``$ELFLM_CACHE`` or ``~/.cache/elflm``."""
    return Path(os.environ.get("ELFLM_CACHE") or Path.home() / ".cache" / "elflm")


def _hub_cache(cache_dir) -> str | None:
    return str(cache_dir) if cache_dir else os.environ.get("HF_HUB_CACHE")


def offline_error(what: str, why: str, cache_dir=None, repo: str | None = None) -> HubError:
    """The error for ``what`` (a Hub id, ``repo:file`` or a description) that could not be had
    because of ``why``: names HF_HUB_OFFLINE, the cache and the local alternatives; ``repo`` (what
    to download, default ``what``) goes into the ``hf download`` hint."""
    from huggingface_hub import constants

    cache = _hub_cache(cache_dir) or constants.HF_HUB_CACHE
    repo = repo or what
    return HubError(
        f"cannot get {what} from the Hugging Face Hub: {why}, and it is not in the local cache {cache}. "
        "Either connect to the internet and retry; or download it once on a connected machine "
        f"(`hf download {repo.split(':')[0]}`), point HF_HUB_CACHE (or HF_HOME) at that cache and set "
        "HF_HUB_OFFLINE=1; or pass a local path instead of a Hub id: a local folder or file (a folder written "
        "by `elflm convert` / save_pretrained, an official checkpoint, a tokenizer / encoder / judge folder)."
    )


def download(
    repo_id: str,
    filename: str | None = None,
    *,
    revision: str | None = None,
    cache_dir=None,
    offline: bool | None = None,
    ignore_patterns: list[str] | None = None,
    repo_type: str = "model",
) -> Path:
    """Snapshot folder of a Hub repository (or one ``filename`` in it), cached by
    huggingface_hub; ``ignore_patterns`` leaves files out of a snapshot. Without the Hub (see
    :func:`unavailable`) only the cache is used, and a miss fails at once with a :class:`HubError`."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    why = unavailable(offline)
    kw = dict(revision=revision, cache_dir=_hub_cache(cache_dir), local_files_only=why is not None, etag_timeout=10)
    what = f"{repo_id}:{filename}" if filename else repo_id
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, **kw))
        return Path(snapshot_download(repo_id, repo_type=repo_type, ignore_patterns=ignore_patterns, **kw))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise HubError(f"{what}: not found on the Hugging Face Hub or not accessible ({type(e).__name__}: {e})") from e
    except (LocalEntryNotFoundError, OSError) as e:  # not in the cache offline; connection errors of the HTTP client
        cause = e.__cause__ or e.__context__ or e
        raise offline_error(what, why or f"the Hub failed ({type(cause).__name__}: {cause})", cache_dir) from e


def _is_local(name) -> bool:
    return Path(str(name)).expanduser().exists()


def _check_name(name, what: str) -> None:
    s = str(name)
    if not _is_local(s) and (s.startswith(("/", ".", "~")) or not _NAME.fullmatch(s)):
        raise FileNotFoundError(f"{what} {s!r} not found: no such local file or folder, and not a Hub id")


def resolve_file(path, what: str, *, cache_dir=None, offline: bool | None = None) -> Path:
    """A local file, or a Hub file ``org/repo/sub/path`` downloaded into the Hub cache."""
    _check_name(path, what)
    if _is_local(path):
        return Path(str(path)).expanduser()
    parts = str(path).split("/")
    if len(parts) < 3:
        raise FileNotFoundError(f"{what} {str(path)!r} not found: expected a local file or a Hub file 'org/repo/file'")
    return download("/".join(parts[:2]), "/".join(parts[2:]), cache_dir=cache_dir, offline=offline)


def load_hf(load: Callable, name_or_path, what: str):
    """``load(name_or_path, local_files_only=..., trust_remote_code=False)`` (an HF
    ``from_pretrained``) for a local folder or a Hub id: code shipped with a folder is never run
    (and never asked about). Without the Hub (:func:`unavailable`) only the cache is asked; a
    missing repository becomes a :class:`HubError` that says how to work offline, and any other
    failure (a damaged folder, a pickle that ``torch.load(weights_only=True)`` refuses, custom code)
    a :class:`HubError` naming the folder or id."""
    _check_name(name_or_path, what)
    local = _is_local(name_or_path)
    name = str(Path(str(name_or_path)).expanduser()) if local else str(name_or_path)
    why = None if local else unavailable()
    try:
        return load(name, local_files_only=local or why is not None, trust_remote_code=False)
    except OSError as e:
        if local:
            raise HubError(f"cannot load the {what} from {name}: {_load_failure(e)}") from e
        why = why or f"the Hub did not provide it ({type(e).__name__}: {e})"
        raise offline_error(f"the {what} {name!r}", why, repo=name) from e
    except Exception as e:  # transformers raises many types for a folder it cannot load
        raise HubError(f"cannot load the {what} from {name}: {_load_failure(e)}") from e


def _load_failure(e: Exception) -> str:
    """Why an HF folder did not load, in one phrase with what to do."""
    text = " ".join(str(e).split())
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
        return (
            "its weights are a pickle that torch.load(weights_only=True) refuses (unpickling it could run code); "
            "convert them to safetensors with a tool you trust, or use another copy of the model"
        )
    if "trust_remote_code" in text or "custom code" in text:
        return (
            "it needs its own Python code to load (auto_map), which elflm never runs (trust_remote_code=False); "
            "use a model whose type transformers knows"
        )
    return f"{type(e).__name__}: {text[:300]}{'…' if len(text) > 300 else ''}"


def require_hub(what: str, later: str | None = None) -> None:
    """Fail at once with a :class:`HubError` when the Hub cannot be used (:func:`unavailable`)
    for ``what`` (e.g. an upload), saying how to go on (``later``)."""
    why = unavailable()
    if why is not None:
        later = later or "save it to a folder (save_pretrained) and run `elflm push FOLDER REPO_ID` when online"
        raise HubError(f"cannot {what}: {why}; {later}")


def upload_folder(
    folder, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str = "Upload ELF model"
) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if needed); returns the
    commit URL. Credentials: ``token`` or the saved login. Without the Hub it fails at once with a
    :class:`HubError` that says how to upload later."""
    from huggingface_hub import HfApi

    later = f"the folder is ready at {folder}; upload it later with `elflm push {folder} {repo_id}`"
    require_hub(f"upload to the Hugging Face Hub repository {repo_id}", later)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message
        )
    except Exception as e:  # HTTP, authentication and connection errors of the client
        raise HubError(
            f"uploading to the Hugging Face Hub repository {repo_id} failed ({type(e).__name__}: {e}); "
            f"log in with `hf auth login` or pass a token; {later}"
        ) from e
    return str(getattr(info, "commit_url", info))
