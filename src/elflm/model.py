"""The ELF network (SPEC §4): one transformer with a denoise head and a decode head.

Input per token is ``[z, x̂_prev]`` (B, L, 2C) with self-conditioning, or ``z`` (B, L, C). Control
tokens are prepended in the order time (4), self-conditioning-CFG (4, present when ``w`` is given),
mode (4, zero vectors unless decoding); the text follows. Time convention: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .config import ModelConfig
from .pretrained import PretrainedModel


class RMSNorm(nn.Module):
    """RMS layer norm over the last dim, ``w·x·rsqrt(mean(x²) + eps)``, eps 1e-6, computed in
    float32 (float64 inputs: float64) by :func:`elflm.kernels.rms_norm`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x).to(x.dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled, normalised ``x`` in float32 or float64 (``forward`` casts it back to ``x.dtype``)."""
        return kernels.rms_norm(x, self.weight, self.eps)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of the raw scalar (no ×1000): (B,) -> (B, dim) as ``[cos, sin]`` halves, float32
    (float64 for float64 ``t``)."""
    half = dim // 2
    t = kernels.wide(t)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar (B,) -> (B, H): sinusoid(256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_0 = nn.Linear(freq_dim, hidden_size)
        self.mlp_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp_0.weight.dtype
        emb = timestep_embedding(t.to(dtype) if dtype == torch.float64 else t, self.freq_dim).to(dtype)
        return self.mlp_2(F.silu(self.mlp_0(emb)))


def rope_tables(num_prefix: int, length: int, head_dim: int, theta: float = 10000.0, device=None, dtype=torch.float32):
    """Interleaved 1-D RoPE tables (num_prefix + length, head_dim) in ``dtype``: prefix rows
    unrotated (cos 1, sin 0), text position p at angle p·theta^(-2k/head_dim) for pair k."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim)
    angles = torch.arange(length, dtype=dtype, device=device)[:, None] * freqs[None]
    angles = angles.repeat_interleave(2, dim=-1)
    cos = torch.cat([torch.ones(num_prefix, head_dim, dtype=dtype, device=device), torch.cos(angles)])
    sin = torch.cat([torch.zeros(num_prefix, head_dim, dtype=dtype, device=device), torch.sin(angles)])
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of x (B, heads, N, d) by the tables (N, d) of :func:`rope_tables`:
    ``x·cos + rot(x)·sin`` with ``rot(x)_(2i, 2i+1) = (−x_2i+1, x_2i)``, in float32 (the model
    applies the same rotation as one complex product, :func:`elflm.kernels.rotate_pairs`)."""
    x = kernels.wide(x)
    pairs = x.unflatten(-1, (-1, 2))
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
    return x * kernels.wide(cos) + rot * kernels.wide(sin)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv (bias), QK RMSNorm and RoPE in float32, then SDPA in
    the compute dtype (``fast``) or the explicit float32 reference softmax (autocast off)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.fast = True

    def forward(self, x, rope, mask=None):
        """x (B, N, H); rope (N, head_dim/2) complex phases (:func:`elflm.kernels.rope_phases`);
        mask (B, N) bool of valid keys or None (the official path: no mask)."""
        B, N, H = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = kernels.rotate_pairs(self.q_norm.normalize(q), rope).to(v.dtype)
        k = kernels.rotate_pairs(self.k_norm.normalize(k), rope).to(v.dtype)
        key_mask = None if mask is None else mask[:, None, None, :]
        if self.fast:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        else:
            with torch.autocast(x.device.type, enabled=False):
                scores = (kernels.wide(q) @ kernels.wide(k).transpose(-1, -2)) / math.sqrt(self.head_dim)
                if key_mask is not None:
                    scores = scores.masked_fill(~key_mask, -1e9)
                out = (scores.softmax(-1) @ kernels.wide(v)).to(v.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, N, H))


class SwiGLU(nn.Module):
    """Fused SwiGLU: Linear(H -> 2·hidden) split into (a, b); Linear(silu(a)·b) (the gate by
    :func:`elflm.kernels.silu_gate`)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(kernels.silu_gate(a, b)))


class Block(nn.Module):
    """Pre-norm block: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope, mask=None):
        x = x + self.drop(self.attn(self.norm1(x), rope, mask))
        return x + self.mlp(self.norm2(x))


class BottleneckProj(nn.Module):
    """Linear(C -> bottleneck, no bias) -> Linear(bottleneck -> H)."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, bottleneck, bias=False)
        self.proj2 = nn.Linear(bottleneck, hidden)

    def forward(self, x):
        return self.proj2(self.proj1(x))


class FinalLayer(nn.Module):
    """Denoise head: RMSNorm -> Linear(H -> C), zero-initialised."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden)
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return self.linear(self.norm_final(x))


class DecodeHead(nn.Module):
    """Decode head on the raw block output: Linear(H -> C) -> GELU(tanh) -> Linear(C -> V)."""

    def __init__(self, hidden: int, enc_dim: int, vocab: int):
        super().__init__()
        self.proj = nn.Linear(hidden, enc_dim)
        self.unembed = nn.Linear(enc_dim, vocab)

    def forward(self, x):
        return self.unembed(F.gelu(self.proj(x), approximate="tanh"))

    def cross_entropy(self, x: torch.Tensor, targets: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
        """Per-token cross-entropy (B, L) float32 of the logits ``self(x)`` (x (B, L, H)) against
        ``targets`` (B, L) ids without the (B, L, V) logits: only positions with ``targets >= 0``
        are computed (the others get 0), by :func:`elflm.kernels.linear_cross_entropy` in chunks
        of ``chunk_tokens``."""
        flat = targets.flatten()
        keep = (flat >= 0).nonzero().squeeze(1)  # host sync: the number of computed tokens
        h = F.gelu(self.proj(x.flatten(0, 1).index_select(0, keep)), approximate="tanh")
        ce = kernels.linear_cross_entropy(
            h, self.unembed.weight, self.unembed.bias, flat.index_select(0, keep), chunk_tokens
        )
        return ce.new_zeros(flat.shape).index_put((keep,), ce).view(targets.shape)


def model_config(model: nn.Module) -> ModelConfig:
    """The :class:`ModelConfig` of an :class:`ELF`, also through a DDP wrapper (``.module``)."""
    return getattr(model, "module", model).config


class ELFOutput(NamedTuple):
    """What :meth:`ELF.forward` returns: ``x_hat`` (B, L, C) from the denoise head; with
    ``decode=True`` either ``logits`` (B, L, V) or, when targets were given, ``token_ce`` (B, L)."""

    x_hat: torch.Tensor
    logits: torch.Tensor | None = None
    token_ce: torch.Tensor | None = None


class ELF(nn.Module, PretrainedModel):
    """The ELF transformer. ``forward`` maps ``x`` (B, L, 2C or C), ``t`` (B,), ``w`` (B,) or None
    to an :class:`ELFOutput`: ``x_hat`` (B, L, C), and with ``decode=True`` the decode head's
    ``logits`` (B, L, V) or its per-token cross-entropy ``token_ce`` (B, L). ``from_pretrained``,
    ``save_pretrained``, ``push_to_hub`` and ``convert`` come from
    :class:`~elflm.pretrained.PretrainedModel`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        H, C = c.hidden_size, c.encoder_dim
        if c.self_cond:
            self.self_cond_proj = nn.Linear(2 * C, C)
        self.text_proj = BottleneckProj(C, H, c.bottleneck_dim)
        self.t_emb_tokens = nn.Parameter(torch.zeros(1, c.num_time_tokens, H))
        self.t_embedder = TimestepEmbedder(H)
        if c.num_self_cond_cfg_tokens:
            self.self_cond_cfg_tokens = nn.Parameter(torch.zeros(1, c.num_self_cond_cfg_tokens, H))
            self.self_cond_cfg_embedder = TimestepEmbedder(H)
        if c.num_mode_tokens:
            self.mode_tokens = nn.Parameter(torch.zeros(1, c.num_mode_tokens, H))
        mlp_hidden = int(int(H * c.mlp_ratio) * 2 / 3)
        q1, q3 = c.depth // 4, c.depth // 4 * 3
        self.blocks = nn.ModuleList(
            Block(H, c.num_heads, mlp_hidden, c.dropout if q1 <= i < q3 else 0.0) for i in range(c.depth)
        )
        self.final_layer = FinalLayer(H, C)
        self.decoder = DecodeHead(H, C, c.vocab_size)
        self._rope_cache: dict = {}
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation: Xavier-uniform kernels, zero biases, N(0, 0.02) for the
        timestep MLPs and control tokens, zeros for the denoise output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("_tokens") or (("embedder.mlp_" in name) and name.endswith("weight")):
                nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_fast_attention(self, fast: bool) -> ELF:
        """Use PyTorch SDPA kernels (True) or the explicit float32 reference attention (False)."""
        for block in self.blocks:
            block.attn.fast = fast
        return self

    def set_activation_checkpointing(self, on: bool) -> ELF:
        """Keep only each block's input for backward and recompute the block there (non-reentrant
        ``torch.utils.checkpoint``, RNG state preserved: dropout redraws the same masks), under grad
        mode only: block activations shrink to one (B, P + L, H) tensor per block for about one more
        forward of the blocks. Same losses and gradients (tested bit for bit on CPU)."""
        self.activation_checkpointing = bool(on)
        return self

    def compile_blocks(self, **options) -> ELF:
        """Compile each block's ``forward`` in place with ``torch.compile(**options)`` (parameter names
        unchanged). Module hooks stay outside the compiled code, so wrappers applied afterwards (FSDP2's
        per-block all-gathers, :meth:`set_activation_checkpointing`) work as without compile: compile
        blocks first, then shard (as torchtitan does)."""
        for block in self.blocks:
            block.forward = torch.compile(block.forward, **options)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, x, t, w):
        C = self.config.encoder_dim
        widths = (2 * C, C) if self.config.self_cond else (C,)
        if x.dim() != 3 or x.shape[-1] not in widths:
            raise ValueError(f"x must be (B, L, {' or '.join(map(str, widths))}), got {tuple(x.shape)}")
        if x.shape[1] > self.config.max_length:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_length {self.config.max_length}")
        for name, v in (("t", t), ("w", w)):
            if v is not None and tuple(v.shape) != (x.shape[0],):
                raise ValueError(f"{name} must have shape ({x.shape[0]},), got {tuple(v.shape)}")

    def prefix(self, t: torch.Tensor, w: torch.Tensor | None, decode: bool | torch.Tensor, dtype) -> torch.Tensor:
        """Control tokens (B, P, H): time, self-cond-CFG (when ``w`` is given), mode (``decode``: one
        bool, or (B,) per-row 0/1 gates)."""
        B = t.shape[0]
        parts = [self.t_emb_tokens + self.t_embedder(t)[:, None]]
        if w is not None and self.config.num_self_cond_cfg_tokens:
            parts.append(self.self_cond_cfg_tokens + self.self_cond_cfg_embedder(w)[:, None])
        if self.config.num_mode_tokens:
            gate = decode.to(self.mode_tokens.dtype).view(-1, 1, 1) if torch.is_tensor(decode) else float(decode)
            parts.append((self.mode_tokens * gate).expand(B, -1, -1))
        return torch.cat(parts, dim=1).to(dtype)

    def rope(self, num_prefix: int, length: int, device, dtype=torch.float32) -> torch.Tensor:
        """RoPE phases (P + L, head_dim/2) complex64 (complex128 for ``dtype`` float64;
        :func:`elflm.kernels.rope_phases`), cached per (P, L, device, dtype) outside ``torch.compile`` (inside,
        the tables are built in the graph)."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        head_dim = self.config.hidden_size // self.config.num_heads
        make = lambda: kernels.rope_phases(*rope_tables(num_prefix, length, head_dim, device=device, dtype=table_dtype))
        if torch.compiler.is_compiling():
            return make()
        key = (num_prefix, length, torch.device(device), table_dtype)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 64:  # many distinct lengths: start over rather than grow
                self._rope_cache.clear()
            self._rope_cache[key] = make()
        return self._rope_cache[key]

    def forward(self, x, t, w=None, decode: bool | torch.Tensor = False, attention_mask=None, targets=None):
        """x (B, L, 2C) = [z, x̂_prev] or (B, L, C) = z; t, w (B,); attention_mask (B, L) of valid
        tokens or None (the official code never masks). Returns :class:`ELFOutput`: ``x_hat``
        (B, L, C); with ``decode=True`` the ``logits`` (B, L, V), or with ``targets`` (B, L) ids the
        per-token cross-entropy ``token_ce`` (B, L) of :meth:`DecodeHead.cross_entropy` instead
        (targets < 0: skipped, 0). ``decode`` may be a (B,) tensor of per-row mode gates (1 = decode
        mode tokens on; distillation mixes both modes in one batch): then every row gets both heads.

        Under autocast only the blocks run in low precision: the input projections, control
        tokens and both heads run in the parameter dtype (float32 unless the model was cast)."""
        self._check_inputs(x, t, w)
        if torch.is_tensor(decode) and tuple(decode.shape) != (x.shape[0],):
            raise ValueError(
                f"decode must be a bool or a ({x.shape[0]},) tensor of row gates, got {tuple(decode.shape)}"
            )
        decoding = torch.is_tensor(decode) or bool(decode)
        if targets is not None and (not decoding or tuple(targets.shape) != tuple(x.shape[:2])):
            raise ValueError(
                f"targets must be (B, L) = {tuple(x.shape[:2])} ids with decode=True, "
                f"got {tuple(targets.shape)}, decode={decode}"
            )
        dtype, device = self.text_proj.proj2.weight.dtype, x.device
        with torch.autocast(device.type, enabled=False):
            x = x.to(dtype)
            if x.shape[-1] == 2 * self.config.encoder_dim:
                x = self.self_cond_proj(x)
            h = self.text_proj(x)
            pre = self.prefix(t, w, decode, dtype)
        P, L = pre.shape[1], h.shape[1]
        h = torch.cat([pre, h], dim=1)
        rope = self.rope(P, L, device, dtype)
        mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], P)
            mask = torch.cat([ones, attention_mask], dim=1).bool()
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, rope, mask, use_reentrant=False) if recompute else block(h, rope, mask)
        with torch.autocast(device.type, enabled=False):
            h = h[:, P:].to(dtype)
            x_hat = self.final_layer(h)
            if targets is not None:
                return ELFOutput(x_hat, token_ce=self.decoder.cross_entropy(h, targets))
            return ELFOutput(x_hat, logits=self.decoder(h) if decoding else None)
