"""Our model folder, what ``ELF.from_pretrained`` loads and ``save_pretrained`` writes:

* ``model.safetensors`` – the weights to sample with (the EMA weights of a training run);
* ``model_raw.safetensors`` – optional raw (non-EMA) weights;
* ``config.json`` – the sections ``model`` (:class:`~elflm.config.ModelConfig`) and those of
  :class:`~elflm.config.Settings`: ``encoder`` (how to rebuild the frozen encoder and its
  tokenizer, latent mean/std), ``data`` (``max_input_length``, ``pad_token`` of conditional
  models), ``objective``, ``sample`` (the sampling defaults) and ``source`` (where the weights
  came from);
* ``encoder/`` – optional copy of the encoder (HF encoder folder with its tokenizer); paths in
  the ``encoder`` section are relative to the model folder.

``from_pretrained`` also reads, without converting, a training run or checkpoint
(:mod:`elflm.checkpoint`) and the authors' checkpoints (:mod:`elflm.formats`); a Hub id is
downloaded and, when not in our format, converted once into a cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import formats, hub
from .checkpoint import CheckpointError, TrainingCheckpoint
from .config import SECTIONS, EncoderConfig, ModelConfig, Settings
from .encoder import TextEncoder, build_encoder
from .formats import Weights, official

WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "model_raw.safetensors"
CONFIG = "config.json"
ENCODER_DIR = "encoder"
FORMAT_VERSION = 1
FORMATS = ("elflm", "elflm-train", *formats.FORMATS)
_SETTINGS = {f.name: SECTIONS[f.name] for f in fields(Settings) if f.name in SECTIONS}


# --------------------------------------------------------------------------- reading


def _dataclass_from(cls, values: dict, where: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} field(s) {unknown}")
    try:
        return cls(**values)
    except TypeError as e:
        raise CheckpointError(f"{where}: bad {cls.__name__} ({e})") from e


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError on bad header / truncated data
        raise CheckpointError(f"{file}: cannot read safetensors weights (truncated or corrupted?): {e}") from e


def _encoder_paths(enc: EncoderConfig, resolve) -> EncoderConfig:
    """``enc`` with ``weights`` / ``tokenizer`` passed through ``resolve`` (relative <-> absolute)."""
    return replace(enc, weights=resolve(enc.weights), tokenizer=resolve(enc.tokenizer))


def read_config(directory: str | Path) -> tuple[ModelConfig, Settings]:
    """Model config and settings of a model folder's ``config.json``; encoder paths that exist
    relative to the folder become absolute."""
    directory = Path(directory)
    file = directory / CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read config ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("format") != "elflm" or "model" not in cfg:
        raise CheckpointError(f'{file}: not an elflm config (expected "format": "elflm" and a "model" section)')
    if cfg.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: written by a newer elflm (format version {cfg['version']} > {FORMAT_VERSION}); upgrade elflm"
        )
    where = str(file)
    sections = {name: _dataclass_from(cls, cfg.get(name) or {}, where) for name, cls in _SETTINGS.items()}
    local = lambda p: str(directory / p) if p is not None and (directory / p).exists() else p
    sections["encoder"] = _encoder_paths(sections["encoder"], local)
    sections["data"] = replace(sections["data"], tokenizer=local(sections["data"].tokenizer))
    return _dataclass_from(ModelConfig, cfg["model"], where), Settings(**sections, source=cfg.get("source") or {})


def _read_folder(path: Path, which: str) -> tuple[ModelConfig, Settings, Weights]:
    model_cfg, settings = read_config(path)
    has_raw = (path / RAW_WEIGHTS).is_file()
    if which == "raw" and not has_raw:
        raise CheckpointError(f"{path}: no raw weights ({RAW_WEIGHTS}) in this model folder")
    ema = _load_safetensors(path / WEIGHTS) if which != "raw" else None
    raw = _load_safetensors(path / RAW_WEIGHTS) if which != "ema" and has_raw else None
    return model_cfg, settings, Weights(ema=ema, raw=raw, step=settings.source.get("step"))


def _read_training(ckpt: TrainingCheckpoint, which: str) -> tuple[ModelConfig, Settings, Weights]:
    state = ckpt.state()
    where = str(ckpt.path / ckpt.STATE)
    if not isinstance(state, dict) or not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{where}: no model_config in the training state")
    model_cfg = _dataclass_from(ModelConfig, state["model_config"], where)
    step = state.get("step")
    settings = Settings.from_config(ckpt.config(), {"format": "elflm-train", "path": str(ckpt.path), "step": step})
    ema = ckpt.ema() if which != "raw" else None
    raw = ckpt.raw() if which != "ema" else None
    return model_cfg, settings, Weights(ema=ema, raw=raw, step=step)


def detect_format(path: str | Path) -> tuple[str, Path]:
    """``(format, path)`` of a checkpoint: ``elflm`` (a model folder), ``elflm-train`` (a
    training checkpoint; a run folder resolves to its newest) or a foreign format
    (:func:`elflm.formats.detect_format`)."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
            return "elflm", path
        ckpt = TrainingCheckpoint.find(path)
        if ckpt is not None:
            return "elflm-train", ckpt.path
        if (path / WEIGHTS).is_file():
            raise CheckpointError(f"{path}: has {WEIGHTS} but no {CONFIG}; an elflm model folder needs both")
    return formats.detect_format(path)


def read_checkpoint(
    path: str | Path,
    format: str | None = None,
    config: str | Path | dict | None = None,
    max_length: int | None = None,
    which: str = "ema",
) -> tuple[ModelConfig, Settings, Weights]:
    """Read any supported checkpoint (format detected, or forced with ``format``, one of
    :data:`FORMATS`) into ``(model config, settings, weights)``. ``which``: ``ema`` (the EMA
    weights, or the raw ones when the source has no EMA copy), ``raw`` or ``both``. ``config``
    and ``max_length`` complete the authors' checkpoints (:func:`elflm.formats.read_checkpoint`);
    ``max_length`` also overrides ours."""
    if which not in ("ema", "raw", "both"):
        raise ValueError(f"which must be 'ema', 'raw' or 'both', got {which!r}")
    if format is not None and format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; expected one of {FORMATS}")
    fmt, resolved = detect_format(path)
    if format is not None and format != fmt:
        fmt, resolved = format, Path(path)
    if fmt == "elflm":
        model_cfg, settings, weights = _read_folder(resolved, which)
    elif fmt == "elflm-train":
        model_cfg, settings, weights = _read_training(TrainingCheckpoint(resolved), which)
    else:
        return formats.read_checkpoint(resolved, fmt, config, max_length, which)
    return (replace(model_cfg, max_length=max_length) if max_length else model_cfg), settings, weights


def build_text_encoder(settings: Settings, device=None, *, cache_dir=None, offline: bool | None = None) -> TextEncoder:
    """The frozen :class:`~elflm.encoder.TextEncoder` that ``settings.encoder`` describes:
    ``weights`` ending in ``.pkl`` → the authors' encoder pickle (local, or ``org/repo/file`` on the
    Hub, e.g. the official ``embedded-language-flows/t5_small_encoder_jax/t5_small_encoder_jax.pkl``);
    other ``weights`` → an HF encoder folder / Hub id; no ``weights`` → ``name_or_path``.
    The latent mean/std fall back to the objective's."""
    e, o = settings.encoder, settings.objective
    latent = dict(
        latent_mean=o.latent_mean if e.latent_mean is None else e.latent_mean,
        latent_std=o.latent_std if e.latent_std is None else e.latent_std,
    )
    if e.weights is not None and str(e.weights).endswith(".pkl"):
        pkl = hub.resolve_file(e.weights, "encoder pickle", cache_dir=cache_dir, offline=offline)
        enc = TextEncoder.from_jax_pickle(pkl, tokenizer=e.tokenizer_name, **latent)
    else:
        enc = build_encoder(e, **latent)
    return enc if device is None else enc.to(device)


def _check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:6]}{' …' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}")
    if shapes:
        problems.append(f"shape mismatch (file != model) {shapes[:6]}")
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model config: " + "; ".join(problems))


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------- the model mixin


class PretrainedModel:
    """Loading, saving, converting and uploading for a model class built as ``cls(config)`` from
    a :class:`~elflm.config.ModelConfig` (``ELF`` inherits it). A loaded model carries, as plain
    attributes outside ``state_dict()`` and ``.to()``: ``encoder`` (the frozen
    :class:`~elflm.encoder.TextEncoder` or None), its ``tokenizer`` and ``pretrained`` (the
    :class:`~elflm.config.Settings`)."""

    @classmethod
    def _with_weights(cls, model_cfg: ModelConfig, sd: dict[str, torch.Tensor], where: str):
        model = cls(model_cfg)
        _check_state_dict(model, sd, where)
        model.load_state_dict(sd, strict=True)
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        raw: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        encoder=True,
        tokenizer: str | Path | None = None,
        config: str | Path | dict | None = None,
        max_length: int | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        offline: bool | None = None,
    ):
        """The model, in eval mode on ``device``, from a model folder, a training run or
        checkpoint, one of the authors' checkpoints or a Hub id; with the EMA weights
        (``raw=True``: the raw ones).

        ``encoder``: True = the encoder the checkpoint describes, False = none, a
        ``TextEncoder``, or encoder weights to use instead (the authors' pickle or an HF encoder
        folder / Hub id); ``tokenizer`` replaces its tokenizer folder / Hub id. ``config`` /
        ``max_length`` complete the authors' checkpoints (:func:`read_checkpoint`);
        ``revision``, ``cache_dir``, ``offline`` apply to Hub downloads."""
        path = Path(name_or_path).expanduser()
        if not path.exists() and hub.is_hub_id(str(name_or_path)):
            path = cls._hub_folder(
                str(name_or_path),
                revision=revision,
                cache_dir=cache_dir,
                offline=offline,
                config=config,
                max_length=max_length,
                raw=raw,
            )
        elif not path.exists():
            raise CheckpointError(f"{name_or_path}: no such file or folder, and not a Hub id of the form 'org/name'")
        which = "raw" if raw else "ema"
        model_cfg, settings, weights = read_checkpoint(path, config=config, max_length=max_length, which=which)
        model = cls._with_weights(model_cfg, weights.raw if raw else weights.sampling, str(path))
        model = model.to(device=device, dtype=dtype)
        enc = None
        if encoder is not False and encoder is not None:
            if isinstance(encoder, TextEncoder):
                enc = encoder
            else:
                if encoder is not True:
                    settings.encoder = replace(settings.encoder, weights=str(encoder))
                if tokenizer is not None:
                    settings.encoder = replace(settings.encoder, tokenizer=str(tokenizer))
                enc = build_text_encoder(settings, device, cache_dir=cache_dir, offline=offline)
            if enc.dim != model_cfg.encoder_dim:
                raise CheckpointError(
                    f"{path}: the encoder width {enc.dim} does not match the model's "
                    f"encoder_dim {model_cfg.encoder_dim}"
                )
        vars(model).update(encoder=enc, tokenizer=getattr(enc, "tokenizer", None), pretrained=settings)
        return model

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        raw_state_dict: dict[str, torch.Tensor] | None = None,
        settings: Settings | None = None,
        encoder="auto",
    ) -> Path:
        """Write the model (its current weights, normally the EMA weights) as a model folder:
        ``model.safetensors``, ``config.json`` and, with ``raw_state_dict``, ``model_raw.safetensors``.
        ``settings`` defaults to those the model was loaded with (``.pretrained``).
        ``encoder``: a :class:`~elflm.encoder.TextEncoder` to copy in as ``encoder/``; ``"auto"``
        copies the attached ``.encoder`` when its weights are a local file or folder (so the
        folder does not depend on it); ``False`` only describes the encoder in ``config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        settings = settings or getattr(self, "pretrained", None) or Settings()
        enc_cfg = settings.encoder
        if encoder == "auto":
            local = enc_cfg.weights is not None and Path(enc_cfg.weights).exists()
            encoder = getattr(self, "encoder", None) if local else None
        if encoder is not None and encoder is not False:
            path = str(encoder.save_pretrained(directory / ENCODER_DIR))
            tokenizer = path if encoder.tokenizer is not None else enc_cfg.tokenizer
            enc_cfg = replace(enc_cfg, weights=path, tokenizer=tokenizer)
        save_file(_cpu(self.state_dict()), str(directory / WEIGHTS), metadata={"format": "pt"})
        if raw_state_dict is not None:
            _check_state_dict(self, raw_state_dict, "raw_state_dict")
            save_file(_cpu(raw_state_dict), str(directory / RAW_WEIGHTS), metadata={"format": "pt"})
        here = directory.resolve()

        def inside(p):  # paths into the folder are stored relative to it
            if p and Path(p).exists() and Path(p).resolve().is_relative_to(here):
                return os.path.relpath(Path(p).resolve(), here)
            return p

        config = {
            "format": "elflm",
            "version": FORMAT_VERSION,
            "model": asdict(self.config),
            "encoder": asdict(_encoder_paths(enc_cfg, inside)),
            "data": asdict(
                replace(settings.data, max_length=self.config.max_length, tokenizer=inside(enc_cfg.tokenizer_name))
            ),
            "objective": asdict(settings.objective),
            "sample": asdict(settings.sample),
            "source": dict(settings.source),
        }
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload ELF model",
        **save_kwargs,
    ) -> str:
        """Save the model (:meth:`save_pretrained` with ``save_kwargs``) into a temporary folder
        and upload it to the Hub model repository ``repo_id`` (created if needed). Returns the
        commit URL. Credentials: ``token`` or the saved login."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(tmp, **save_kwargs)
            return hub.upload_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def convert(
        cls,
        src: str | Path,
        output: str | Path,
        format: str | None = None,
        *,
        config: str | Path | dict | None = None,
        max_length: int | None = None,
        raw: bool = False,
        encoder: str | Path | None = None,
        tokenizer: str | Path | None = None,
    ) -> Path:
        """Convert a checkpoint (format detected, or forced with ``format``) into a model folder
        ``output``: ``model.safetensors`` holds the EMA weights (the raw ones when the source has
        no EMA), ``raw=True`` adds ``model_raw.safetensors``. ``encoder`` (the authors' encoder
        pickle or an HF encoder folder / Hub id) is converted and copied in as ``encoder/`` with
        ``tokenizer`` (HF tokenizer folder or Hub id; default: the config's, ``t5-small``)."""
        model_cfg, settings, weights = read_checkpoint(src, format, config, max_length, which="both" if raw else "ema")
        if raw and (weights.raw is None or weights.ema is None):
            raise CheckpointError(f"{src}: raw=True needs both EMA and raw weights in the source")
        model = cls._with_weights(model_cfg, weights.sampling, str(src))
        enc = False
        if encoder is not None:
            tokenizer = str(tokenizer) if tokenizer else settings.encoder.tokenizer
            settings.encoder = replace(settings.encoder, weights=str(encoder), tokenizer=tokenizer)
            enc = build_text_encoder(settings)
        raw_sd = weights.raw if raw else None
        return model.save_pretrained(output, raw_state_dict=raw_sd, settings=settings, encoder=enc)

    @classmethod
    def _hub_folder(
        cls,
        repo_id: str,
        *,
        revision=None,
        cache_dir=None,
        offline=None,
        config=None,
        max_length=None,
        raw: bool = False,
    ) -> Path:
        """A local model folder for a Hub model: the snapshot itself when it is in our format, else
        the snapshot converted once into ``hub.cache_root()/converted/models--org--name/<commit>``."""
        snapshot = hub.download(repo_id, revision=revision, cache_dir=cache_dir, offline=offline)
        fmt, resolved = detect_format(snapshot)
        if fmt == "elflm":
            return resolved
        out = hub.cache_root() / "converted" / ("models--" + repo_id.replace("/", "--")) / snapshot.name
        if (out / CONFIG).is_file() and (not raw or (out / RAW_WEIGHTS).is_file()):
            return out
        if config is None and official.find_config(resolved) is None:
            config = official.published_config(repo_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{snapshot.name}-", dir=out.parent))
        try:
            cls.convert(resolved, tmp, config=config, max_length=max_length, raw=raw)
            settings_file = json.loads((tmp / CONFIG).read_text())
            settings_file["source"]["hub"] = {"repo_id": repo_id, "commit": snapshot.name}
            (tmp / CONFIG).write_text(json.dumps(settings_file, indent=2) + "\n")
            shutil.rmtree(out, ignore_errors=True)  # an older conversion without the raw weights
            try:
                tmp.rename(out)
            except OSError:  # another process finished the same conversion first
                if not (out / CONFIG).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


# --------------------------------------------------------------------------- elflm convert
