"""Foreign checkpoint formats, read without their frameworks: the authors' Flax checkpoints
(:mod:`.flax`), their PyTorch port (:mod:`.torchport`), the unofficial Lightning reproduction
(:mod:`.lightning`), the official training config they come with (:mod:`.official`) and the
authors' T5 encoder pickle (:mod:`.t5_encoder`).

:func:`detect_format` names the format of a path, :func:`read_checkpoint` reads one into our model
config, settings and weights. Official checkpoints store no architecture sizes:
:func:`infer_model_config` reads them from the parameter shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..config import ModelConfig, Settings
from . import lightning, official
from .flax import read_msgpack_weights, read_orbax_weights
from .torchport import read_port_weights

FORMATS = ("flax-orbax", "flax-msgpack", "torch-port", "lightning")
_STEP = re.compile(r"checkpoint_(\d+)")  # the official run folder: run/checkpoint_<step>


@dataclass
class Weights:
    """State dicts in our parameter names, ``ema`` and ``raw`` (each None when the source has no
    such copy or it was not asked for), and the training ``step`` if stored."""

    ema: dict[str, torch.Tensor] | None
    raw: dict[str, torch.Tensor] | None
    step: int | None = None

    @property
    def sampling(self) -> dict[str, torch.Tensor]:
        """The weights to sample with: the EMA ones, else the raw ones."""
        return self.ema if self.ema is not None else self.raw


def _latest_step(folder: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.fullmatch(p.name))]
    return max(found)[1] if found else None


def detect_format(path: str | Path) -> tuple[str, Path]:
    """``(format, path)`` of a foreign checkpoint (one of :data:`FORMATS`); a run folder resolves
    to its newest ``checkpoint_<N>``, an orbax ``CheckpointManager`` step to its item folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if any((path / n).exists() for n in ("_METADATA", "manifest.ocdbt", "checkpoint")):
            return "flax-orbax", path
        if (path / "_CHECKPOINT_METADATA").exists():  # a CheckpointManager step: the tree is in an item folder
            items = [p for p in path.iterdir() if (p / "_METADATA").is_file()]
            return "flax-orbax", items[0] if len(items) == 1 else path
        inner = _latest_step(path)
        if inner:
            return detect_format(inner)
        ckpt = lightning.find_checkpoint(path)
        if ckpt is not None:
            return "lightning", ckpt
        weights = [p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".msgpack")]
        if len(weights) == 1:
            return detect_format(weights[0])
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
        raise CheckpointError(
            f"{path}: unknown checkpoint layout (found: {listing}); expected an elflm model folder or training "
            "checkpoint, an orbax checkpoint_<step> folder, a flax msgpack file, a pytorch_elf torch.save file or "
            "a Lightning .ckpt file (or a folder with last.ckpt)"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        return ("lightning" if lightning.is_lightning(path) else "torch-port"), path
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "flax-msgpack", path
    kind = f"starts with {head!r}"
    if path.suffix == ".safetensors":
        kind = "a safetensors file (pass the elflm model folder holding it)"
    raise CheckpointError(
        f"{path}: unknown checkpoint file format ({kind}); "
        "expected a pytorch_elf torch.save or Lightning .ckpt zip file, or a flax msgpack file"
    )


def _read_weights(fmt: str, path: Path, which: str) -> Weights:
    if fmt == "flax-orbax":
        return Weights(*read_orbax_weights(path, which))
    weights = Weights(*(read_msgpack_weights(path) if fmt == "flax-msgpack" else read_port_weights(path)))
    if which == "ema" and weights.ema is not None:
        weights.raw = None
    if which == "raw":
        weights.ema = None
    return weights


def read_checkpoint(
    path: str | Path,
    format: str | None = None,
    config: str | Path | dict | None = None,
    max_length: int | None = None,
    which: str = "ema",
) -> tuple[ModelConfig, Settings, Weights]:
    """Read a foreign checkpoint (format detected, or forced with ``format``) into ``(model
    config, settings, weights)``. ``which``: ``ema`` (the EMA weights, or the raw ones when the
    source has no EMA copy), ``raw`` or ``both``.

    The sizes are inferred from the shapes; ``max_length`` and the other settings come from
    ``config`` (an official YAML path or dict), else a ``config.yml`` beside the checkpoint or in
    its run folder; ``max_length`` overrides."""
    if which not in ("ema", "raw", "both"):
        raise ValueError(f"which must be 'ema', 'raw' or 'both', got {which!r}")
    if format is not None and format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; expected one of {FORMATS}")
    fmt, resolved = detect_format(path)
    if format is not None and format != fmt:
        fmt, resolved = format, Path(path)
    embedded, has_encoder = None, False
    if fmt == "lightning":
        ema, raw, step, embedded, has_encoder = lightning.read_lightning(resolved, which)
        weights = Weights(ema, raw, step)
    else:
        weights = _read_weights(fmt, resolved, which)
    if embedded is not None and config is None:
        cfg, cfg_file = embedded, None
    else:
        cfg, cfg_file = official.read_config(config, resolved)
    if max_length is None and "max_length" not in cfg:
        raise CheckpointError(
            f"{resolved}: the official checkpoint does not store max_length and no config.yml was found beside it; "
            "pass the training YAML (--config / config=) or --max-length"
        )
    settings, official_max_length = official.settings_from_official(cfg, cfg_file)
    if has_encoder:  # the frozen encoder travels inside the checkpoint
        settings.encoder.weights = str(resolved.absolute())
    if cfg_file:
        cfg_src = cfg_file.name
    else:
        cfg_src = "given settings" if isinstance(config, dict) else "embedded" if embedded is not None else None
    settings.source = {
        "format": fmt,
        "path": resolved.name,
        "step": weights.step,
        "config": cfg_src,
        "weights": "ema" if weights.ema is not None else "raw",
    }
    model_cfg = infer_model_config(weights.sampling, max_length or official_max_length, str(resolved))
    return model_cfg, settings, weights


def infer_model_config(sd: dict[str, torch.Tensor], max_length: int, where: str = "checkpoint") -> ModelConfig:
    """Architecture sizes from parameter shapes (our names): H and the token counts from the
    control tokens, C from the denoise head, V from the unembedding, depth from the blocks,
    heads = H / head_dim with head_dim the q_norm width, the SwiGLU ratio from ``w3``."""
    try:
        H, n_time = sd["t_emb_tokens"].shape[2], sd["t_emb_tokens"].shape[1]
        C, V = sd["final_layer.linear.weight"].shape[0], sd["decoder.unembed.weight"].shape[0]
        head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
        mlp_hidden = sd["blocks.0.mlp.w3.weight"].shape[1]
        bottleneck = sd["text_proj.proj1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{where}: missing parameter {e.args[0]!r}; not an ELF checkpoint?") from e
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if H % head_dim:
        raise CheckpointError(f"{where}: hidden size {H} is not a multiple of the q_norm width {head_dim}")
    ratios = [4.0] + [m / H for m in range(int(mlp_hidden * 1.5), int(mlp_hidden * 1.5) + 3)]
    ratio = next((r for r in ratios if int(int(H * r) * 2 / 3) == mlp_hidden), None)
    if ratio is None:
        raise CheckpointError(f"{where}: no mlp_ratio gives a SwiGLU width of {mlp_hidden} at hidden size {H}")
    count = lambda name: sd[name].shape[1] if name in sd else 0
    return ModelConfig(
        encoder_dim=C,
        vocab_size=V,
        max_length=int(max_length),
        hidden_size=H,
        depth=depth,
        num_heads=H // head_dim,
        mlp_ratio=ratio,
        bottleneck_dim=bottleneck,
        num_time_tokens=n_time,
        num_self_cond_cfg_tokens=count("self_cond_cfg_tokens"),
        num_mode_tokens=count("mode_tokens"),
        self_cond="self_cond_proj.weight" in sd,
    )
