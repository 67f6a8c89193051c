"""The unofficial PyTorch Lightning reproduction's checkpoints (``pytorch_lightning/`` of the public
repository tangyayan/ELF-pytorch; Hub ``Ugness/elf-torch``: ``last.ckpt`` and
``checkpoints/checkpoint_epochNN_stepNNNNNNNN.ckpt``), read without Lightning and without running
anything the file names.

A checkpoint is a ``torch.save`` zip archive whose pickle holds ``state_dict`` (the network under
``model.`` in the ``pytorch_elf`` parameter names, the frozen T5 encoder under ``encoder.``, as a
``transformers.T5EncoderModel`` inside a wrapper: ``encoder.model.``), ``ema`` (``{"decay",
"shadow": {parameter name: tensor}}``), the optimizer step ``_my_opt_step``, Lightning's
bookkeeping (``epoch``, ``global_step``, ``loops``, ``callbacks``, ``optimizer_states`` …) and
perhaps ``hyper_parameters`` holding their ``Config`` objects.

Why not ``torch.load``: ``weights_only=True`` refuses such a file as soon as it names a class of
theirs (``configs.config.Config``), and without it unpickling may import and call anything the file
names. :class:`SafeUnpickler` reads the pickle itself: tensors are rebuilt by our own code from the
archive's storages (read lazily, only for the tensors asked for), plain containers
(``OrderedDict``, ``torch.Size``, sets) are built, and every other global becomes an inert
:class:`Placeholder`: it is never imported nor called, it only records its name and the data the
file gives it, so their config objects read as plain data. Storage references other than tensor
storages are refused.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from .torchport import port_params_to_state_dict

MODEL_PREFIX = "model."
ENCODER_PREFIX = "encoder."
LAST = "last.ckpt"
_EPOCH_FILE = re.compile(r"checkpoint_epoch(\d+)_step(\d+)\.ckpt")
_STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


# --------------------------------------------------------------------------- the restricted unpickler


class Placeholder:
    """Stands for an object of a class (or the result of a function) that a pickle names but that
    is never imported or called: ``qualname`` is ``module.name``; ``args`` / ``kwargs`` what the
    file passed to it, ``state`` what it set on it, ``items`` / ``list`` what it added."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list.append(value)

    def extend(self, values):
        self.list.extend(values)

    def fields(self) -> dict:
        """What the file gave the object as named values: its state (``__dict__``), items and
        keyword arguments."""
        state = self.state[1] if isinstance(self.state, tuple) and len(self.state) == 2 else self.state
        out = dict(state) if isinstance(state, dict) else {}
        if isinstance(self.state, tuple) and len(self.state) == 2 and isinstance(self.state[0], dict):
            out.update(self.state[0])
        return {**out, **self.items, **self.kwargs}

    def __repr__(self) -> str:
        return f"<placeholder {self.qualname}>"


def _placeholder(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"qualname": f"{module}.{name}", "__module__": __name__})


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


class StoredTensor:
    """A tensor of the archive, not read yet: :meth:`SafeUnpickler.tensor` reads it."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a tensor takes no extra state here")


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"bad tensor {what} {value!r}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise pickle.UnpicklingError("a tensor must be rebuilt from an archive storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    return StoredTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, StoredTensor):
        raise pickle.UnpicklingError("a parameter must wrap a tensor")
    return data


class _TensorType:
    """``torch.Tensor`` / ``nn.Parameter`` named by ``_rebuild_from_type_v2``: a tag, not callable."""


def _rebuild_from_type(func, new_type, args, state):
    if not isinstance(new_type, _TensorType) or func not in (_rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError("only plain tensors and parameters are rebuilt")
    return func(*args)


def _reconstructor(cls, base, state):  # copyreg._reconstructor, of protocol 0/1 pickles
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)):
        raise pickle.UnpicklingError("copyreg._reconstructor is only allowed for placeholder classes")
    return cls(state)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorType(),
    ("torch.nn.parameter", "Parameter"): _TensorType(),
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): _reconstructor,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGES.items()},
    **{("torch.storage", name): _StorageType(dtype) for name, dtype in _STORAGES.items()},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles the ``data.pkl`` of a ``torch.save`` archive: the allow-list above is built,
    any other global becomes a :class:`Placeholder` class (never imported), persistent ids must be
    tensor storages of the archive. ``names`` collects the placeholders' qualified names."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, source: str):
        self.archive, self.prefix, self.source = archive, prefix, source
        self.names: set[str] = set()
        self._read: dict[str, torch.Tensor] = {}
        super().__init__(archive.open(prefix + "data.pkl"))

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        self.names.add(f"{module}.{name}")
        return _placeholder(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"only tensor storages may be referenced, not {pid!r}")
        _, kind, key, _, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise pickle.UnpicklingError(f"bad storage reference {pid!r}")
        return _Storage(key, kind.dtype, numel)

    def tensor(self, stored: StoredTensor) -> torch.Tensor:
        """Read ``stored`` from the archive (each storage once) into a tensor of its own memory."""
        s = stored.storage
        if s.key not in self._read:
            name = f"{self.prefix}data/{s.key}"
            try:
                data = bytearray(self.archive.read(name))
            except KeyError as e:
                raise CheckpointError(f"{self.source}: the archive has no storage {name!r}") from e
            if s.dtype.itemsize and len(data) % s.dtype.itemsize:
                raise CheckpointError(f"{self.source}: storage {name!r} of {len(data)} bytes is not {s.dtype} data")
            self._read[s.key] = torch.frombuffer(data, dtype=s.dtype) if data else torch.empty(0, dtype=s.dtype)
        try:
            return torch.as_strided(self._read[s.key], stored.size, stored.stride, stored.offset).clone()
        except RuntimeError as e:
            raise CheckpointError(f"{self.source}: a tensor lies outside its storage {s.key!r} ({e})") from e


def open_archive(file: str | Path) -> tuple[object, SafeUnpickler]:
    """The unpickled payload of a ``torch.save`` zip file (tensors as :class:`StoredTensor`, read
    with the returned unpickler's :meth:`~SafeUnpickler.tensor`)."""
    file = Path(file)
    try:
        archive = zipfile.ZipFile(file)
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{file}: not a torch.save zip archive ({e})") from e
    pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(f"{file}: not a torch.save archive (no <name>/data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() != b"little":
        raise CheckpointError(f"{file}: big-endian torch archives are not supported")
    unpickler = SafeUnpickler(archive, prefix, str(file))
    try:
        payload = unpickler.load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{file}: refused or unreadable pickle ({type(e).__name__}: {e})") from e
    return payload, unpickler


# --------------------------------------------------------------------------- the Lightning layout


def is_lightning(file: str | Path) -> bool:
    """Whether ``file`` is a Lightning checkpoint (a ``torch.save`` archive of a dict with a
    ``state_dict`` and Lightning's or the reproduction's own keys); reads no tensor data."""
    try:
        payload, _ = open_archive(file)
    except CheckpointError:
        return False
    keys = {"pytorch-lightning_version", "ema", "_my_opt_step", "global_step"}
    return isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict) and bool(keys & set(payload))


def find_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of a Lightning output folder: ``last.ckpt``, else the
    ``checkpoint_epochNN_stepNNNNNNNN.ckpt`` of the highest step."""
    if (folder / LAST).is_file():
        return folder / LAST
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := _EPOCH_FILE.fullmatch(p.name))]
    return max(found)[1] if found else None


def _tensors(unpickler: SafeUnpickler, mapping, where: str, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in mapping.items():
        if not isinstance(k, str) or not k.startswith(prefix):
            continue
        if not isinstance(v, StoredTensor):
            raise CheckpointError(f"{where}: {k!r} is a {type(v).__name__}, expected a tensor")
        out[k[len(prefix) :]] = unpickler.tensor(v)
    return out


def _plain(value):
    """``value`` with placeholders turned into their named fields (config objects as dicts)."""
    if isinstance(value, Placeholder):
        return {k: _plain(v) for k, v in value.fields().items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def embedded_config(payload: dict) -> dict | None:
    """The official-style config a checkpoint's ``hyper_parameters`` carry (their ``Config``
    object, or a mapping of its fields), as a plain dict; None when there is none."""
    hp = _plain(payload.get("hyper_parameters"))
    if not isinstance(hp, dict):
        return None
    candidates = [hp, *(v for v in hp.values() if isinstance(v, dict))]
    found = next((c for c in candidates if "max_length" in c or "encoder_model_name" in c), None)
    return found


def read_lightning(file: str | Path, which: str = "ema"):
    """``(ema, raw, step, config, has_encoder)`` of a Lightning checkpoint: the network's state
    dicts in our names (``ema`` from ``checkpoint["ema"]["shadow"]``, None when absent or not asked
    for; ``raw`` from ``state_dict`` under ``model.``), the optimizer step (``_my_opt_step``, else
    ``global_step``), the embedded config (:func:`embedded_config`) and whether ``state_dict``
    holds encoder weights (:func:`read_encoder`)."""
    file = Path(file)
    payload, unpickler = open_archive(file)
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        kind = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{file}: not a Lightning checkpoint (expected a dict with 'state_dict', found {kind})")
    where = f"{file}: state_dict"
    if not any(isinstance(k, str) and k.startswith(MODEL_PREFIX) for k in payload["state_dict"]):
        raise CheckpointError(f"{where} has no '{MODEL_PREFIX}*' weights: not an ELF Lightning checkpoint")
    ema = raw = None
    shadow = payload.get("ema", {}).get("shadow") if isinstance(payload.get("ema"), dict) else None
    if shadow is not None and not isinstance(shadow, dict):
        raise CheckpointError(f"{file}: ema.shadow must map parameter names to tensors")
    if which in ("ema", "both") and shadow:
        ema = port_params_to_state_dict(_tensors(unpickler, shadow, f"{file}: ema.shadow"))
    if which in ("raw", "both") or ema is None:
        raw = port_params_to_state_dict(_tensors(unpickler, payload["state_dict"], where, MODEL_PREFIX))
    step = payload.get("_my_opt_step", payload.get("global_step"))
    has_encoder = any(isinstance(k, str) and k.startswith(ENCODER_PREFIX) for k in payload["state_dict"])
    return ema, raw, step if type(step) is int else None, embedded_config(payload), has_encoder


def read_encoder(file: str | Path) -> dict[str, torch.Tensor] | None:
    """The frozen encoder's state dict in ``transformers`` names (``shared.weight``,
    ``encoder.block.0…``) from ``state_dict`` under ``encoder.`` (a wrapper's ``model.`` level
    removed), or None when the checkpoint holds no encoder weights."""
    file = Path(file)
    payload, unpickler = open_archive(file)
    sd = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: not a Lightning checkpoint (no 'state_dict')")
    enc = _tensors(unpickler, sd, f"{file}: state_dict", ENCODER_PREFIX)
    if enc and all(k.startswith(MODEL_PREFIX) for k in enc):
        enc = {k[len(MODEL_PREFIX) :]: v for k, v in enc.items()}
    return enc or None
