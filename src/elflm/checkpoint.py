"""Checkpoints: our pretrained-model folder, conversion of the authors' checkpoints, the Hub.

Our format is a folder holding

* ``model.safetensors`` – the weights to sample with (the EMA weights of a training run);
* ``model_raw.safetensors`` – optional raw (non-EMA) weights;
* ``config.json`` – the sections ``model`` (:class:`ModelConfig`), ``encoder``
  (:class:`EncoderConfig`: how to rebuild the frozen encoder and its tokenizer, latent mean/std),
  ``data`` (:class:`DataConfig`: ``max_input_length``, ``pad_token`` of conditional models),
  ``objective`` (:class:`ObjectiveConfig`), ``sample`` (:class:`SampleConfig`, the sampling
  defaults) and ``source`` (where the weights came from);
* ``encoder/`` – optional copy of the encoder (HF encoder folder with its tokenizer); paths in
  the ``encoder`` section are relative to the model folder.

Foreign formats read here (no JAX needed): the authors' Flax checkpoints (orbax OCDBT, orbax
per-array zarr, old flax msgpack), the authors' PyTorch-port ``torch.save`` payloads and our own
training checkpoints (``checkpoints/step_*``). Files are read with safetensors,
``torch.load(weights_only=True)``, msgpack and zarr (tensorstore): no unrestricted unpickling.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig, EncoderConfig, ModelConfig, ObjectiveConfig, SampleConfig

WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "model_raw.safetensors"
CONFIG = "config.json"
ENCODER_DIR = "encoder"
FORMAT_VERSION = 1
FORMATS = ("elflm", "elflm-train", "flax-orbax", "flax-msgpack", "torch-port")


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, unreadable, of an unknown layout or does not fit
    the model; the message names the path and the problem."""


# --------------------------------------------------------------------------- parameter names

# Bare Flax parameters of the decode head and their module names here; the kernels are (in, out).
_DECODE_HEAD = {
    "proj_kernel": "decoder.proj.weight",
    "proj_bias": "decoder.proj.bias",
    "unembed_kernel": "decoder.unembed.weight",
    "unembed_bias": "decoder.unembed.bias",
}


def flax_name(path: str) -> tuple[str, bool]:
    """Our ``state_dict`` name for a ``/``-joined Flax parameter path, and whether the array
    must be transposed (Flax Dense kernels are ``(in, out)``, torch weights ``(out, in)``)."""
    if path in _DECODE_HEAD:
        return _DECODE_HEAD[path], path.endswith("_kernel")
    name = re.sub(r"^blocks_(\d+)/", r"blocks.\1/", path).replace("/", ".")
    if name.endswith(".kernel"):
        return name[: -len("kernel")] + "weight", True
    return name, False


def flax_params_to_state_dict(flat: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map ``{flax path: array}`` (e.g. ``blocks_0/attn/qkv/kernel``) to our ``state_dict``."""
    out = {}
    for path, value in flat.items():
        name, transpose = flax_name(path)
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        out[name] = tensor.t().contiguous() if transpose else tensor
    return out


def port_params_to_state_dict(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a ``pytorch_elf`` ``state_dict`` to ours: identical names except the decode head,
    whose bare ``proj_kernel`` (H, C) / ``unembed_kernel`` (C, V) become transposed Linear weights."""
    out = {}
    for name, value in params.items():
        if name in _DECODE_HEAD:
            ours, transpose = _DECODE_HEAD[name], name.endswith("_kernel")
            out[ours] = value.t().contiguous() if transpose else value
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------- foreign readers


@dataclass
class Foreign:
    """Weights read from a foreign checkpoint: ``ema`` and ``raw`` state dicts in our names
    (``ema`` is None when the file has no EMA copy), the training ``step`` if stored."""

    ema: dict[str, torch.Tensor] | None
    raw: dict[str, torch.Tensor] | None
    step: int | None = None


def _torch_compatible(a) -> np.ndarray:
    """``a`` as a numpy array torch can take: bfloat16 (an ml_dtypes type) becomes float32."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v
    return out


def _orbax_leaves(path: Path) -> tuple[dict[tuple[str, ...], object], bool]:
    """``{tree path: array name in the store, or an inline array}`` and whether arrays are zarr3.
    Newer orbax lists the tree in ``_METADATA``; older orbax wrote a msgpack ``checkpoint`` file
    whose leaves are ``PLACEHOLDER://<name>`` or inline values; the oldest only had per-array
    folders named by the ``.``-joined path."""
    meta = path / "_METADATA"
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
            leaves = {}
            for key, info in data["tree_metadata"].items():
                vm = info.get("value_metadata", {})
                if vm.get("skip_deserialize") or vm.get("value_type") == "None":
                    continue
                keys = tuple(k["key"] for k in info["key_metadata"]) if "key_metadata" in info else ast.literal_eval(key)
                leaves[tuple(map(str, keys))] = ".".join(map(str, keys))
            return leaves, bool(data.get("use_zarr3", False))
        except (ValueError, KeyError, TypeError, SyntaxError) as e:
            raise CheckpointError(f"{meta}: not a readable orbax tree metadata file ({e})") from e
    aggregate = path / "checkpoint"
    if aggregate.is_file():
        leaves = {}
        for key, value in _flat(_read_msgpack(aggregate)).items():
            if isinstance(value, str) and value.startswith(("PLACEHOLDER://", "AGGREGATED://")):
                value = value.split("://", 1)[1]
            leaves[tuple(key.split("/"))] = value
        return leaves, False
    names = [p.name for p in path.iterdir() if (p / ".zarray").is_file() or (p / "zarr.json").is_file()]
    if not names:
        raise CheckpointError(
            f"{path}: an orbax checkpoint needs _METADATA, a 'checkpoint' file or per-array zarr folders; found none"
        )
    return {tuple(n.split(".")): n for n in names}, (path / names[0] / "zarr.json").is_file()


def read_orbax(path: str | Path, collections: tuple[str, ...] = ("ema_params1", "params")) -> dict[str, dict[str, np.ndarray]]:
    """Read the Flax trees ``collections`` (and ``step``) of an orbax checkpoint folder with
    tensorstore: OCDBT (``manifest.ocdbt``) or one zarr folder per array. Returns
    ``{collection: {"/"-joined flax path: array}}`` (absent collections are left out)."""
    import tensorstore as ts

    path = Path(path)
    leaves, zarr3 = _orbax_leaves(path)
    wanted = {k: v for k, v in leaves.items() if k[0] in collections or k == ("step",)}
    if (path / "manifest.ocdbt").is_file():
        kvstore = lambda name: {"driver": "ocdbt", "base": f"file://{path}", "path": name + "/"}
    else:
        kvstore = lambda name: {"driver": "file", "path": f"{path}/{name}/"}
    driver = "zarr3" if zarr3 else "zarr"
    pending = {
        k: ts.open({"driver": driver, "kvstore": kvstore(v)}, open=True, read=True)
        for k, v in wanted.items()
        if isinstance(v, str)
    }
    out: dict[str, dict[str, np.ndarray]] = {}
    for k, v in wanted.items():
        if k in pending:
            try:
                v = pending[k].result().read().result()
            except Exception as e:  # tensorstore raises ValueError / RuntimeError variants
                raise CheckpointError(f"{path}: cannot read array {leaves[k]!r} ({e})") from e
        out.setdefault(k[0], {})["/".join(k[1:])] = np.asarray(v)
    return out


def _read_msgpack(file: Path) -> dict:
    """A flax ``serialization.msgpack_serialize`` tree: ndarray / numpy-scalar ext types and
    ``__msgpack_chunked_array__`` leaves become numpy arrays."""
    try:
        import msgpack
    except ImportError as e:
        raise CheckpointError(f"{file}: reading msgpack checkpoints needs the 'msgpack' package (pip install msgpack)") from e

    def ext(code, data):
        if code not in (1, 3):  # flax: 1 ndarray, 3 numpy scalar
            raise CheckpointError(f"{file}: unsupported msgpack extension type {code}")
        shape, dtype, buf = msgpack.unpackb(data, raw=True)
        dtype = dtype.decode()
        if dtype == "bfloat16":
            import ml_dtypes

            dt = np.dtype(ml_dtypes.bfloat16)
        else:
            dt = np.dtype(dtype)
        return np.frombuffer(buf, dtype=dt).reshape(shape).copy()

    def unchunk(tree):
        if isinstance(tree, dict):
            if "__msgpack_chunked_array__" in tree:
                chunks = tree["chunks"]
                shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
                return np.concatenate([chunks[str(i)] for i in range(len(chunks))]).reshape(shape)
            return {k: unchunk(v) for k, v in tree.items()}
        return tree

    try:
        tree = msgpack.unpackb(file.read_bytes(), ext_hook=ext, raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable flax msgpack checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict):
        raise CheckpointError(f"{file}: a flax msgpack checkpoint holds a dict, found {type(tree).__name__}")
    return unchunk(tree)


def _from_flax_trees(trees: dict[str, dict], where: Path) -> Foreign:
    if "ema_params1" not in trees and "params" not in trees:
        raise CheckpointError(f"{where}: no 'ema_params1' or 'params' tree in this Flax checkpoint")
    def conv(name):
        if name not in trees:
            return None
        return flax_params_to_state_dict({k: _torch_compatible(v) for k, v in trees[name].items()})

    step = trees.get("step")
    step = None if step is None else int(np.asarray(step).reshape(-1)[0])
    return Foreign(ema=conv("ema_params1"), raw=conv("params"), step=step)


def read_flax_msgpack(file: str | Path) -> Foreign:
    """An old flax ``save_checkpoint`` file (one msgpack blob with ``params``, ``ema_params1`` …)."""
    file = Path(file)
    tree = _read_msgpack(file)
    trees = {k: _flat(v) for k, v in tree.items() if k in ("ema_params1", "params") and isinstance(v, dict)}
    if "step" in tree:
        trees["step"] = tree["step"]
    return _from_flax_trees(trees, file)


def _torch_load(file: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers; names the file on failure."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise CheckpointError(
                f"{file}: refused to load: it contains objects other than tensors and plain containers "
                f"(torch.load(weights_only=True) rejected it). Only load files you trust with other tools."
            ) from e
        raise CheckpointError(f"{file}: cannot read torch checkpoint (truncated or corrupted?): {e}") from e


def read_torch_port(file: str | Path) -> Foreign:
    """A ``pytorch_elf`` ``torch.save`` payload: ``params`` (state_dict), ``ema_params1``, ``step`` …"""
    file = Path(file)
    payload = _torch_load(file)
    if not isinstance(payload, dict) or "params" not in payload:
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{file}: not a pytorch_elf checkpoint (expected a dict with 'params' and 'ema_params1', found {keys})"
        )
    for key in ("params", "ema_params1"):
        value = payload.get(key)
        if value is not None and not (isinstance(value, dict) and all(torch.is_tensor(v) for v in value.values())):
            raise CheckpointError(f"{file}: '{key}' must map names to tensors")
    ema = payload.get("ema_params1")
    step = payload.get("step")
    return Foreign(
        ema=port_params_to_state_dict(ema) if ema else None,
        raw=port_params_to_state_dict(payload["params"]),
        step=int(step) if isinstance(step, int) else None,
    )


# --------------------------------------------------------------------------- format detection

_STEP = re.compile(r"^(?:checkpoint|step)_(\d+)$")


def _latest_step(folder: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name))]
    return max(found)[1] if found else None


def detect_format(path: str | Path) -> tuple[str, Path]:
    """``(format, path)`` of a checkpoint; a run folder resolves to its newest ``checkpoint_<N>`` /
    ``checkpoints/step_<N>``. Formats: ``elflm`` (ours), ``elflm-train`` (our training
    checkpoint), ``flax-orbax``, ``flax-msgpack``, ``torch-port``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
            return "elflm", path
        if (path / "trainer_state.json").is_file():
            return "elflm-train", path
        if any((path / n).exists() for n in ("_METADATA", "manifest.ocdbt", "checkpoint")):
            return "flax-orbax", path
        if (path / "_CHECKPOINT_METADATA").exists():  # a CheckpointManager step: the tree is in an item folder
            items = [p for p in path.iterdir() if (p / "_METADATA").is_file()]
            return "flax-orbax", items[0] if len(items) == 1 else path
        inner = _latest_step(path) or ((path / "checkpoints").is_dir() and _latest_step(path / "checkpoints"))
        if inner:
            return detect_format(inner)
        weights = [p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".msgpack")]
        if len(weights) == 1:
            return detect_format(weights[0])
        if (path / WEIGHTS).is_file():
            raise CheckpointError(f"{path}: has {WEIGHTS} but no {CONFIG}; an elflm model folder needs both")
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
        raise CheckpointError(
            f"{path}: unknown checkpoint layout (found: {listing}); expected an elflm folder ({CONFIG} + {WEIGHTS}), "
            "a training checkpoint (trainer_state.json), an orbax checkpoint_<step> folder, a flax msgpack file "
            "or a pytorch_elf torch.save file"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        return "torch-port", path
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "flax-msgpack", path
    kind = f"starts with {head!r}"
    if path.suffix == ".safetensors":
        kind = "a safetensors file (pass the folder holding it and its config.json)"
    raise CheckpointError(
        f"{path}: unknown checkpoint file format ({kind}); expected a pytorch_elf torch.save zip file or a flax msgpack file"
    )


# --------------------------------------------------------------------------- configs


def _dataclass_from(cls, values: dict, where: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} field(s) {unknown}")
    try:
        return cls(**values)
    except TypeError as e:
        raise CheckpointError(f"{where}: bad {cls.__name__} ({e})") from e


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
        encoder_dim=C, vocab_size=V, max_length=int(max_length), hidden_size=H, depth=depth,
        num_heads=H // head_dim, mlp_ratio=ratio, bottleneck_dim=bottleneck, num_time_tokens=n_time,
        num_self_cond_cfg_tokens=count("self_cond_cfg_tokens"), num_mode_tokens=count("mode_tokens"),
        self_cond="self_cond_proj.weight" in sd,
    )


# Defaults of the official ``Config`` / ``SamplingConfig`` for fields a dumped config.yml omits.
_OFFICIAL_DEFAULTS = dict(
    max_length=128, max_input_length=None, pad_token="pad", encoder_model_name="t5-small", encoder_checkpoint=None,
    tokenizer_name=None, latent_mean=0.0, latent_std=1.0, denoiser_p_mean=0.8, denoiser_p_std=0.8,
    denoiser_noise_scale=1.0, t_eps=0.05, time_schedule="logit_normal", decoder_prob=0.5, decoder_noise_scale=1.0,
    decoder_p_mean=0.8, decoder_p_std=0.8, label_drop_prob=0.0, self_cond_prob=0.5, self_cond_cfg_min=0.5,
    self_cond_cfg_max=5.0,
)
# First entries of the official uncond / cond sampling config files.
_OFFICIAL_SAMPLING = {
    "uncond": dict(sampling_method="sde", num_sampling_steps=[32], cfgs=[1], sde_gamma=1.5, self_cond_cfg_scales=[3],
                   time_schedule="logit_normal"),
    "cond": dict(sampling_method="ode", num_sampling_steps=[64], cfgs=[2], sde_gamma=0.0, self_cond_cfg_scales=[1],
                 time_schedule="logit_normal"),
}
_SDE64 = {**_OFFICIAL_SAMPLING["uncond"], "num_sampling_steps": [64], "sde_gamma": 1.0}  # ELF-M / ELF-L defaults
_OFFICIAL_ENCODER = "embedded-language-flows/t5_small_encoder_jax/t5_small_encoder_jax.pkl"
# Settings of the published models (their training YAMLs), for Hub snapshots without a config.
_OFFICIAL_HUB = {
    "ELF-B-owt": dict(max_length=1024),
    "ELF-M-owt": dict(max_length=1024, sampling_configs=[_SDE64]),
    "ELF-L-owt": dict(max_length=1024, sampling_configs=[_SDE64]),
    "ELF-B-de-en": dict(max_length=128, max_input_length=64, pad_token="eos", decoder_noise_scale=1.0, label_drop_prob=0.1),
    "ELF-B-xsum": dict(max_length=1088, max_input_length=1024, pad_token="eos", decoder_noise_scale=1.0, label_drop_prob=0.1),
}
_OFFICIAL_COMMON = dict(
    encoder_model_name="t5-small", encoder_checkpoint=_OFFICIAL_ENCODER, latent_mean=0.0, latent_std=0.2,
    denoiser_p_mean=-1.5, denoiser_p_std=0.8, denoiser_noise_scale=2.0, t_eps=0.05, time_schedule="logit_normal",
    decoder_prob=0.2, decoder_noise_scale=5.0, decoder_p_mean=0.8, decoder_p_std=0.8, self_cond_prob=0.5,
)


def official_hub_config(repo_id: str) -> dict | None:
    """The official training settings of a published ``embedded-language-flows/ELF-*`` model
    (``-torch`` variants included), or None for other repositories."""
    org, _, name = repo_id.partition("/")
    name = name.removesuffix("-torch")
    if org != "embedded-language-flows" or name not in _OFFICIAL_HUB:
        return None
    return {**_OFFICIAL_COMMON, **_OFFICIAL_HUB[name]}


@dataclass
class Settings:
    """Everything ``config.json`` stores besides the model sizes. Paths in ``encoder`` are
    absolute in memory and relative to the model folder on disk."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    source: dict = field(default_factory=dict)


    @classmethod
    def from_config(cls, cfg, source: dict | None = None) -> "Settings":
        """The settings of a training :class:`~elflm.config.Config`."""
        return cls(cfg.encoder, cfg.data, cfg.objective, cfg.sample, dict(source or {}))


SECTIONS = {"encoder": EncoderConfig, "data": DataConfig, "objective": ObjectiveConfig, "sample": SampleConfig}


def settings_from_official(cfg: dict) -> tuple[Settings, int]:
    """Our settings and ``max_length`` from an official config (``config.yml`` dumped by the
    authors' ``train.py`` or their input YAML; official field names, official defaults)."""
    c = {**_OFFICIAL_DEFAULTS, **cfg}
    objective = ObjectiveConfig(
        latent_mean=float(c["latent_mean"]), latent_std=float(c["latent_std"]),
        noise_scale=float(c["denoiser_noise_scale"]), p_mean=float(c["denoiser_p_mean"]),
        p_std=float(c["denoiser_p_std"]), t_eps=float(c["t_eps"]), time_schedule=c["time_schedule"],
        decoder_prob=float(c["decoder_prob"]), decoder_noise_scale=float(c["decoder_noise_scale"]),
        decoder_p_mean=float(c["decoder_p_mean"]), decoder_p_std=float(c["decoder_p_std"]),
        self_cond_prob=float(c["self_cond_prob"]), self_cond_cfg_min=float(c["self_cond_cfg_min"]),
        self_cond_cfg_max=float(c["self_cond_cfg_max"]), label_drop_prob=float(c["label_drop_prob"]),
        pad_token=c["pad_token"],
    )
    conditional = c["max_input_length"] is not None
    s = {**_OFFICIAL_SAMPLING["cond" if conditional else "uncond"], **(c.get("sampling_configs") or [{}])[0]}
    sample = SampleConfig(
        method=s["sampling_method"], steps=int(s["num_sampling_steps"][0]), grid=s["time_schedule"],
        gamma=float(s.get("sde_gamma") or 0.0), w=float(s["self_cond_cfg_scales"][0]), cfg_scale=float(s["cfgs"][0]),
        noise_scale=objective.noise_scale, p_mean=objective.p_mean, p_std=objective.p_std, t_eps=objective.t_eps,
    )
    tokenizer = c["tokenizer_name"] or c["encoder_model_name"]
    encoder = EncoderConfig(
        kind="t5", name_or_path=c["encoder_model_name"], weights=c["encoder_checkpoint"], tokenizer=tokenizer,
        latent_mean=objective.latent_mean, latent_std=objective.latent_std,
    )
    data = DataConfig(max_length=int(c["max_length"]), max_input_length=c["max_input_length"], pad_token=c["pad_token"],
                      tokenizer=tokenizer)
    return Settings(encoder, data, objective, sample), int(c["max_length"])


def _read_yaml(file: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{file}: cannot read YAML config ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: a config must be a mapping of fields")
    return data


def _find_official_config(ckpt: Path) -> Path | None:
    """``config.yml`` beside an official checkpoint: in it or in the run folder above it
    (``run/checkpoint_N`` or ``run/checkpoint_N/<item>``)."""
    start = ckpt if ckpt.is_dir() else ckpt.parent
    for folder in (start, start.parent, start.parent.parent):
        for name in ("config.yml", "config.yaml"):
            if (folder / name).is_file():
                return folder / name
    return None


# --------------------------------------------------------------------------- our format


def _check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:6]}{' …' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}")
    if shapes:
        problems.append(f"shape mismatch (file != model) {shapes[:6]}")
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model config: " + "; ".join(problems))


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError on bad header / truncated data
        raise CheckpointError(f"{file}: cannot read safetensors weights (truncated or corrupted?): {e}") from e


def _state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _encoder_paths(enc: EncoderConfig, resolve) -> EncoderConfig:
    """``enc`` with ``weights`` / ``tokenizer`` passed through ``resolve`` (relative <-> absolute)."""
    return replace(enc, weights=resolve(enc.weights), tokenizer=resolve(enc.tokenizer))


def save_pretrained(
    model,
    directory: str | Path,
    *,
    raw_state_dict: dict[str, torch.Tensor] | None = None,
    settings: Settings | None = None,
    encoder="auto",
) -> Path:
    """Write ``model`` (its current weights, normally the EMA weights) as an elflm folder:
    ``model.safetensors``, ``config.json`` and, with ``raw_state_dict``, ``model_raw.safetensors``.
    ``settings`` defaults to those the model was loaded with (``model.pretrained``).
    ``encoder``: a :class:`~elflm.encoder.TextEncoder` to copy in as ``encoder/``; ``"auto"``
    copies the attached ``model.encoder`` when its weights are a local file or folder (so the
    folder does not depend on it); ``False`` only describes the encoder in ``config.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = settings or getattr(model, "pretrained", None) or Settings()
    enc_cfg = settings.encoder
    if encoder == "auto":
        local = enc_cfg.weights is not None and Path(enc_cfg.weights).exists()
        encoder = getattr(model, "encoder", None) if local else None
    if encoder is not None and encoder is not False:
        path = str(encoder.save_pretrained(directory / ENCODER_DIR))
        enc_cfg = replace(enc_cfg, weights=path, tokenizer=path if encoder.tokenizer is not None else enc_cfg.tokenizer)
    save_file(_state_dict_for_saving(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    if raw_state_dict is not None:
        _check_state_dict(model, raw_state_dict, "raw_state_dict")
        raw = {k: v.detach().to("cpu").contiguous() for k, v in raw_state_dict.items()}
        save_file(raw, str(directory / RAW_WEIGHTS), metadata={"format": "pt"})
    here = directory.resolve()

    def inside(p):  # paths into the folder are stored relative to it
        if p and Path(p).exists() and Path(p).resolve().is_relative_to(here):
            return os.path.relpath(Path(p).resolve(), here)
        return p

    config = {
        "format": "elflm",
        "version": FORMAT_VERSION,
        "model": asdict(model.config),
        "encoder": asdict(_encoder_paths(enc_cfg, inside)),
        "data": asdict(replace(settings.data, max_length=model.config.max_length, tokenizer=inside(enc_cfg.tokenizer_name))),
        "objective": asdict(settings.objective),
        "sample": asdict(settings.sample),
        "source": dict(settings.source),
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> tuple[ModelConfig, Settings]:
    """Model config and settings of an elflm folder's ``config.json``; encoder paths that exist
    relative to the folder become absolute."""
    directory = Path(directory)
    file = directory / CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read config ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("format") != "elflm" or "model" not in cfg:
        raise CheckpointError(f"{file}: not an elflm config (expected \"format\": \"elflm\" and a \"model\" section)")
    if cfg.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: written by a newer elflm (format version {cfg['version']} > {FORMAT_VERSION}); upgrade elflm"
        )
    where = str(file)
    sections = {name: _dataclass_from(cls, cfg.get(name) or {}, where) for name, cls in SECTIONS.items()}
    local = lambda p: str(directory / p) if p is not None and (directory / p).exists() else p
    sections["encoder"] = _encoder_paths(sections["encoder"], local)
    sections["data"] = replace(sections["data"], tokenizer=local(sections["data"].tokenizer))
    return _dataclass_from(ModelConfig, cfg["model"], where), Settings(**sections, source=cfg.get("source") or {})


def _read_training_checkpoint(path: Path, which: str) -> tuple[ModelConfig, Settings, Foreign]:
    """Our trainer's ``checkpoints/step_*`` folder: ``ema.safetensors``, ``model.safetensors`` (raw),
    ``trainer_state.json`` (``model_config``, ``step``) and ``config.yaml``."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        model_cfg = _dataclass_from(ModelConfig, state["model_config"], str(state_file))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{state_file}: cannot read the training state ({e})") from e
    clean = lambda sd: {k.replace("._orig_mod", ""): v for k, v in sd.items()}  # per-block torch.compile names
    has_ema = (path / "ema.safetensors").is_file()
    ema = clean(_load_safetensors(path / "ema.safetensors")) if has_ema and which != "raw" else None
    raw = clean(_load_safetensors(path / WEIGHTS)) if which != "ema" or not has_ema else None
    settings = Settings(source={"format": "elflm-train", "path": str(path), "step": state.get("step")})
    if (path / "config.yaml").is_file():
        from .config import ConfigError, load_config

        try:
            run = load_config(path / "config.yaml")
        except ConfigError as e:
            raise CheckpointError(f"{path / 'config.yaml'}: {e}") from e
        settings = Settings.from_config(run, settings.source)
    return model_cfg, settings, Foreign(ema=ema, raw=raw, step=state.get("step"))


def _read_elflm(path: Path, which: str) -> tuple[ModelConfig, Settings, Foreign]:
    model_cfg, settings = read_config(path)
    has_raw = (path / RAW_WEIGHTS).is_file()
    if which == "raw" and not has_raw:
        raise CheckpointError(f"{path}: no raw weights ({RAW_WEIGHTS}) in this model folder")
    ema = _load_safetensors(path / WEIGHTS) if which != "raw" else None
    raw = _load_safetensors(path / RAW_WEIGHTS) if which != "ema" and has_raw else None
    return model_cfg, settings, Foreign(ema=ema, raw=raw, step=settings.source.get("step"))


def _read_foreign(fmt: str, path: Path, which: str) -> Foreign:
    if fmt == "flax-orbax":
        trees = read_orbax(path, {"ema": ("ema_params1",), "raw": ("params",), "both": ("ema_params1", "params")}[which])
        if "ema_params1" not in trees and "params" not in trees:
            trees.update(read_orbax(path, ("params",)))
        if "step" in trees:
            trees["step"] = trees["step"][""]
        return _from_flax_trees(trees, path)
    foreign = read_flax_msgpack(path) if fmt == "flax-msgpack" else read_torch_port(path)
    if which == "ema" and foreign.ema is not None:
        foreign.raw = None
    if which == "raw":
        foreign.ema = None
    return foreign


def read_checkpoint(
    path: str | Path,
    format: str | None = None,
    config: str | Path | dict | None = None,
    max_length: int | None = None,
    which: str = "ema",
) -> tuple[ModelConfig, Settings, Foreign]:
    """Read any supported checkpoint into ``(model config, settings, weights)``. ``which``:
    ``ema`` (the EMA weights, or the raw ones when the source has no EMA copy), ``raw`` or ``both``.

    Official checkpoints carry no architecture sizes: they are inferred from the shapes;
    ``max_length`` and the other settings come from ``config`` (an official YAML path or dict),
    else a ``config.yml`` beside the checkpoint or in its run folder; ``max_length`` overrides."""
    if which not in ("ema", "raw", "both"):
        raise ValueError(f"which must be 'ema', 'raw' or 'both', got {which!r}")
    if format is not None and format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; expected one of {FORMATS}")
    path = Path(path)
    detected, resolved = detect_format(path)
    if format is not None and format != detected:
        detected, resolved = format, path
    if detected in ("elflm", "elflm-train"):
        model_cfg, settings, weights = (_read_elflm if detected == "elflm" else _read_training_checkpoint)(resolved, which)
        return (replace(model_cfg, max_length=max_length) if max_length else model_cfg), settings, weights
    weights = _read_foreign(detected, resolved, which)
    if isinstance(config, dict):
        official, cfg_src = config, "given settings"
    else:
        cfg_file = Path(config) if config is not None else _find_official_config(resolved)
        official = _read_yaml(cfg_file) if cfg_file is not None else {}
        cfg_src = str(cfg_file) if cfg_file is not None else None
    if max_length is None and "max_length" not in official:
        raise CheckpointError(
            f"{resolved}: the official checkpoint does not store max_length and no config.yml was found beside it; "
            "pass the training YAML (--config / config=) or --max-length"
        )
    settings, official_max_length = settings_from_official(official)
    settings.source = {"format": detected, "path": str(resolved), "step": weights.step, "config": cfg_src,
                       "weights": "ema" if weights.ema is not None else "raw"}
    rel = settings.encoder.weights
    if rel is not None and not isinstance(config, dict) and cfg_src is not None and not Path(rel).is_absolute():
        found = [d / rel for d in (Path(cfg_src).parent, Path(cfg_src).parent.parent) if (d / rel).is_file()]
        if found:  # the official run resolved it against its working folder
            settings.encoder = replace(settings.encoder, weights=str(found[0]))
    sd = weights.ema if weights.ema is not None else weights.raw
    model_cfg = infer_model_config(sd, max_length or official_max_length, str(resolved))
    return model_cfg, settings, weights


def _build_model(model_cfg: ModelConfig, sd: dict[str, torch.Tensor], where: str):
    from .model import ELF

    model = ELF(model_cfg)
    _check_state_dict(model, sd, where)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- conversion


def convert(
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
    """Convert a checkpoint (format detected, or forced with ``format``) into an elflm folder
    ``output``: ``model.safetensors`` holds the EMA weights (the raw ones when the file has no
    EMA), ``raw=True`` adds ``model_raw.safetensors``. ``encoder`` (the authors' encoder pickle
    or an HF encoder folder / Hub id) is converted and copied in as ``encoder/`` with
    ``tokenizer`` (HF tokenizer folder or Hub id; default: the config's, ``t5-small``)."""
    model_cfg, settings, weights = read_checkpoint(src, format, config, max_length, which="both" if raw else "ema")
    if raw and (weights.raw is None or weights.ema is None):
        raise CheckpointError(f"{src}: raw=True needs both EMA and raw weights in the source")
    model = _build_model(model_cfg, weights.ema if weights.ema is not None else weights.raw, str(src))
    raw_sd = weights.raw if raw else None
    enc = False
    if encoder is not None:
        tokenizer = str(tokenizer) if tokenizer else settings.encoder.tokenizer
        settings.encoder = replace(settings.encoder, weights=str(encoder), tokenizer=tokenizer)
        enc = build_text_encoder(settings)
    return save_pretrained(model, output, raw_state_dict=raw_sd, settings=settings, encoder=enc)


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``elflm convert``."""
    p.add_argument("src", help="checkpoint: orbax checkpoint_<step> folder or run folder, flax msgpack file, "
                               "pytorch_elf torch.save file, or an elflm training checkpoint")
    p.add_argument("--output", "-o", required=True, help="elflm model folder to write")
    p.add_argument("--format", choices=FORMATS, default=None, help="force the source format (default: detected)")
    p.add_argument("--config", default=None, help="the official training YAML (default: config.yml beside the checkpoint)")
    p.add_argument("--max-length", type=int, default=None, help="the model's max_length (official checkpoints do not store it)")
    p.add_argument("--raw", action="store_true", help="also write the raw (non-EMA) weights as model_raw.safetensors")
    p.add_argument("--encoder", default=None, help="encoder to copy in: official t5_small_encoder_jax.pkl or an HF encoder folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer for --encoder (HF name or folder; default from the config)")


def run_convert(a) -> int:
    """``elflm convert``: convert and print a one-line summary."""
    out = convert(a.src, a.output, a.format, config=a.config, max_length=a.max_length, raw=a.raw,
                  encoder=a.encoder, tokenizer=a.tokenizer)
    model_cfg, settings = read_config(out)
    src = settings.source
    print(f"converted {src.get('format')} checkpoint {a.src} (step {src.get('step')}, {src.get('weights')} weights) -> {out}: "
          f"depth {model_cfg.depth}, hidden {model_cfg.hidden_size}, heads {model_cfg.num_heads}, "
          f"C {model_cfg.encoder_dim}, V {model_cfg.vocab_size}, max_length {model_cfg.max_length}")
    return 0


# --------------------------------------------------------------------------- Hub and from_pretrained

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(str(name))) and not Path(name).exists()


def cache_root() -> Path:
    """Where converted Hub checkpoints are kept: ``$ELFLM_CACHE`` or ``~/.cache/elflm``."""
    return Path(os.environ.get("ELFLM_CACHE") or Path.home() / ".cache" / "elflm")


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_cache(cache_dir) -> str | None:
    return str(cache_dir) if cache_dir else os.environ.get("HF_HUB_CACHE")


def _no_hub(what: str, offline: bool, cache_dir, err: Exception) -> CheckpointError:
    from huggingface_hub import constants

    cache = _hub_cache(cache_dir) or constants.HF_HUB_CACHE
    cause = err.__cause__ or err.__context__ or err
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else f"the Hub cannot be reached ({type(cause).__name__}: {cause})"
    return CheckpointError(
        f"cannot get {what} from the Hugging Face Hub: {why} and it is not in the local cache {cache}. "
        "Either connect to the internet and retry; or download it once on a connected machine "
        f"(`hf download {what.split(':')[0]}`), point HF_HUB_CACHE (or HF_HOME) at that cache and set HF_HUB_OFFLINE=1; "
        "or pass a local path instead of a Hub id (a folder written by `elflm convert` / save_pretrained, "
        "or an official checkpoint folder or file)."
    )


def hub_download(
    repo_id: str, filename: str | None = None, *, revision: str | None = None, cache_dir=None, offline: bool | None = None
) -> Path:
    """Snapshot folder of a Hub model repository (or one ``filename`` in it), cached by
    huggingface_hub. Offline (``offline=True`` or ``HF_HUB_OFFLINE=1``) only the cache is used;
    a missing network fails at once with a message saying how to work offline."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = _offline(offline)
    kw = dict(revision=revision, cache_dir=_hub_cache(cache_dir), local_files_only=offline, etag_timeout=10)
    what = f"{repo_id}:{filename}" if filename else repo_id
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, **kw))
        return Path(snapshot_download(repo_id, **kw))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise CheckpointError(f"{what}: not found on the Hugging Face Hub or not accessible ({type(e).__name__}: {e})") from e
    except LocalEntryNotFoundError as e:
        raise _no_hub(what, offline, cache_dir, e) from e
    except OSError as e:  # connection errors of the HTTP client
        raise _no_hub(what, offline, cache_dir, e) from e


def hub_model_folder(
    repo_id: str, *, revision=None, cache_dir=None, offline=None, config=None, max_length=None, raw: bool = False
) -> Path:
    """A local elflm folder for a Hub model: the snapshot itself when it is in our format, else
    the snapshot converted once into ``cache_root()/converted/models--org--name/<commit>``."""
    snapshot = hub_download(repo_id, revision=revision, cache_dir=cache_dir, offline=offline)
    fmt, resolved = detect_format(snapshot)
    if fmt == "elflm":
        return resolved
    out = cache_root() / "converted" / ("models--" + repo_id.replace("/", "--")) / snapshot.name
    if (out / CONFIG).is_file() and (not raw or (out / RAW_WEIGHTS).is_file()):
        return out
    if config is None and _find_official_config(resolved) is None:
        config = official_hub_config(repo_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{snapshot.name}-", dir=out.parent))
    try:
        convert(resolved, tmp, config=config, max_length=max_length, raw=raw)
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


def build_text_encoder(settings: Settings, device=None, *, cache_dir=None, offline: bool | None = None):
    """The frozen :class:`~elflm.encoder.TextEncoder` that ``settings.encoder`` describes:
    ``weights`` ending in ``.pkl`` → the authors' encoder pickle (local, or ``org/repo/file`` on the
    Hub, e.g. the official ``embedded-language-flows/t5_small_encoder_jax/t5_small_encoder_jax.pkl``);
    other ``weights`` → an HF encoder folder / Hub id; no ``weights`` → ``name_or_path``.
    The latent mean/std fall back to the objective's."""
    from .encoder import TextEncoder, build_encoder

    e, o = settings.encoder, settings.objective
    latent = dict(latent_mean=o.latent_mean if e.latent_mean is None else e.latent_mean,
                  latent_std=o.latent_std if e.latent_std is None else e.latent_std)
    if e.weights is not None and str(e.weights).endswith(".pkl"):
        pkl, parts = Path(e.weights), str(e.weights).split("/")
        if not pkl.exists() and len(parts) >= 3 and is_hub_id("/".join(parts[:2])):
            pkl = hub_download("/".join(parts[:2]), "/".join(parts[2:]), cache_dir=cache_dir, offline=offline)
        enc = TextEncoder.from_jax_pickle(pkl, tokenizer=e.tokenizer_name, **latent)
    else:
        enc = build_encoder(e, **latent)
    return enc if device is None else enc.to(device)


def attach(model, encoder, settings: Settings):
    """Attach the frozen ``encoder``, its ``tokenizer`` and the checkpoint ``settings``
    (``model.pretrained``) to ``model`` as plain attributes: they are not submodules, so they
    stay out of ``state_dict()`` and ``model.to()``."""
    vars(model).update(encoder=encoder, tokenizer=getattr(encoder, "tokenizer", None), pretrained=settings)
    return model


def load_pretrained(
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
    """Load an ELF for sampling from a local checkpoint (any supported format) or a Hub id.

    Returns ``(model, encoder, settings)``: the model in eval mode on ``device`` with the EMA
    weights (``raw=True``: the raw ones), the frozen encoder with its tokenizer (``encoder``:
    True = as the checkpoint describes, False = none, a ``TextEncoder``, or encoder weights to
    use instead: the authors' pickle or an HF encoder folder / Hub id; ``tokenizer`` replaces
    its tokenizer folder / Hub id), and :class:`Settings` (objective incl. latent mean/std, sampling defaults,
    data, source). The encoder, tokenizer and settings are also attached to the model."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and is_hub_id(str(name_or_path)):
        path = hub_model_folder(str(name_or_path), revision=revision, cache_dir=cache_dir, offline=offline,
                                config=config, max_length=max_length, raw=raw)
    elif not path.exists():
        raise CheckpointError(f"{name_or_path}: no such file or folder, and not a Hub id of the form 'org/name'")
    model_cfg, settings, weights = read_checkpoint(path, config=config, max_length=max_length, which="raw" if raw else "ema")
    sd = weights.raw if raw else (weights.ema if weights.ema is not None else weights.raw)
    model = _build_model(model_cfg, sd, str(path)).to(device=device, dtype=dtype)
    enc = None
    if encoder is not False and encoder is not None:
        from .encoder import TextEncoder

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
                f"{path}: the encoder width {enc.dim} does not match the model's encoder_dim {model_cfg.encoder_dim}"
            )
    return attach(model, enc, settings), enc, settings


def push_to_hub(model_or_folder, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload ELF model", **save_kwargs) -> str:
    """Upload an elflm folder, or a model (written with :func:`save_pretrained` and
    ``save_kwargs`` into a temporary folder first), to the Hub model repository ``repo_id``
    (created if needed). Returns the commit URL. Credentials: ``token`` or the saved login."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_folder, torch.nn.Module):
            folder = save_pretrained(model_or_folder, tmp, **save_kwargs)
        else:
            folder = Path(model_or_folder)
            read_config(folder)  # refuse to upload something that is not an elflm folder
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
