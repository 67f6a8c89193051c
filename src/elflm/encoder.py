"""Frozen text encoders that define the ELF embedding space (SPEC §1–2).

The default is the T5-small encoder (``transformers.T5EncoderModel``); any other Hugging Face
encoder (``AutoModel``) works too. Everything runs in float32, in eval mode, without gradients.
Latents are ``x0 = (h − latent_mean) / latent_std`` of the last hidden state ``h`` (B, L, C).

Masks: ``mask`` is the (B, L) padding mask or the (B, L, L) encoder mask of SPEC §1 (row i may
attend to column j where it is nonzero; built by :mod:`elflm.data.rows`). They enter the attention scores additively as ``(1 − mask)·finfo(float32).min``
after the relative position bias, as in the official code.
transformers 5.x rejects 3-D masks (``create_bidirectional_mask`` only takes (B, L) or prepared
(B, 1, Lq, Lk) masks), so both kinds are passed as that 4-D additive form.

The authors' encoder weights (``t5_small_encoder_jax.pkl``) are read through an allow-listing
unpickler that only builds numpy arrays, and converted to ``T5EncoderModel`` weights.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

LATENT_MEAN = 0.0
LATENT_STD = 0.2
DEFAULT_T5 = "t5-small"


class EncoderFileError(ValueError):
    """An encoder weights file exists but cannot be used (unsafe, truncated, wrong layout)."""


# ----------------------------------------------------------------------------- latents


def normalize_latent(h: torch.Tensor, mean: float = LATENT_MEAN, std: float = LATENT_STD) -> torch.Tensor:
    """Encoder hidden states (B, L, C) → ELF latents ``(h − mean) / std``."""
    return (h - mean) / std


def denormalize_latent(x0: torch.Tensor, mean: float = LATENT_MEAN, std: float = LATENT_STD) -> torch.Tensor:
    """ELF latents (B, L, C) → encoder hidden states ``x0·std + mean``."""
    return x0 * std + mean


# ----------------------------------------------------------------------------- the JAX pickle


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
    path = _resolve_file(path, "encoder pickle")
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


# ----------------------------------------------------------------------------- Flax T5 → transformers

_ATTN = "encoder/block_{i}/layer_0/SelfAttention"
_REL_BIAS = "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/rel_embedding"
_FF = "encoder/block_{i}/layer_1/DenseReluDense"


def _get(params: dict, key: str) -> np.ndarray:
    if key not in params:
        raise ValueError(f"missing {key!r}: expected the Flax T5 encoder layout (shared/embedding, encoder/block_i/...)")
    return params[key]


def infer_t5_config(params: dict[str, np.ndarray]):
    """``T5Config`` of a Flax T5 encoder tree (flat ``/`` keys), sizes read from the array shapes:
    ReLU feed-forward (``wi``) or gated GELU (``wi_0``/``wi_1``), max distance 128, eps 1e-6, no dropout."""
    from transformers import T5Config

    vocab, d_model = _get(params, "shared/embedding").shape
    buckets, heads = _get(params, _REL_BIAS).shape
    inner = _get(params, _ATTN.format(i=0) + "/q/kernel").shape[1]
    gated = _FF.format(i=0) + "/wi_0/kernel" in params
    d_ff = _get(params, _FF.format(i=0) + ("/wi_0/kernel" if gated else "/wi/kernel")).shape[1]
    layers = len({m.group(1) for k in params if (m := re.match(r"encoder/block_(\d+)/", k))})
    if inner % heads:
        raise ValueError(f"attention width {inner} is not a multiple of the {heads} heads of the relative bias")
    return T5Config(
        vocab_size=int(vocab), d_model=int(d_model), d_kv=inner // heads, d_ff=int(d_ff), num_layers=layers,
        num_heads=int(heads), relative_attention_num_buckets=int(buckets), relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
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
        raise ValueError(
            f"weights do not fit the T5 config: {[(k, got.get(k), expected.get(k)) for k in diff[:4]]} (name, file, config)"
        )
    model.load_state_dict(sd, strict=True)
    return model.float().eval()


# ----------------------------------------------------------------------------- loading helpers

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)*")


def _hub_error(name, what: str, e: Exception) -> OSError:
    from huggingface_hub import constants

    return OSError(
        f"could not load the {what} {str(name)!r}: it is not a local path and the Hugging Face Hub did not "
        f"provide it ({type(e).__name__}: {e}). Without network access, download it once where there is network "
        f"(it is kept in the Hugging Face cache, {constants.HF_HUB_CACHE}; set HF_HOME or HF_HUB_CACHE to move it) "
        "and run with HF_HUB_OFFLINE=1, or pass a local folder / file path instead."
    )


def _is_local(name) -> bool:
    return Path(str(name)).expanduser().exists()


def _check_name(name, what: str) -> None:
    s = str(name)
    if not _is_local(s) and (s.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(s)):
        raise FileNotFoundError(f"{what} {s!r} not found: no such local file or folder, and not a Hub id")


def _resolve_file(path, what: str) -> Path:
    """A local file, or a Hub file ``org/repo/sub/path`` downloaded into the HF cache."""
    _check_name(path, what)
    if _is_local(path):
        return Path(str(path)).expanduser()
    parts = str(path).split("/")
    if len(parts) < 3:
        raise FileNotFoundError(f"{what} {str(path)!r} not found: expected a local file or a Hub file 'org/repo/file'")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    except OSError as e:
        raise _hub_error(path, what, e) from e


def _pretrained(load, name, what: str):
    """``load(name)`` for a local folder or Hub id, with an offline-friendly error for the Hub."""
    _check_name(name, what)
    if _is_local(name):
        return load(str(Path(str(name)).expanduser()))
    try:
        return load(str(name))
    except OSError as e:
        raise _hub_error(name, what, e) from e


def load_tokenizer(name_or_path):
    """``AutoTokenizer`` from a local folder or Hub id (``t5-small``)."""
    from transformers import AutoTokenizer

    return _pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer")


def _auto_encoder(name_or_path):
    """The encoder part of an HF model: ``T5EncoderModel`` for T5, ``get_encoder()`` of other
    encoder-decoders, ``AutoModel`` otherwise."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    config = _pretrained(AutoConfig.from_pretrained, name_or_path, "encoder config")
    if config.model_type == "t5":
        return _pretrained(T5EncoderModel.from_pretrained, name_or_path, "encoder")
    model = _pretrained(AutoModel.from_pretrained, name_or_path, "encoder")
    return model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model


# ----------------------------------------------------------------------------- the encoder


class TextEncoder(nn.Module):
    """A frozen HF encoder with its tokenizer: ``encode(ids, mask)`` → normalised latents (B, L, C).

    Attributes: ``dim`` (C, the model width), ``vocab_size`` (embedding rows: 32128 for t5-small,
    the decode vocabulary, not ``len(tokenizer)``), ``pad_id``, ``eos_id`` (the tokenizer's, else
    the config's; ``eos_id`` falls back to the SEP token for BERT-like tokenizers; None if absent),
    ``tokenizer`` (None for an ids-only encoder), ``latent_mean``, ``latent_std``.
    Always float32 and in eval mode; parameters have ``requires_grad=False``.
    """

    def __init__(self, model: nn.Module, tokenizer=None, latent_mean: float = LATENT_MEAN, latent_std: float = LATENT_STD):
        super().__init__()
        if not latent_std > 0:
            raise ValueError(f"latent_std must be > 0, got {latent_std}")
        self.model = model.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.latent_mean, self.latent_std = float(latent_mean), float(latent_std)
        config = model.config
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.max_length = getattr(config, "max_position_embeddings", None)
        self.pad_id = _first_id((tokenizer, "pad_token_id"), (config, "pad_token_id"))
        self.eos_id = _first_id((tokenizer, "eos_token_id"), (config, "eos_token_id"), (tokenizer, "sep_token_id"))
        self._t5 = config.model_type == "t5"  # T5 takes the 4-D additive mask (checked against the golden numbers)
        self._pair_mask_ok: bool | None = True if self._t5 else None

    # constructors ------------------------------------------------------------------------------

    @classmethod
    def t5(cls, tokenizer=DEFAULT_T5, weights=None, *, seed: int = 0, **latent) -> "TextEncoder":
        """T5 encoder with the tokenizer ``tokenizer`` (folder or Hub id). ``weights``: None → random
        T5 built from the ``config.json`` beside the tokenizer (seeded by ``seed``; for tests);
        a ``.pkl`` file (or Hub ``org/repo/file.pkl``) → the authors' JAX pickle; otherwise an HF
        T5 folder or Hub id. ``latent``: ``latent_mean``, ``latent_std``."""
        if weights is None:
            from transformers import T5Config, T5EncoderModel

            config = _pretrained(T5Config.from_pretrained, tokenizer, "T5 config")
            config.dropout_rate, config.is_encoder_decoder, config.use_cache = 0.0, False, False
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = T5EncoderModel(config)
            return cls(model, load_tokenizer(tokenizer), **latent)
        if str(weights).endswith(".pkl"):
            return cls.from_jax_pickle(weights, tokenizer=tokenizer, **latent)
        enc = cls.from_pretrained(weights, tokenizer=tokenizer, **latent)
        if not enc._t5:
            raise ValueError(f"{weights}: expected T5 weights, found a {enc.model.config.model_type!r} model")
        return enc

    @classmethod
    def from_pretrained(cls, name_or_path, tokenizer=None, **latent) -> "TextEncoder":
        """Any HF encoder (local folder or Hub id) as the embedding space; ``tokenizer`` (folder, Hub
        id or tokenizer object) defaults to ``name_or_path``. T5 checkpoints load only the encoder."""
        model = _auto_encoder(name_or_path)
        return cls(model, _tokenizer(name_or_path if tokenizer is None else tokenizer), **latent)

    @classmethod
    def from_jax_pickle(cls, path, tokenizer=DEFAULT_T5, config=None, **latent) -> "TextEncoder":
        """The authors' encoder pickle (see :func:`load_jax_pickle`) as a ``T5EncoderModel``;
        ``config`` (``T5Config``) defaults to the sizes read from the arrays; ``tokenizer`` None →
        ids only."""
        params = load_jax_pickle(path)
        try:
            model = t5_from_jax_params(params, config)
        except ValueError as e:
            raise EncoderFileError(f"{path}: {e}") from e
        return cls(model, _tokenizer(tokenizer), **latent)

    # saving ------------------------------------------------------------------------------------

    def save_pretrained(self, directory) -> Path:
        """Write the encoder (safetensors + config.json) and its tokenizer as an HF folder, loadable
        with :meth:`from_pretrained` or ``T5EncoderModel.from_pretrained``."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory

    # running -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def train(self, mode: bool = True) -> "TextEncoder":
        """Frozen: the encoder stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    def token_ids(self, texts: str | Sequence[str]) -> list[int] | list[list[int]]:
        """Token ids of a text (or list of texts) without special tokens (no EOS appended)."""
        if self.tokenizer is None:
            raise ValueError("this encoder has no tokenizer; build it with tokenizer=<folder or Hub id>")
        if isinstance(texts, str):
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _check(self, input_ids: torch.Tensor, mask: torch.Tensor | None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"expected input_ids as a (B, L) integer tensor, got {_describe(input_ids)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"expected integer input_ids, got dtype {input_ids.dtype}")
        B, L = input_ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"expected at least one row and one token, got input_ids of shape {(B, L)}")
        if self.max_length is not None and L > self.max_length:
            raise ValueError(f"sequence length {L} exceeds the encoder's max_position_embeddings {self.max_length}")
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        ids = input_ids.to(self.device, torch.long)
        if mask is None:
            return ids, None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in ((B, L), (B, L, L)):
            raise ValueError(f"expected a mask of shape (B, L) = {(B, L)} or (B, L, L) = {(B, L, L)}, got {_describe(mask)}")
        return ids, mask.to(self.device) != 0

    def hidden(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised last hidden state (B, L, C) float32 of ``input_ids`` (B, L) with ``mask``
        None, (B, L) or (B, L, L) (nonzero = may attend)."""
        ids, mask = self._check(input_ids, mask)
        if mask is not None and mask.dim() == 3:
            self._check_pair_mask()
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            h = self._run(ids, mask)
        if not bool(torch.isfinite(h).all()):
            raise ValueError("the encoder produced NaN or infinite values; is there a row with no valid token?")
        return h

    def encode(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ELF latents ``x0 = (h − latent_mean) / latent_std`` (B, L, C) float32; see :meth:`hidden`."""
        return normalize_latent(self.hidden(input_ids, mask), self.latent_mean, self.latent_std)

    forward = encode

    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None and (self._t5 or mask.dim() == 3):
            # additive (B, 1, 1, L) or (B, 1, L, L): 0 where attended, finfo.min elsewhere
            mask = mask[:, None] if mask.dim() == 3 else mask[:, None, None]
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    def _check_pair_mask(self) -> None:
        """Verify once that the model honours a (B, 1, L, L) additive mask: with token 0 restricted to
        itself, its output must equal encoding token 0 alone; token 1 (seeing both) must match the
        unmasked output."""
        if self._pair_mask_ok is None:
            ids = torch.tensor([[min(5, self.vocab_size - 2), min(6, self.vocab_size - 1)]], device=self.device)
            pair = torch.tensor([[[True, False], [True, True]]], device=self.device)
            with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
                try:
                    got = self._run(ids, pair)
                except Exception:  # any failure means the 4-D mask is not supported
                    self._pair_mask_ok = False
                else:
                    alone, full = self._run(ids[:, :1], None), self._run(ids, None)
                    self._pair_mask_ok = torch.allclose(got[0, 0], alone[0, 0], atol=1e-4) and torch.allclose(
                        got[0, 1], full[0, 1], atol=1e-4
                    )
        if not self._pair_mask_ok:
            raise ValueError(
                f"this {type(self.model).__name__} does not honour a per-row (B, L, L) attention mask; "
                "pass a (B, L) padding mask, or use a T5 encoder"
            )


def _first_id(*sources) -> int | None:
    """The first non-None ``getattr(obj, name)`` of (obj, name) pairs."""
    return next((v for obj, name in sources if (v := getattr(obj, name, None)) is not None), None)


def _tokenizer(tokenizer):
    """A tokenizer object from a folder / Hub id; objects and None pass through."""
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def save_encoder_folder(source, directory, tokenizer=None) -> Path:
    """``elflm convert`` of an encoder: write ``source`` (a :class:`TextEncoder`, the authors'
    ``.pkl`` file, or an HF encoder folder / Hub id) as an HF encoder folder ``directory``
    (``model.safetensors``, ``config.json`` and the tokenizer ``tokenizer`` if given; for an HF
    source the tokenizer defaults to the source's own)."""
    if isinstance(source, TextEncoder):
        encoder = source
    elif str(source).endswith(".pkl"):
        encoder = TextEncoder.from_jax_pickle(source, tokenizer=tokenizer)
    else:
        encoder = TextEncoder.from_pretrained(source, tokenizer=tokenizer)
    return encoder.save_pretrained(directory)


__all__ = [
    "LATENT_MEAN", "LATENT_STD", "EncoderFileError", "TextEncoder",
    "normalize_latent", "denormalize_latent",
    "load_jax_pickle", "infer_t5_config", "t5_state_dict", "t5_from_jax_params",
    "load_tokenizer", "save_encoder_folder",
]


def build_encoder(cfg, device=None, *, latent_mean: float | None = None, latent_std: float | None = None) -> "TextEncoder":
    """The frozen encoder an :class:`~elflm.config.EncoderConfig` describes. ``cfg.weights``: a
    ``.pkl`` (the authors' pickle, local or ``org/repo/file.pkl``), an HF folder / Hub id, the word
    ``random`` (a seeded random T5 from the config beside the tokenizer: offline tests and toy runs),
    or None (the weights of ``cfg.name_or_path``). ``latent_mean``/``latent_std`` override the
    config's (e.g. statistics estimated from the data)."""
    mean = cfg.latent_mean if latent_mean is None else latent_mean
    std = cfg.latent_std if latent_std is None else latent_std
    latent = dict(latent_mean=LATENT_MEAN if mean is None else mean, latent_std=LATENT_STD if std is None else std)
    if cfg.kind == "t5":
        weights = None if cfg.weights == "random" else (cfg.weights or cfg.name_or_path)
        enc = TextEncoder.t5(cfg.tokenizer_name, weights=weights, **latent)
    else:
        if cfg.weights == "random":
            raise ValueError("encoder.weights=random is only available for encoder.kind=t5")
        enc = TextEncoder.from_pretrained(cfg.weights or cfg.name_or_path, tokenizer=cfg.tokenizer_name, **latent)
    return enc if device is None else enc.to(device)
