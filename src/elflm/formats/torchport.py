"""The authors' PyTorch port (the ``pytorch_elf`` branch, and the ``distillation`` branch that
writes the same payload, e.g. ``embedded-language-flows/ELF-B-PD-owt-torch``): a ``torch.save``
dict with ``params`` (the module ``state_dict``), ``ema_params1``, ``opt_state``, ``lr_scheduler``,
``step``, ``epoch``, ``dropout_rng``, ``grad_accum_buffers`` (golden README §7), in a file
``checkpoint_<step>`` (no extension) of the run folder; read with ``torch.load(weights_only=True)``
and its parameter names mapped to ours."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from .flax import DECODE_HEAD

WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # what torch.compile and DDP put before the names


def unwrapped_name(name: str) -> str:
    """``name`` without the ``torch.compile`` / DDP wrapper prefixes (the ``distillation`` branch
    strips ``_orig_mod.`` from the files it loads)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def port_params_to_state_dict(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a ``pytorch_elf`` ``state_dict`` to ours: identical names (wrapper prefixes removed)
    except the decode head, whose bare ``proj_kernel`` (H, C) / ``unembed_kernel`` (C, V) become
    transposed Linear weights."""
    out = {}
    for name, value in params.items():
        name = unwrapped_name(name)
        if name in DECODE_HEAD:
            ours, transpose = DECODE_HEAD[name], name.endswith("_kernel")
            out[ours] = value.t().contiguous() if transpose else value
        else:
            out[name] = value
    return out


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


def read_port_weights(file: str | Path):
    """``(ema, raw, step)`` of a ``pytorch_elf`` payload: state dicts in our names (``ema`` None
    when the file has no EMA copy) and the step."""
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
    return (
        port_params_to_state_dict(ema) if ema else None,
        port_params_to_state_dict(payload["params"]),
        int(step) if isinstance(step, int) else None,
    )
