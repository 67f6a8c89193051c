"""Frozen text encoders that define the ELF embedding space (SPEC §1–2).

The default is the T5-small encoder (``transformers.T5EncoderModel``); any other Hugging Face
encoder (``AutoModel``) works too. Everything runs in float32, in eval mode, without gradients.
Latents are ``x0 = (h − latent_mean) / latent_std`` of the last hidden state ``h`` (B, L, C).

Masks: ``mask`` is the (B, L) padding mask or the (B, L, L) encoder mask of SPEC §1 (row i may
attend to column j where it is nonzero; built by :mod:`elflm.data.rows`). They enter the attention
scores additively as ``(1 − mask)·finfo(float32).min``
after the relative position bias, as in the official code.
transformers 5.x rejects 3-D masks (``create_bidirectional_mask`` only takes (B, L) or prepared
(B, 1, Lq, Lk) masks), so both kinds are passed as that 4-D additive form.

The authors' encoder weights (``t5_small_encoder_jax.pkl``) are read and converted to
``T5EncoderModel`` weights by :mod:`elflm.formats.t5_encoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .formats.t5_encoder import EncoderFileError, load_jax_pickle, t5_from_jax_params
from .hub import load_hf

LATENT_MEAN = 0.0
LATENT_STD = 0.2
DEFAULT_T5 = "t5-small"


# ----------------------------------------------------------------------------- latents


def normalize_latent(h: torch.Tensor, mean: float = LATENT_MEAN, std: float = LATENT_STD) -> torch.Tensor:
    """Encoder hidden states (B, L, C) → ELF latents ``(h − mean) / std``."""
    return (h - mean) / std


def denormalize_latent(x0: torch.Tensor, mean: float = LATENT_MEAN, std: float = LATENT_STD) -> torch.Tensor:
    """ELF latents (B, L, C) → encoder hidden states ``x0·std + mean``."""
    return x0 * std + mean


# ----------------------------------------------------------------------------- loading helpers


def load_tokenizer(name_or_path):
    """``AutoTokenizer`` from a local folder or Hub id (``t5-small``)."""
    from transformers import AutoTokenizer

    return load_hf(AutoTokenizer.from_pretrained, name_or_path, "tokenizer")


def _auto_encoder(name_or_path):
    """The encoder part of an HF model: ``T5EncoderModel`` for T5, ``get_encoder()`` of other
    encoder-decoders, ``AutoModel`` otherwise."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    config = load_hf(AutoConfig.from_pretrained, name_or_path, "encoder config")
    if config.model_type == "t5":
        return load_hf(T5EncoderModel.from_pretrained, name_or_path, "encoder")
    model = load_hf(AutoModel.from_pretrained, name_or_path, "encoder")
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

    def __init__(
        self, model: nn.Module, tokenizer=None, latent_mean: float = LATENT_MEAN, latent_std: float = LATENT_STD
    ):
        super().__init__()
        if not latent_std > 0:
            raise ValueError(f"latent_std must be > 0, got {latent_std}")
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in [*model.parameters(), *model.buffers()]):
            model = model.float()  # (a float32 model is kept as it is: also one on fake tensors)
        self.model = model.eval().requires_grad_(False)
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
    def t5(cls, tokenizer=DEFAULT_T5, weights=None, *, seed: int = 0, **latent) -> TextEncoder:
        """T5 encoder with the tokenizer ``tokenizer`` (folder or Hub id). ``weights``: None → random
        T5 built from the ``config.json`` beside the tokenizer (seeded by ``seed``; for tests);
        a ``.pkl`` file (or Hub ``org/repo/file.pkl``) → the authors' JAX pickle; otherwise an HF
        T5 folder or Hub id. ``latent``: ``latent_mean``, ``latent_std``."""
        if weights is None:
            from transformers import T5Config, T5EncoderModel

            config = load_hf(T5Config.from_pretrained, tokenizer, "T5 config")
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
    def from_pretrained(cls, name_or_path, tokenizer=None, **latent) -> TextEncoder:
        """Any HF encoder (local folder or Hub id) as the embedding space; ``tokenizer`` (folder, Hub
        id or tokenizer object) defaults to ``name_or_path``. T5 checkpoints load only the encoder."""
        model = _auto_encoder(name_or_path)
        return cls(model, _tokenizer(name_or_path if tokenizer is None else tokenizer), **latent)

    @classmethod
    def from_jax_pickle(cls, path, tokenizer=DEFAULT_T5, config=None, **latent) -> TextEncoder:
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

    def train(self, mode: bool = True) -> TextEncoder:
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
        if self.max_length is not None and self.max_length < L:
            raise ValueError(f"sequence length {L} exceeds the encoder's max_position_embeddings {self.max_length}")
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        ids = input_ids.to(self.device, torch.long)
        if mask is None:
            return ids, None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in ((B, L), (B, L, L)):
            raise ValueError(
                f"expected a mask of shape (B, L) = {(B, L)} or (B, L, L) = {(B, L, L)}, got {_describe(mask)}"
            )
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
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min
            )
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
    "LATENT_MEAN",
    "LATENT_STD",
    "EncoderFileError",
    "TextEncoder",
    "normalize_latent",
    "denormalize_latent",
    "load_tokenizer",
    "save_encoder_folder",
]


def build_encoder(
    cfg, device=None, *, latent_mean: float | None = None, latent_std: float | None = None
) -> TextEncoder:
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
