"""Fast paths of :mod:`elflm.model`: hand-written autograd functions that compute what the
reference modules describe with less memory or fewer passes (tests compare each with the plain
expression of ``model.py``).

* :func:`rms_norm` — ``w·x·rsqrt(mean(x²) + eps)`` saving only ``x`` and the per-row scale;
* :func:`silu_gate` — ``silu(a)·b`` saving only ``a`` and ``b``;
* :func:`rotate_pairs` — interleaved RoPE as one complex product;
* :func:`linear_cross_entropy` — the decode head's last Linear + cross-entropy in chunks without
  keeping the (N, V) logits for backward.

Norms, RoPE, gates and the decode loss compute in at least float32 (float64 for a model cast to
float64), whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CE_CHUNK_ELEMENTS = 2**26  # logits per chunk of the fused decode cross-entropy (256 MiB in float32)


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as it is when float64."""
    return x if x.dtype == torch.float64 else x.float()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        h = wide(x)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight.to(h.dtype) * (h * rstd)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        xhat = wide(x) * rstd
        dw = (g * xhat).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dxhat = g * weight.to(xhat.dtype)
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight·x·rsqrt(mean(x²) + eps)`` over the last dim, in float32 (float64 for float64
    ``x``); backward keeps ``x`` and the (..., 1) scale only (autograd of the plain expression would
    keep two float32 copies of ``x``)."""
    return _RMSNorm.apply(x, weight, eps)


class _SiLUGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        a32, g32 = wide(a), wide(g)
        sig = torch.sigmoid(a32)
        da = g32 * wide(b) * sig * (1 + a32 * (1 - sig))
        return da.to(a.dtype), (g32 * a32 * sig).to(b.dtype)


def silu_gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a)·b`` (same shapes) saving only ``a`` and ``b`` for backward (not also ``silu(a)``)."""
    return _SiLUGate.apply(a, b)


def rope_phases(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE tables (N, d) as unit complex numbers (N, d/2) ``cos + i·sin`` of each pair (complex64;
    complex128 for float64 tables)."""
    return torch.complex(wide(cos[:, ::2]), wide(sin[:, ::2]))


def rotate_pairs(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """RoPE as one complex product: pair (x_2i, x_2i+1) of x (B, heads, N, d) is the complex number
    x_2i + i·x_2i+1 times ``phases`` (N, d/2); float32 out (float64 for float64 ``x``), no
    (B, heads, N, d) temporaries besides the result."""
    pairs = torch.view_as_complex(wide(x).contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * phases).flatten(-2)


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy (N,) of ``logits = x·Wᵀ + b`` against ``targets`` (N,), the matmuls in
    ``x``'s dtype (weights cast to it), logits in float32 (float64 for float64 ``x``). Forward keeps
    for backward the log-sum-exp and either the logits (``recompute=False``, on the context) or
    nothing more (``recompute=True``: backward recomputes them); backward turns them in place into
    ``(softmax − onehot)·grad``, so no second (N, V) tensor is made (a repeated backward, with
    ``retain_graph``, recomputes the logits)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, recompute: bool):
        with torch.autocast(x.device.type, enabled=False):
            logits = wide(torch.addmm(bias.to(x.dtype), x, weight.to(x.dtype).mT))
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
            logits = wide(torch.addmm(bias.to(x.dtype), x, w.mT))
        g = logits.sub_(lse[:, None]).exp_()
        g.scatter_add_(1, targets[:, None], g.new_full((len(targets), 1), -1.0)).mul_(grad[:, None])
        gx = g.to(x.dtype)
        return gx @ w, (gx.mT @ x).to(weight.dtype), g.sum(0).to(bias.dtype), None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Cross-entropy (N,) float32 of ``logits = x·weightᵀ + bias`` (x (N, K), weight (V, K))
    against ``targets`` (N,) ids, ``chunk_tokens`` rows at a time (default ``CE_CHUNK_ELEMENTS // V``);
    with several chunks and autograd on, each chunk's logits are recomputed in backward, so one
    (chunk, V) block is alive at a time."""
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    size = chunk_tokens or max(1, CE_CHUNK_ELEMENTS // weight.shape[0])
    recompute = torch.is_grad_enabled() and x.shape[0] > size
    targets = targets.long()
    return torch.cat(
        [
            _LinearCrossEntropy.apply(x[i : i + size], weight, bias, targets[i : i + size], recompute)
            for i in range(0, max(x.shape[0], 1), size)
        ]
    )
