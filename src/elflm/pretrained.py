"""Our model folder, what ``ELF.from_pretrained`` loads and ``save_pretrained`` writes:

* ``model.safetensors`` – the weights to sample with (the EMA weights of a training run);
* ``model_raw.safetensors`` – optional raw (non-EMA) weights;
* ``config.json`` – the sections ``model`` (:class:`~elflm.config.ModelConfig`) and those of
  :class:`~elflm.config.Settings`: ``encoder`` (how to rebuild the frozen encoder and its
  tokenizer, latent mean/std), ``data`` (``max_input_length``, ``pad_token`` of conditional
  models), ``objective``, ``sample`` (the sampling defaults) and ``source`` (where the weights
  came from);
* ``encoder/`` – the encoder when it is not a Hub id (an HF encoder folder with its tokenizer, or
  copies of the local files the settings name); paths in the ``encoder`` section are relative to
  the model folder (:mod:`elflm.portable`), so a folder loads from anywhere after being moved;
* ``README.md`` – the model card: YAML metadata (library, tags, base encoder, datasets, metrics)
  and how to use the model.

``from_pretrained`` also reads, without converting, a training run or checkpoint
(:mod:`elflm.checkpoint`) and foreign checkpoints (:mod:`elflm.formats`); a Hub id is downloaded
and, when not in our format, converted once into a cache folder.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from . import files, formats, hub, portable
from .checkpoint import CheckpointError, TrainingCheckpoint, tensor_bytes
from .config import SECTIONS, ConfigError, ModelConfig, Settings
from .distributed import resolve_device
from .encoder import TextEncoder, build_encoder, load_tokenizer
from .errors import check_int
from .formats import Weights, lightning, official
from .formats.t5_encoder import t5_from_state_dict
from .version import __version__

WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "model_raw.safetensors"
CONFIG = "config.json"
CARD = "README.md"
ENCODER_DIR = portable.ENCODER_DIR
FORMAT_VERSION = 1
FORMATS = ("elflm", "elflm-train", *formats.FORMATS)
_SETTINGS = {f.name: SECTIONS[f.name] for f in fields(Settings) if f.name in SECTIONS}


# --------------------------------------------------------------------------- reading


def _dataclass_from(cls, values: dict, where: str, section: str):
    """``cls(**values)`` of the ``section`` mapping of a config file ``where``; every error a
    :class:`CheckpointError` naming the file and the key."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: {section!r} must be a mapping of settings, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(values) - names))
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} field(s) {unknown}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e} (the file is damaged or was edited by hand)") from None
    except TypeError as e:
        raise CheckpointError(f"{where}: bad {cls.__name__} ({e})") from e


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError on bad header / truncated data
        raise CheckpointError(f"{file}: cannot read safetensors weights (truncated or corrupted?): {e}") from e


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
    version = cfg.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f'{file}: "version" must be an integer, got {version!r}')
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: written by a newer elflm (format version {cfg['version']} > {FORMAT_VERSION}); upgrade elflm"
        )
    where = str(file)
    sections = {name: _dataclass_from(cls, cfg.get(name) or {}, where, name) for name, cls in _SETTINGS.items()}
    sections["encoder"] = portable.resolve_encoder(sections["encoder"], directory)
    sections["data"] = replace(sections["data"], tokenizer=sections["encoder"].tokenizer_name)
    source = cfg.get("source") or {}
    if not isinstance(source, dict):
        raise CheckpointError(f'{file}: "source" must be a mapping, got {type(source).__name__}')
    return _dataclass_from(ModelConfig, cfg["model"], where, "model"), Settings(**sections, source=source)


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
    model_cfg = _dataclass_from(ModelConfig, state["model_config"], where, "model_config")
    step = state.get("step")
    settings = Settings.from_config(ckpt.config(), {"format": "elflm-train", "path": ckpt.path.name, "step": step})
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


def file_encoder(weights, tokenizer=None, *, cache_dir=None, offline: bool | None = None, **latent):
    """The :class:`~elflm.encoder.TextEncoder` of encoder weights held in a foreign file, or None
    for other ``weights``: ``.pkl`` → the authors' encoder pickle (local, or ``org/repo/file`` on
    the Hub); ``.ckpt`` → the T5 encoder inside a Lightning checkpoint
    (:mod:`elflm.formats.lightning`). ``tokenizer`` (folder or Hub id) None: ids only."""
    if weights is None:
        return None
    if str(weights).endswith(".pkl"):
        pkl = hub.resolve_file(weights, "encoder pickle", cache_dir=cache_dir, offline=offline)
        return TextEncoder.from_jax_pickle(pkl, tokenizer=tokenizer, **latent)
    if str(weights).endswith(".ckpt"):
        sd = lightning.read_encoder(weights)
        if sd is None:
            raise CheckpointError(f"{weights}: this Lightning checkpoint holds no encoder weights ('encoder.*')")
        tok = load_tokenizer(tokenizer) if tokenizer is not None else None
        return TextEncoder(t5_from_state_dict(sd, str(weights)), tok, **latent)
    return None


def build_text_encoder(settings: Settings, device=None, *, cache_dir=None, offline: bool | None = None) -> TextEncoder:
    """The frozen :class:`~elflm.encoder.TextEncoder` that ``settings.encoder`` describes:
    ``weights`` in a foreign file (:func:`file_encoder`: the authors' pickle, e.g. the official
    ``embedded-language-flows/t5_small_encoder_jax/t5_small_encoder_jax.pkl``, or a Lightning
    checkpoint), an HF encoder folder / Hub id, or none (``name_or_path``). The latent mean/std
    fall back to the objective's. A tokenizer with more tokens than the encoder embeds gets a
    warning (:func:`check_tokenizer`)."""
    e, o = settings.encoder, settings.objective
    latent = dict(
        latent_mean=o.latent_mean if e.latent_mean is None else e.latent_mean,
        latent_std=o.latent_std if e.latent_std is None else e.latent_std,
    )
    enc = file_encoder(e.weights, e.tokenizer_name, cache_dir=cache_dir, offline=offline, **latent)
    enc = enc if enc is not None else build_encoder(e, **latent)
    check_tokenizer(enc, e.tokenizer_name)
    return enc if device is None else enc.to(device)


def check_tokenizer(encoder: TextEncoder, name) -> None:
    """Warn when the tokenizer has more tokens than the encoder embeds (``len(tokenizer) >
    encoder.vocab_size``): text may encode to ids the encoder cannot take (token ids below the
    encoder's vocabulary still work)."""
    tok = encoder.tokenizer
    if tok is not None and len(tok) > encoder.vocab_size:
        warnings.warn(
            f"the tokenizer {str(name)!r} has {len(tok)} tokens but the encoder embeds only {encoder.vocab_size}: "
            "text may encode to ids the encoder cannot take; pass the tokenizer the encoder was made with "
            "(--tokenizer / tokenizer=)",
            stacklevel=2,
        )


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
    broken = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(
            f"{where}: {len(broken)} of {len(sd)} weight tensors hold NaN or infinite values ({', '.join(broken[:3])}"
            f"{', …' if len(broken) > 3 else ''}): the run diverged or the file is damaged; use an earlier checkpoint"
        )


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------- model cards

TAGS = ["elflm", "elf", "embedded-language-flows", "flow-matching", "text-generation"]


def card_metrics(report: dict) -> dict[str, float]:
    """Numbers for a model card from a metrics dict: an ``elflm eval --json`` report (the samples'
    ``gen_ppl`` / ``entropy``, ``bleu``, ``rouge*``) or a flat ``{name: number}``."""
    if not isinstance(report, dict):
        raise ValueError(f"metrics must be a mapping of names to numbers, got {type(report).__name__}")
    flat = dict(report.get("samples") or {}) if isinstance(report.get("samples"), dict) else {}
    flat.update({k: v for k, v in report.items() if k != "samples"})
    keep = {"gen_ppl", "entropy", "bleu", "rouge1", "rouge2", "rougeL"} if "samples" in report else None
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (keep is None or k in keep)
    }


def model_card(model_cfg: ModelConfig, settings: Settings, metrics: dict | None = None, name: str = "ELF") -> str:
    """The ``README.md`` of a model folder: YAML metadata (``library_name: elflm``, tags, the base
    encoder and datasets when they are Hub ids, the metrics as a ``model-index``) and a short
    description with how to load and sample it."""
    enc, data, s = settings.encoder, settings.data, settings.sample
    meta: dict = {"library_name": "elflm", "pipeline_tag": "text-generation", "tags": list(TAGS)}
    hub_names = [n for n in (enc.name_or_path, enc.weights) if n and n != "random" and not portable.is_local(n)]
    hub_names = [n for n in hub_names if not str(n).startswith(ENCODER_DIR)]
    if hub_names:  # the encoder's Hub repository (of a Hub file such as org/repo/file.pkl: the repository)
        meta["base_model"] = "/".join(str(hub_names[0]).split("/")[:2])
    if data.train_path and hub.is_hub_id(data.train_path):
        meta["datasets"] = [data.train_path]
    metrics = card_metrics(metrics) if metrics else {}
    if metrics:
        dataset = {"name": data.train_path or "samples", "type": data.train_path or "samples"}
        meta["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": dataset,
                        "metrics": [{"type": k, "value": v, "name": k} for k, v in metrics.items()],
                    }
                ],
            }
        ]
    kind = "conditional" if data.max_input_length else "unconditional"
    sampler = f"{s.method}, {s.steps} steps, {s.grid} grid, w = {s.w:g}" + (
        f", γ = {s.gamma:g}" if s.method == "sde" else ""
    )
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"An {kind} [ELF](https://arxiv.org/abs/2605.10938) (Embedded Language Flows) model for "
        "[elflm](https://github.com/lillian039/ELF): a flow-matching language model in the frozen embedding space of "
        f"the text encoder `{enc.name_or_path}`, decoding to tokens at the last step with the same network.",
        "",
        f"- network: depth {model_cfg.depth}, width {model_cfg.hidden_size}, {model_cfg.num_heads} heads, "
        f"encoder width {model_cfg.encoder_dim}, vocabulary {model_cfg.vocab_size}, {model_cfg.max_length} tokens"
        + (f" (condition: {data.max_input_length})" if data.max_input_length else ""),
        f"- sampler defaults: {sampler}",
    ]
    if settings.source.get("format"):
        step = settings.source.get("step")
        lines.append(f"- weights: {settings.source['format']}" + (f", step {step}" if step is not None else ""))
    if metrics:
        lines.append("- metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    lines += [
        "",
        "```python",
        "from elflm import ELF, generate",
        'model = ELF.from_pretrained("<this repository or folder>")',
        "texts = generate(model, model.encoder, model.pretrained.sample, num_samples=4, seed=0)",
        "```",
        "",
        "```bash",
        "elflm sample --checkpoint <this repository or folder> --num-samples 4",
        "```",
        "",
        f"Written by elflm {__version__}.",
        "",
    ]
    return "\n".join(lines)


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
        checkpoint, a foreign checkpoint, a Hub id (``org/name``) or a Hub file
        (``org/name/path/file.ckpt``); with the EMA weights (``raw=True``: the raw ones).

        ``encoder``: True = the encoder the checkpoint describes, False = none, a
        ``TextEncoder``, or encoder weights to use instead (the authors' pickle or an HF encoder
        folder / Hub id); ``tokenizer`` replaces its tokenizer folder / Hub id. ``config`` /
        ``max_length`` complete foreign checkpoints (:func:`read_checkpoint`);
        ``revision``, ``cache_dir``, ``offline`` apply to Hub downloads. A bad argument is a
        ``ValueError`` naming it."""
        if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
            raise ValueError(f"name_or_path must be a folder, file or Hub id, got {name_or_path!r}")
        if not isinstance(raw, bool):
            raise ValueError(f"raw must be True or False, got {raw!r}")
        if max_length is not None:
            max_length = check_int("max_length", max_length, 1)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float64), got {dtype!r}")
        device = None if device is None else resolve_device(device)
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
        elif not path.exists() and hub.is_hub_file(str(name_or_path)):
            repo_id = "/".join(str(name_or_path).split("/")[:2])
            path = hub.resolve_file(name_or_path, "checkpoint file", cache_dir=cache_dir, offline=offline)
            config = config if config is not None or official.find_config(path) else official.published_config(repo_id)
        elif not path.exists():
            raise CheckpointError(
                f"{name_or_path}: no such file or folder, and not a Hub id of the form 'org/name' (or 'org/name/file')"
            )
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
        metrics: dict | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the model (its current weights, normally the EMA weights) as a model folder that
        loads from anywhere: ``model.safetensors``, ``config.json``, ``README.md`` (the model card,
        with ``metrics`` when given: see :func:`card_metrics`) and, with ``raw_state_dict``,
        ``model_raw.safetensors``. ``settings`` defaults to those the model was loaded with
        (``.pretrained``). ``encoder``: a :class:`~elflm.encoder.TextEncoder` to save as
        ``encoder/``; ``"auto"`` saves the attached ``.encoder`` when the settings name a local
        encoder or tokenizer; ``False`` saves none. Local files the encoder settings still name are
        copied into ``encoder/`` (:func:`elflm.portable.bundle_encoder`); Hub ids stay Hub ids.

        The folder is written all-or-nothing (:func:`elflm.files.staged_folder`): beside
        ``directory``, then moved into place in one step. An existing non-empty ``directory`` is
        replaced as a whole with ``overwrite=True`` and refused otherwise
        (:class:`~elflm.files.OutputExistsError`)."""
        directory = Path(directory)
        need = tensor_bytes(self.state_dict()) + tensor_bytes(raw_state_dict or {})
        with files.staged_folder(directory, overwrite=overwrite, need=need) as tmp:
            self._write_folder(tmp, directory.absolute().name, raw_state_dict, settings, encoder, metrics)
        return directory

    def _write_folder(self, directory: Path, name: str, raw_state_dict, settings, encoder, metrics) -> None:
        """The files of :meth:`save_pretrained` into the (new, empty) folder ``directory``; ``name``
        titles the model card."""
        settings = settings or getattr(self, "pretrained", None) or Settings()
        enc_cfg = settings.encoder
        local = any(portable.is_local(getattr(enc_cfg, f)) for f in portable.PATH_FIELDS) or enc_cfg.weights == "random"
        if encoder == "auto":
            encoder = getattr(self, "encoder", None) if local else None
        if encoder is not None and encoder is not False:
            path = str(encoder.save_pretrained(directory / ENCODER_DIR).absolute())
            tokenizer = path if encoder.tokenizer is not None else enc_cfg.tokenizer_name
            name_or_path = path if portable.is_local(enc_cfg.name_or_path) else enc_cfg.name_or_path  # Hub names stay
            enc_cfg = replace(enc_cfg, name_or_path=name_or_path, weights=path, tokenizer=tokenizer)
        enc_cfg = portable.bundle_encoder(enc_cfg, directory)
        if raw_state_dict is not None:
            _check_state_dict(self, raw_state_dict, "raw_state_dict")
        save_file(_cpu(self.state_dict()), str(directory / WEIGHTS), metadata={"format": "pt"})
        if raw_state_dict is not None:
            save_file(_cpu(raw_state_dict), str(directory / RAW_WEIGHTS), metadata={"format": "pt"})
        train_path = settings.data.train_path
        data = replace(
            settings.data,
            max_length=self.config.max_length,
            tokenizer=enc_cfg.tokenizer_name,
            train_path=train_path if train_path and hub.is_hub_id(train_path) else None,
        )
        saved = Settings(enc_cfg, data, settings.objective, settings.sample, dict(settings.source))
        config = {
            "format": "elflm",
            "version": FORMAT_VERSION,
            "model": asdict(self.config),
            **{section: asdict(getattr(saved, section)) for section in _SETTINGS},
            "source": saved.source,
        }
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (directory / CARD).write_text(model_card(self.config, saved, metrics, name))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload ELF model",
        **save_kwargs,
    ) -> str:
        """Save the model (:meth:`save_pretrained` with ``save_kwargs``, model card included) into
        a temporary folder and upload it to the Hub model repository ``repo_id`` (created if
        needed). Returns the commit URL. Credentials: ``token`` or the saved login. Without the Hub
        it fails at once with a :class:`~elflm.hub.HubError`."""
        hub.require_hub(f"upload to the Hugging Face Hub repository {hub.check_repo_id(repo_id)}")
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.split("/")[-1], **save_kwargs)
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
        overwrite: bool = False,
    ) -> Path:
        """Convert a checkpoint (format detected, or forced with ``format``) into a model folder
        ``output`` that loads from anywhere: ``model.safetensors`` holds the EMA weights (the raw
        ones when the source has no EMA), ``raw=True`` adds ``model_raw.safetensors``. The encoder
        is ``encoder`` (the authors' encoder pickle or an HF encoder folder / Hub id) or the one
        the source names; when it is local (a pickle beside the checkpoint, the T5 weights inside a
        Lightning checkpoint, a folder) it is converted and saved in ``encoder/``; a Hub id stays a
        Hub id. ``tokenizer`` (HF folder or Hub id; default: the config's, ``t5-small``) is saved
        with it when local. ``output`` is written all-or-nothing; an existing one is replaced only
        with ``overwrite`` (:meth:`save_pretrained`), and refused before anything is read otherwise."""
        files.check_overwrite(output, overwrite, "output", folder=True)
        model_cfg, settings, weights = read_checkpoint(src, format, config, max_length, which="both" if raw else "ema")
        if raw and (weights.raw is None or weights.ema is None):
            raise CheckpointError(f"{src}: raw=True needs both EMA and raw weights in the source")
        model = cls._with_weights(model_cfg, weights.sampling, str(src))
        if encoder is not None:
            settings.encoder = replace(settings.encoder, weights=str(encoder))
        if tokenizer is not None:
            settings.encoder = replace(settings.encoder, tokenizer=str(tokenizer))
        e = settings.encoder
        # foreign encoder files are converted once here (loading then needs no pickle or Lightning
        # reader); a local tokenizer is saved with them, a Hub id stays one; local HF folders are copied
        tok = e.tokenizer_name if portable.is_local(e.tokenizer_name) else None
        enc = file_encoder(e.weights, tok) if portable.is_local(e.weights) else None
        if enc is not None:
            check_tokenizer(enc, tok)
        elif encoder is not None and portable.is_local(e.weights):
            build_text_encoder(settings)  # a local encoder given here must load now, not at first use
        raw_sd = weights.raw if raw else None
        return model.save_pretrained(
            output, raw_state_dict=raw_sd, settings=settings, encoder=enc or False, overwrite=overwrite
        )

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
        the snapshot converted once into ``hub.cache_root()/converted/models--org--name/<commit>``.
        A Lightning repository's per-epoch checkpoints (``checkpoints/*.ckpt``) are not downloaded."""
        snapshot = hub.download(
            repo_id, revision=revision, cache_dir=cache_dir, offline=offline, ignore_patterns=["checkpoints/*.ckpt"]
        )
        fmt, resolved = detect_format(snapshot)
        if fmt == "elflm":
            return resolved
        out = hub.cache_root() / "converted" / ("models--" + repo_id.replace("/", "--")) / snapshot.name
        with files.locked(out, wait=True):  # one process converts, the others wait and use its folder
            if (out / CONFIG).is_file() and (not raw or (out / RAW_WEIGHTS).is_file()):
                return out
            if config is None and official.find_config(resolved) is None:
                config = official.published_config(repo_id)
            with files.staged_folder(out, overwrite=True) as tmp:  # replaces a conversion without raw weights
                cls.convert(resolved, tmp, config=config, max_length=max_length, raw=raw, overwrite=True)
                settings_file = json.loads((tmp / CONFIG).read_text())
                settings_file["source"]["hub"] = {"repo_id": repo_id, "commit": snapshot.name}
                (tmp / CONFIG).write_text(json.dumps(settings_file, indent=2) + "\n")
        return out

    @classmethod
    def push_folder(
        cls,
        path: str | Path,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload ELF model",
        metrics: dict | None = None,
        config: str | Path | dict | None = None,
        max_length: int | None = None,
    ) -> str:
        """``elflm push``: upload a model folder to the Hub repository ``repo_id``; its model card is
        written first when it has none, or when ``metrics`` are given. Anything else
        :meth:`~PretrainedModel.from_pretrained` reads (a training run, a foreign checkpoint) is
        converted into a temporary folder first. Returns the commit URL; without the Hub it fails at
        once with a :class:`~elflm.hub.HubError`."""
        path = Path(path)
        fmt, resolved = detect_format(path)
        hub.require_hub(
            f"upload {path} to the Hugging Face Hub repository {hub.check_repo_id(repo_id)}",
            f"run `elflm push {path} {repo_id}` again when online",
        )
        upload = lambda folder: hub.upload_folder(  # noqa: E731
            folder, repo_id, private=private, token=token, commit_message=commit_message
        )
        if fmt == "elflm":
            if metrics is not None or not (resolved / CARD).is_file():
                model_cfg, settings = read_config(resolved)
                name = repo_id.split("/")[-1]
                files.write_text(resolved / CARD, model_card(model_cfg, settings, metrics, name))
            return upload(resolved)
        with tempfile.TemporaryDirectory() as tmp:
            folder = cls.convert(path, Path(tmp) / repo_id.split("/")[-1], config=config, max_length=max_length)
            if metrics is not None:
                model_cfg, settings = read_config(folder)
                (folder / CARD).write_text(model_card(model_cfg, settings, metrics, folder.name))
            return upload(folder)
