"""Every Hugging Face Hub interaction: downloads into the Hub cache, loading HF objects by folder
or Hub id, uploads, and the errors that say how to work offline.

Offline (``HF_HUB_OFFLINE=1`` or ``offline=True``) only the local Hub cache is used, and a missing
file fails at once instead of waiting for the network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)*")  # legacy ids (t5-small), org/repo, org/repo/file


class HubError(OSError):
    """A Hub repository or file could not be had; the message says why and how to work offline."""


def is_hub_id(name) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_REPO_ID.fullmatch(str(name))) and not Path(name).exists()


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else whether ``HF_HUB_OFFLINE`` is set."""
    if offline is not None:
        return offline
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """Where Hub checkpoints converted to our format are kept: ``$ELFLM_CACHE`` or ``~/.cache/elflm``."""
    return Path(os.environ.get("ELFLM_CACHE") or Path.home() / ".cache" / "elflm")


def _hub_cache(cache_dir) -> str | None:
    return str(cache_dir) if cache_dir else os.environ.get("HF_HUB_CACHE")


def _unreachable(what: str, offline: bool, cache_dir, err: Exception) -> HubError:
    from huggingface_hub import constants

    cache = _hub_cache(cache_dir) or constants.HF_HUB_CACHE
    cause = err.__cause__ or err.__context__ or err
    if offline:
        why = "offline mode is on (HF_HUB_OFFLINE=1)"
    else:
        why = f"the Hub cannot be reached ({type(cause).__name__}: {cause})"
    return HubError(
        f"cannot get {what} from the Hugging Face Hub: {why} and it is not in the local cache {cache}. "
        "Either connect to the internet and retry; or download it once on a connected machine "
        f"(`hf download {what.split(':')[0]}`), point HF_HUB_CACHE (or HF_HOME) at that cache and set "
        "HF_HUB_OFFLINE=1; "
        "or pass a local path instead of a Hub id (a folder written by `elflm convert` / save_pretrained, "
        "or an official checkpoint folder or file)."
    )


def download(
    repo_id: str,
    filename: str | None = None,
    *,
    revision: str | None = None,
    cache_dir=None,
    offline: bool | None = None,
) -> Path:
    """Snapshot folder of a Hub model repository (or one ``filename`` in it), cached by
    huggingface_hub. Offline only the cache is used; a missing network fails at once with a
    message saying how to work offline."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline(offline)
    kw = dict(revision=revision, cache_dir=_hub_cache(cache_dir), local_files_only=offline, etag_timeout=10)
    what = f"{repo_id}:{filename}" if filename else repo_id
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, **kw))
        return Path(snapshot_download(repo_id, **kw))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise HubError(f"{what}: not found on the Hugging Face Hub or not accessible ({type(e).__name__}: {e})") from e
    except (LocalEntryNotFoundError, OSError) as e:  # not in the cache offline; connection errors of the HTTP client
        raise _unreachable(what, offline, cache_dir, e) from e


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
    """``load(name_or_path)`` (an HF ``from_pretrained``) for a local folder or a Hub id; a Hub
    failure becomes a :class:`HubError` that says how to work offline."""
    _check_name(name_or_path, what)
    if _is_local(name_or_path):
        return load(str(Path(str(name_or_path)).expanduser()))
    try:
        return load(str(name_or_path))
    except OSError as e:
        from huggingface_hub import constants

        cache = _hub_cache(None) or constants.HF_HUB_CACHE
        raise HubError(
            f"could not load the {what} {str(name_or_path)!r}: it is not a local path and the Hugging Face Hub did not "
            f"provide it ({type(e).__name__}: {e}). Without network access, download it once where there is network "
            f"(it is kept in the Hugging Face cache, {cache}; set HF_HOME or HF_HUB_CACHE to move it) "
            "and run with HF_HUB_OFFLINE=1, or pass a local folder / file path instead."
        ) from e


def upload_folder(
    folder, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str = "Upload ELF model"
) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if needed); returns the
    commit URL. Credentials: ``token`` or the saved login."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
