"""The authors' T5 encoder weights (``t5_small_encoder_jax.pkl``: the Flax T5-small encoder tree
as nested dicts of numpy arrays, SPEC §2) read through an allow-listing unpickler that only builds
numpy arrays, and converted into a ``transformers.T5EncoderModel``."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import ElflmError
from ..hub import resolve_file


class EncoderFileError(ElflmError, ValueError):
    """An encoder weights file exists but cannot be used (unsafe, truncated, wrong layout)."""


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):  # pickles name either, whatever numpy wrote them
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """Builds only what numpy arrays need; any other global is refused before it is imported."""

    _ALLOWED = _numpy_globals()

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        obj = self._ALLOWED.get((module, name))
        if obj is None:
            raise EncoderFileError(
                f"{self.source}: refused to load the global {module}.{name}; an encoder pickle may only "
                "hold nested dicts of numpy arrays (nothing else is unpickled, for safety)"
            )
        return obj

    def persistent_load(self, pid):
        raise EncoderFileError(f"{self.source}: persistent ids are not allowed in an encoder pickle")


def _flatten(tree, prefix: str, source: str, out: dict) -> dict:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise EncoderFileError(f"{source}: expected string keys, got {key!r} under {prefix or 'the root'!r}")
            _flatten(value, f"{prefix}/{key}" if prefix else key, source, out)
        return out
    if isinstance(tree, np.generic):
        tree = np.asarray(tree)
    if not isinstance(tree, np.ndarray) or tree.dtype.kind != "f":
        what = f"array of dtype {tree.dtype}" if isinstance(tree, np.ndarray) else type(tree).__name__
        raise EncoderFileError(f"{source}: {prefix!r} is a {what}, expected a floating-point numpy array")
    out[prefix] = np.ascontiguousarray(tree, dtype=np.float32)
    return out


def load_jax_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """Read the authors' encoder pickle (``t5_small_encoder_jax.pkl`` format: ``{"params": tree}``
    or the bare tree, nested dicts of numpy arrays) into ``{"encoder/block_0/...": float32 array}``.
    ``path`` is a local file or a Hub file ``org/repo/file.pkl``. Only numpy globals are allowed."""
    path = resolve_file(path, "encoder pickle")
    try:
        with open(path, "rb") as f:
            tree = _NumpyUnpickler(f, str(path)).load()
    except EncoderFileError:
        raise
    except Exception as e:  # malformed pickles raise many types (EOFError, UnpicklingError, TypeError, ...)
        raise EncoderFileError(f"{path}: not a readable encoder pickle ({type(e).__name__}: {e})") from e
    if isinstance(tree, dict) and "params" in tree:
        tree = tree["params"]
    if not isinstance(tree, dict) or not tree:
        raise EncoderFileError(f"{path}: expected a non-empty dict of parameters, got {type(tree).__name__}")
    params = _flatten(tree, "", str(path), {})
    bad = [k for k, v in params.items() if not np.isfinite(v).all()]
    if bad:
        raise EncoderFileError(f"{path}: NaN or infinite values in {bad[:3]}")
    return params


# --------------------------------------------------------------------------- Flax T5 -> transformers

_ATTN = "encoder/block_{i}/layer_0/SelfAttention"
_REL_BIAS = "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/rel_embedding"
_FF = "encoder/block_{i}/layer_1/DenseReluDense"


def _get(params: dict, key: str) -> np.ndarray:
    if key not in params:
        raise ValueError(
            f"missing {key!r}: expected the Flax T5 encoder layout (shared/embedding, encoder/block_i/...)"
        )
    return params[key]


def t5_config(*, vocab: int, d_model: int, buckets: int, heads: int, inner: int, d_ff: int, layers: int, gated: bool):
    """The ``T5Config`` of a T5 encoder of these sizes: ReLU feed-forward (gated GELU when
    ``gated``), max distance 128, eps 1e-6, no dropout."""
    from transformers import T5Config

    if inner % heads:
        raise ValueError(f"attention width {inner} is not a multiple of the {heads} heads of the relative bias")
    return T5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=inner // heads,
        d_ff=int(d_ff),
        num_layers=layers,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )


def infer_t5_config(params: dict[str, np.ndarray]):
    """``T5Config`` of a Flax T5 encoder tree (flat ``/`` keys), sizes read from the array shapes."""
    vocab, d_model = _get(params, "shared/embedding").shape
    buckets, heads = _get(params, _REL_BIAS).shape
    gated = _FF.format(i=0) + "/wi_0/kernel" in params
    return t5_config(
        vocab=vocab,
        d_model=d_model,
        buckets=buckets,
        heads=heads,
        inner=_get(params, _ATTN.format(i=0) + "/q/kernel").shape[1],
        d_ff=_get(params, _FF.format(i=0) + ("/wi_0/kernel" if gated else "/wi/kernel")).shape[1],
        layers=len({m.group(1) for k in params if (m := re.match(r"encoder/block_(\d+)/", k))}),
        gated=gated,
    )


def t5_state_dict(params: dict[str, np.ndarray], num_layers: int) -> dict[str, torch.Tensor]:
    """``T5EncoderModel`` state dict from a flat Flax tree: Dense kernels (in, out) are transposed,
    the embedding is shared by ``shared`` and ``encoder.embed_tokens``. Every key must be used."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    gated = _FF.format(i=0) + "/wi_0/kernel" in params
    emb = t(_get(params, "shared/embedding"))
    sd = {"shared.weight": emb, "encoder.embed_tokens.weight": emb}
    used = {"shared/embedding", _REL_BIAS, "encoder/final_layer_norm/weight"}
    sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = t(_get(params, _REL_BIAS))
    for i in range(num_layers):
        names = {f"layer.0.SelfAttention.{p}.weight": (_ATTN.format(i=i) + f"/{p}/kernel", True) for p in "qkvo"}
        for p in ("wi_0", "wi_1", "wo") if gated else ("wi", "wo"):
            names[f"layer.1.DenseReluDense.{p}.weight"] = (_FF.format(i=i) + f"/{p}/kernel", True)
        names["layer.0.layer_norm.weight"] = (f"encoder/block_{i}/layer_0/layer_norm/weight", False)
        names["layer.1.layer_norm.weight"] = (f"encoder/block_{i}/layer_1/layer_norm/weight", False)
        for name, (key, transpose) in names.items():
            a = _get(params, key)
            sd[f"encoder.block.{i}.{name}"] = t(a.T if transpose else a)
            used.add(key)
    sd["encoder.final_layer_norm.weight"] = t(_get(params, "encoder/final_layer_norm/weight"))
    extra = sorted(set(params) - used)
    if extra:
        raise ValueError(f"unexpected parameters {extra[:5]}{' ...' if len(extra) > 5 else ''} for a T5 encoder")
    return sd


def t5_from_jax_params(params: dict[str, np.ndarray], config=None):
    """A float32 ``T5EncoderModel`` (eval) with the weights of a flat Flax tree; ``config`` (a
    ``T5Config``) defaults to :func:`infer_t5_config`."""
    from transformers import T5EncoderModel

    config = config if config is not None else infer_t5_config(params)
    sd = t5_state_dict(params, config.num_layers)
    model = T5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        rows = [(k, got.get(k), expected.get(k)) for k in diff[:4]]
        raise ValueError(f"weights do not fit the T5 config: {rows} (name, file, config)")
    model.load_state_dict(sd, strict=True)
    return model.float().eval()


# --------------------------------------------------------------------------- torch T5 state dicts


def t5_from_state_dict(sd: dict[str, torch.Tensor], where: str = "encoder weights"):
    """A float32 ``T5EncoderModel`` (eval) from a ``T5EncoderModel`` state dict (``shared.weight``
    or ``encoder.embed_tokens.weight``, ``encoder.block.N…``), sizes read from the shapes."""
    from transformers import T5EncoderModel

    sd = dict(sd)
    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    bias = sd.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = sd.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd.get(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")
    if emb is None or bias is None or q is None or wi is None:
        raise ValueError(f"{where}: not a T5 encoder state dict (expected shared.weight, encoder.block.0…)")
    sd.setdefault("shared.weight", emb)
    sd.setdefault("encoder.embed_tokens.weight", emb)
    layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    config = t5_config(
        vocab=emb.shape[0],
        d_model=emb.shape[1],
        buckets=bias.shape[0],
        heads=bias.shape[1],
        inner=q.shape[0],
        d_ff=wi.shape[0],
        layers=layers,
        gated=gated,
    )
    model = T5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        rows = [(k, got.get(k), expected.get(k)) for k in diff[:4]]
        raise ValueError(f"{where}: weights do not fit a T5 encoder: {rows} (name, file, config)")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.float().eval()
