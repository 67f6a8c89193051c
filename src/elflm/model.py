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

from .config import ModelConfig
from .pretrained import PretrainedModel

CE_CHUNK_ELEMENTS = 2**26  # logits per chunk of the fused decode cross-entropy (256 MiB in float32)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as it is when float64: norms, RoPE, gates and the decode loss compute
    in at least float32 (in float64 for a model cast to float64)."""
    return x if x.dtype == torch.float64 else x.float()


class _RMSNormFn(torch.autograd.Function):
    """``w·x·rsqrt(mean(x²) + eps)`` in float32 (float64 for float64 ``x``) that saves only ``x`` and the per-row scale for
    backward (autograd of the plain expression would keep two float32 copies of ``x``'s size)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = _wide(x)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight.to(h.dtype) * (h * rstd)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        xhat = _wide(x) * rstd
        dw = (g * xhat).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dxhat = g * weight.to(xhat.dtype)
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


class RMSNorm(nn.Module):
    """RMS layer norm over the last dim, computed in float32 (float64 inputs: float64), eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x).to(x.dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled, normalised ``x`` in float32 or float64 (``forward`` casts it back to ``x.dtype``)."""
        return _RMSNormFn.apply(x, self.weight, self.eps)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of the raw scalar (no ×1000): (B,) -> (B, dim) as ``[cos, sin]`` halves, float32
    (float64 for float64 ``t``)."""
    half = dim // 2
    t = _wide(t)
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


def rope_phases(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tables (N, d) as unit complex numbers (N, d/2) ``cos + i·sin`` of each pair (complex64;
    complex128 for float64 tables)."""
    return torch.complex(_wide(cos[:, ::2]), _wide(sin[:, ::2]))


def rotate_pairs(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """RoPE as one complex product: pair (x_2i, x_2i+1) of x (B, heads, N, d) is the complex number
    x_2i + i·x_2i+1 times ``phases`` (N, d/2); float32 out (float64 for float64 ``x``), no
    (B, heads, N, d) temporaries besides the result."""
    pairs = torch.view_as_complex(_wide(x).contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * phases).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of x (B, heads, N, d) by the tables (N, d) of :func:`rope_tables`:
    ``x·cos + rot(x)·sin`` with ``rot(x)_(2i, 2i+1) = (−x_2i+1, x_2i)``; float32 out."""
    return rotate_pairs(x, rope_phases(cos, sin))


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
        """x (B, N, H); rope (N, head_dim/2) complex phases (:func:`rope_phases`); mask (B, N) bool
        of valid keys or None (the official path: no mask)."""
        B, N, H = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = rotate_pairs(self.q_norm.normalize(q), rope).to(v.dtype)
        k = rotate_pairs(self.k_norm.normalize(k), rope).to(v.dtype)
        key_mask = None if mask is None else mask[:, None, None, :]
        if self.fast:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        else:
            with torch.autocast(x.device.type, enabled=False):
                scores = (_wide(q) @ _wide(k).transpose(-1, -2)) / math.sqrt(self.head_dim)
                if key_mask is not None:
                    scores = scores.masked_fill(~key_mask, -1e9)
                out = (scores.softmax(-1) @ _wide(v)).to(v.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, N, H))


class _SiLUGateFn(torch.autograd.Function):
    """``silu(a)·b`` that saves only ``a`` and ``b`` for backward (not also ``silu(a)``)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        a32, g32 = _wide(a), _wide(g)
        sig = torch.sigmoid(a32)
        da = g32 * _wide(b) * sig * (1 + a32 * (1 - sig))
        return da.to(a.dtype), (g32 * a32 * sig).to(b.dtype)


class SwiGLU(nn.Module):
    """Fused SwiGLU: Linear(H -> 2·hidden) split into (a, b); Linear(silu(a)·b)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(_SiLUGateFn.apply(a, b)))


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
        ``targets`` (B, L) ids, without autograd's copies of the (B, L, V) logits: only positions
        with ``targets >= 0`` are computed (the others get 0), ``chunk_tokens`` at a time (default
        ``CE_CHUNK_ELEMENTS // V``) by :class:`_LinearCrossEntropyFn`; with several chunks and
        autograd on, each chunk's logits are recomputed in backward, so one (chunk, V) block is
        alive at a time."""
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        flat = targets.flatten()
        keep = (flat >= 0).nonzero().squeeze(1)  # host sync: the number of computed tokens
        h = F.gelu(self.proj(x.flatten(0, 1).index_select(0, keep)), approximate="tanh")
        ts = flat.index_select(0, keep).long()
        size = chunk_tokens or max(1, CE_CHUNK_ELEMENTS // self.unembed.out_features)
        recompute = torch.is_grad_enabled() and h.shape[0] > size
        w, b = self.unembed.weight, self.unembed.bias
        ce = torch.cat([_LinearCrossEntropyFn.apply(h[i : i + size], w, b, ts[i : i + size], recompute)
                        for i in range(0, max(h.shape[0], 1), size)])
        return ce.new_zeros(flat.shape).index_put((keep,), ce).view(targets.shape)


class _LinearCrossEntropyFn(torch.autograd.Function):
    """Cross-entropy (N,) of ``logits = x·Wᵀ + b`` against ``targets`` (N,), the matmuls in
    ``x``'s dtype (autocast's when it is on; weights cast to it), logits in float32 (float64 for
    float64 ``x``). Forward keeps for backward the log-sum-exp and either the logits
    (``recompute=False``, on the context) or nothing more (``recompute=True``: backward recomputes
    them); backward turns them in place into
    ``(softmax − onehot)·grad``, so no second (N, V) tensor is made (a repeated backward, with
    ``retain_graph``, recomputes the logits)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, recompute: bool):
        with torch.autocast(x.device.type, enabled=False):
            logits = _wide(torch.addmm(bias.to(x.dtype), x, weight.to(x.dtype).mT))
            lse = torch.logsumexp(logits, -1)
            ce = lse - logits.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.logits = None if recompute else logits  # not a saved tensor: backward overwrites it
        return ce

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, targets, lse = ctx.saved_tensors
        logits, ctx.logits = ctx.logits, None  # a repeated backward (retain_graph) recomputes them
        w = weight.to(x.dtype)
        if logits is None:
            logits = _wide(torch.addmm(bias.to(x.dtype), x, w.mT))
        g = logits.sub_(lse[:, None]).exp_()
        g.scatter_add_(1, targets[:, None], g.new_full((len(targets), 1), -1.0)).mul_(grad[:, None])
        gx = g.to(x.dtype)
        return gx @ w, (gx.mT @ x).to(weight.dtype), g.sum(0).to(bias.dtype), None, None


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

    def set_fast_attention(self, fast: bool) -> "ELF":
        """Use PyTorch SDPA kernels (True) or the explicit float32 reference attention (False)."""
        for block in self.blocks:
            block.attn.fast = fast
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

    def prefix(self, t: torch.Tensor, w: torch.Tensor | None, decode: bool, dtype) -> torch.Tensor:
        """Control tokens (B, P, H): time, self-cond-CFG (when ``w`` is given), mode."""
        B = t.shape[0]
        parts = [self.t_emb_tokens + self.t_embedder(t)[:, None]]
        if w is not None and self.config.num_self_cond_cfg_tokens:
            parts.append(self.self_cond_cfg_tokens + self.self_cond_cfg_embedder(w)[:, None])
        if self.config.num_mode_tokens:
            parts.append((self.mode_tokens * float(decode)).expand(B, -1, -1))
        return torch.cat(parts, dim=1).to(dtype)

    def rope(self, num_prefix: int, length: int, device, dtype=torch.float32) -> torch.Tensor:
        """RoPE phases (P + L, head_dim/2) complex64 (complex128 for ``dtype`` float64;
        :func:`rope_phases`), cached per (P, L, device, dtype) outside ``torch.compile`` (inside,
        the tables are built in the graph)."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        head_dim = self.config.hidden_size // self.config.num_heads
        make = lambda: rope_phases(*rope_tables(num_prefix, length, head_dim, device=device, dtype=table_dtype))  # noqa: E731
        if torch.compiler.is_compiling():
            return make()
        key = (num_prefix, length, torch.device(device), table_dtype)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 64:  # many distinct lengths: start over rather than grow
                self._rope_cache.clear()
            self._rope_cache[key] = make()
        return self._rope_cache[key]

    def forward(self, x, t, w=None, decode: bool = False, attention_mask=None, targets=None):
        """x (B, L, 2C) = [z, x̂_prev] or (B, L, C) = z; t, w (B,); attention_mask (B, L) of valid
        tokens or None (the official code never masks). Returns :class:`ELFOutput`: ``x_hat``
        (B, L, C); with ``decode=True`` the ``logits`` (B, L, V), or with ``targets`` (B, L) ids the
        per-token cross-entropy ``token_ce`` (B, L) of :meth:`DecodeHead.cross_entropy` instead
        (targets < 0: skipped, 0).

        Under autocast only the blocks run in low precision: the input projections, control
        tokens and both heads run in the parameter dtype (float32 unless the model was cast)."""
        self._check_inputs(x, t, w)
        if targets is not None and (not decode or tuple(targets.shape) != tuple(x.shape[:2])):
            raise ValueError(f"targets must be (B, L) = {tuple(x.shape[:2])} ids with decode=True, got {tuple(targets.shape)}, decode={decode}")
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
        for block in self.blocks:
            h = block(h, rope, mask)
        with torch.autocast(device.type, enabled=False):
            h = h[:, P:].to(dtype)
            x_hat = self.final_layer(h)
            if targets is not None:
                return ELFOutput(x_hat, token_ce=self.decoder.cross_entropy(h, targets))
            return ELFOutput(x_hat, logits=self.decoder(h) if decode else None)
