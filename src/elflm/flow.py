"""Flow-matching math (SPEC §3) as pure functions, and the counter-based generators every random
draw comes from. Time: t = 0 pure noise, t = 1 clean data."""

from __future__ import annotations

import numbers

import numpy as np
import torch

SEED_LIMIT = 2**63  # seeds (and stream counters) are integers in [0, 2**63)


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an ``int`` if it is an integer (not a bool) in [0, 2**63), else a ``ValueError``
    naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def seeded(seed: int, *counters: int, device=None) -> torch.Generator:
    """A generator (on ``device``, default CPU) whose state is a pure function of
    ``(seed, *counters)``: independent, reproducible streams, e.g. one per (run, step, micro-batch)
    in training or per (run, row) in sampling. Seed and counters are integers in [0, 2**63)."""
    seed = check_seed(seed)
    counters = tuple(check_seed(c, "a stream counter (row index, step)") for c in counters)
    state = int(np.random.SeedSequence([seed, *counters]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device or "cpu").manual_seed(state)


def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-row (B,) value against ``like`` (B, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def restore(x: torch.Tensor, values: torch.Tensor | float, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` (B, L, C) with positions where ``mask`` (B, L) is set replaced by ``values``."""
    if mask is None:
        return x
    values = torch.as_tensor(values, dtype=x.dtype, device=x.device)
    return torch.where(mask.bool()[..., None], values, x)


def add_noise(x0, eps, t, noise_scale: float, cond_mask=None):
    """``z_t = t·x0 + (1 − t)·σ·ε`` (B, L, C); condition positions (``cond_mask`` (B, L)) kept clean."""
    tt = expand(t, x0)
    return restore(tt * x0 + (1 - tt) * eps * noise_scale, x0, cond_mask)


def decoder_latent(x0, lam, eps, noise_scale: float):
    """Decode-branch input ``λ·x0 + (1 − λ)·σ_dec·ε`` (B, L, C) with per-token λ (B, L, 1); the
    condition positions are noised too (no restore)."""
    lam = lam.to(x0.dtype)
    return lam * x0 + (1 - lam) * (eps * noise_scale)


def logit_normal(normal: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``sigmoid(mean + std·n)`` of standard-normal draws ``n``."""
    return torch.sigmoid(normal * std + mean)


def sample_time(n: int, schedule: str, mean: float, std: float, generator=None, device=None) -> torch.Tensor:
    """(n,) training times: logit-normal ``sigmoid(N(mean, std))`` or uniform on [0, 1)."""
    if schedule == "logit_normal":
        return logit_normal(torch.randn(n, generator=generator, device=device), mean, std)
    if schedule == "uniform":
        return torch.rand(n, generator=generator, device=device)
    raise ValueError(f"unknown time schedule {schedule!r}; expected 'logit_normal' or 'uniform'")


def guidance_scale(u: torch.Tensor, w_min: float, w_max: float) -> torch.Tensor:
    """Log-uniform self-conditioning-CFG scale: ``a·exp(u·ln(b/a)) − 1``, a = 1 + w_min, b = 1 + w_max."""
    a, b = 1.0 + w_min, 1.0 + w_max
    return a * torch.exp(u * torch.log(torch.tensor(b / a, dtype=u.dtype))) - 1.0


def velocity(x_hat, z, t, t_eps: float):
    """x-prediction → velocity ``(x̂ − z) / max(1 − t, t_eps)`` (B, L, C)."""
    return (x_hat - z) / torch.clamp(1 - expand(t, z), min=t_eps)


def check_finite(**tensors) -> None:
    """Raise ``ValueError`` naming the first argument that holds NaN or infinity."""
    for name, value in tensors.items():
        if value is not None and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or infinite values; check the inputs that produced it")
