"""The authors' Flax checkpoints, read without JAX: orbax folders (OCDBT, or one zarr folder per
array, read with tensorstore) and old flax msgpack files; and the Flax parameter names mapped to
ours.

A checkpoint holds the trees ``params`` (raw weights), ``ema_params1`` (EMA weights) and
``step``; leaves are ``/``-joined Flax paths such as ``blocks_0/attn/qkv/kernel``.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointError

COLLECTIONS = {"ema": "ema_params1", "raw": "params"}

# Bare Flax parameters of the decode head and their module names here; the kernels are (in, out).
DECODE_HEAD = {
    "proj_kernel": "decoder.proj.weight",
    "proj_bias": "decoder.proj.bias",
    "unembed_kernel": "decoder.unembed.weight",
    "unembed_bias": "decoder.unembed.bias",
}


def flax_name(path: str) -> tuple[str, bool]:
    """Our ``state_dict`` name for a ``/``-joined Flax parameter path, and whether the array
    must be transposed (Flax Dense kernels are ``(in, out)``, torch weights ``(out, in)``)."""
    if path in DECODE_HEAD:
        return DECODE_HEAD[path], path.endswith("_kernel")
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


# --------------------------------------------------------------------------- orbax


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
                if "key_metadata" in info:
                    keys = tuple(k["key"] for k in info["key_metadata"])
                else:
                    keys = ast.literal_eval(key)
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


def read_orbax(
    path: str | Path, collections: tuple[str, ...] = ("ema_params1", "params")
) -> dict[str, dict[str, np.ndarray]]:
    """Read the Flax trees ``collections`` (and ``step``) of an orbax checkpoint folder with
    tensorstore: OCDBT (``manifest.ocdbt``) or one zarr folder per array. Returns
    ``{collection: {"/"-joined flax path: array}}`` (absent collections are left out)."""
    import tensorstore as ts

    path = Path(path).absolute()  # a file: URI takes no relative path ("file://../x" reads ".." as a host)
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


# --------------------------------------------------------------------------- msgpack


def _read_msgpack(file: Path) -> dict:
    """A flax ``serialization.msgpack_serialize`` tree: ndarray / numpy-scalar ext types and
    ``__msgpack_chunked_array__`` leaves become numpy arrays."""
    try:
        import msgpack
    except ImportError as e:
        raise CheckpointError(
            f"{file}: reading msgpack checkpoints needs the 'msgpack' package (pip install msgpack)"
        ) from e

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


def read_msgpack(file: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """The trees ``params`` and ``ema_params1`` (and ``step``) of an old flax ``save_checkpoint``
    file (one msgpack blob), as :func:`read_orbax` returns them."""
    file = Path(file)
    tree = _read_msgpack(file)
    trees = {k: _flat(v) for k, v in tree.items() if k in COLLECTIONS.values() and isinstance(v, dict)}
    if "step" in tree:
        trees["step"] = {"": tree["step"]}
    return trees


# --------------------------------------------------------------------------- to ours


def _to_ours(trees: dict[str, dict], where: Path):
    if not set(COLLECTIONS.values()) & set(trees):
        raise CheckpointError(f"{where}: no 'ema_params1' or 'params' tree in this Flax checkpoint")

    def state_dict(kind):
        tree = trees.get(COLLECTIONS[kind])
        return None if tree is None else flax_params_to_state_dict({k: _torch_compatible(v) for k, v in tree.items()})

    step = trees.get("step", {}).get("")
    return state_dict("ema"), state_dict("raw"), None if step is None else int(np.asarray(step).reshape(-1)[0])


def read_orbax_weights(path: str | Path, which: str = "both"):
    """``(ema, raw, step)`` of an orbax checkpoint folder: state dicts in our names (None where
    absent) and the step. ``which`` (``ema``, ``raw``, ``both``) says which trees to read; a
    checkpoint without the EMA tree gives its raw weights for ``ema``."""
    path = Path(path)
    trees = read_orbax(path, tuple(COLLECTIONS.values()) if which == "both" else (COLLECTIONS[which],))
    if not set(COLLECTIONS.values()) & set(trees):
        trees.update(read_orbax(path, (COLLECTIONS["raw"],)))
    return _to_ours(trees, path)


def read_msgpack_weights(file: str | Path):
    """``(ema, raw, step)`` of an old flax msgpack file, as :func:`read_orbax_weights`."""
    return _to_ours(read_msgpack(file), Path(file))
