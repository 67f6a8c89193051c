"""Samplers (SPEC §6): time grids, ODE / SDE steps, guidance, decoding with EOS handling.

A sampler is configured once by :class:`~elflm.config.SampleConfig`; a step method is a function
``step(predict, z, t, t_next, cfg, eps, cond) -> (z_next, x̂)`` registered in :data:`STEPS`, so
adding a method is adding a function. Time: t = 0 pure noise, t = 1 clean data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import flow
from .config import SampleConfig
from .objective import model_config


@dataclass
class Condition:
    """Known latents held fixed during sampling: ``latents`` (B, L, C) at ``mask`` (B, L) positions.
    ``unconditional`` (B, L, C): the values held by the condition-dropped evaluation of
    classifier-free guidance (default zeros; infilling keeps its known target tokens there)."""

    latents: torch.Tensor
    mask: torch.Tensor
    unconditional: torch.Tensor | None = None

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        return flow.restore(x, self.latents, self.mask)

    def dropped(self) -> "Condition":
        """The unconditional counterpart for classifier-free guidance."""
        u = torch.zeros_like(self.latents) if self.unconditional is None else self.unconditional
        return Condition(u, self.mask)


def time_grid(cfg: SampleConfig, normal: torch.Tensor | None = None, generator=None, device=None) -> torch.Tensor:
    """(steps + 1,) times from 0 to 1: ``linspace`` or sorted logit-normal draws with 0 and 1 added.
    ``normal`` (steps − 1,) injects the raw standard-normal draws of the logit-normal grid."""
    if cfg.grid == "uniform":
        return torch.linspace(0.0, 1.0, cfg.steps + 1, device=device)
    if cfg.grid == "logit_normal":
        if normal is None:
            normal = torch.randn(cfg.steps - 1, generator=generator, device=device)
        inner = torch.sort(flow.logit_normal(normal, cfg.p_mean, cfg.p_std)).values
        return torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])
    raise ValueError(f"unknown time grid {cfg.grid!r}; expected 'uniform' or 'logit_normal'")


Predict = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def make_predictor(model, cfg: SampleConfig, cond: Condition | None = None, compiled: bool = False) -> Callable:
    """``predict(z, t, x_prev) -> (v, x̂)``, each (B, L, C): one forward on ``[z, x̂_prev]`` with the
    self-conditioning-CFG scale ``cfg.w``; with ``cfg.cfg_scale != 1`` and a condition, the
    conditional and condition-dropped evaluations run batched in one forward and are mixed as
    ``u + c·(c − u)``. Condition positions get ``x̂ = condition``, ``v = 0``. ``compiled``: the
    forward runs through ``torch.compile`` with static shapes (on CUDA ``mode="reduce-overhead"``:
    CUDA graphs; the output is copied out of the graph's buffers)."""
    mcfg = model_config(model)
    forward = model
    if compiled:
        cuda = next(model.parameters()).device.type == "cuda"
        forward = torch.compile(model, dynamic=False, mode="reduce-overhead" if cuda else None)

    def net(z, t, x_prev):
        B = z.shape[0]
        tt = torch.full((B,), float(t), dtype=torch.float32, device=z.device)
        w = torch.full((B,), float(cfg.w), dtype=torch.float32, device=z.device) if mcfg.num_self_cond_cfg_tokens else None
        x_in = torch.cat([z, x_prev], -1) if mcfg.self_cond else z
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        x = forward(x_in.to(_param_dtype(model)), tt, w).x_hat.to(z.dtype, copy=compiled)
        return flow.velocity(x, z, tt, cfg.t_eps), x

    def fix(v, x, c: Condition | None):
        if c is None:
            return v, x
        return flow.restore(v, 0.0, c.mask), c.restore(x)

    def predict(z, t, x_prev):
        if cond is None or cfg.cfg_scale == 1:
            return fix(*net(z, t, x_prev), cond)
        unc = cond.dropped()
        v, x = net(torch.cat([z, unc.restore(z)]), t, torch.cat([x_prev, unc.restore(x_prev)]))
        (v_c, v_u), (x_c, x_u) = v.chunk(2), x.chunk(2)
        v_c, x_c = fix(v_c, x_c, cond)
        v_u, x_u = fix(v_u, x_u, unc)
        c = cfg.cfg_scale
        return fix(v_u + c * (v_c - v_u), x_u + c * (x_c - x_u), cond)

    return predict


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def ode_step(predict, z, t, t_next, cfg: SampleConfig, eps=None, cond=None):
    """Euler: ``z + (t_next − t)·v(z, t)``."""
    v, x = predict(z, t)
    return z + (t_next - t) * v, x


def sde_step(predict, z, t, t_next, cfg: SampleConfig, eps, cond=None):
    """Churn γ: step back to ``t_back = α·t`` with fresh noise ``eps`` (B, L, C, standard normal),
    ``α = clip(1 − γ·(t_next − t), 0, 1)``, then Euler from ``t_back`` to ``t_next``."""
    alpha = min(max(1.0 - cfg.gamma * (t_next - t), 0.0), 1.0)
    t_back = alpha * t
    z_back = alpha * z + (1.0 - alpha) * eps.to(z.dtype) * cfg.noise_scale
    if cond is not None:
        z_back = cond.restore(z_back)
    v, x = predict(z_back, t_back)
    return z_back + (t_next - t_back) * v, x


STEPS: dict[str, Callable] = {"ode": ode_step, "sde": sde_step}


@torch.no_grad()
def sample_latents(
    model,
    cfg: SampleConfig,
    z_init: torch.Tensor,
    grid: torch.Tensor,
    cond: Condition | None = None,
    noise: Callable[[int], torch.Tensor] | None = None,
    callback: Callable | None = None,
    state_dtype: torch.dtype = torch.float32,
    compiled: bool = False,
) -> torch.Tensor:
    """Integrate from noise ``z_init`` (B, L, C, already × noise scale) along ``grid`` (N + 1,).
    Steps 0 … N−2 use ``cfg.method``, the last step is always ODE. ``noise(i)`` gives the SDE
    noise (B, L, C) of step i (default: ``randn``). ``callback(i, t, t_next, z, x̂)`` sees every step.
    The state is kept in ``state_dtype`` (the model runs in its parameter dtype); ``compiled``: see
    :func:`make_predictor`. Returns the final latent (B, L, C)."""
    if cfg.method not in STEPS:
        raise ValueError(f"unknown sampling method {cfg.method!r}; expected one of {sorted(STEPS)}")
    flow.check_finite(z_init=z_init)
    z = z_init.to(state_dtype)
    if cond is not None:
        u = None if cond.unconditional is None else cond.unconditional.to(state_dtype)
        cond = Condition(cond.latents.to(state_dtype), cond.mask.bool(), u)
        z = cond.restore(z)
    x_prev = torch.zeros_like(z) if cond is None else cond.restore(torch.zeros_like(z))
    ts = [float(t) for t in grid]
    N = len(ts) - 1
    predictor = make_predictor(model, cfg, cond, compiled)
    for i in range(N):
        method = cfg.method if i < N - 1 else "ode"
        eps = None
        if method != "ode":
            eps = noise(i) if noise is not None else torch.randn_like(z)
        z, x_prev = STEPS[method](lambda zz, tt: predictor(zz, tt, x_prev), z, ts[i], ts[i + 1], cfg, eps, cond)
        if callback is not None:
            callback(i, ts[i], ts[i + 1], z, x_prev)
    return z


@torch.no_grad()
def decode_logits(model, z: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """Decode-mode logits (B, L, V) at ``t = cfg.t_final`` with zero self-conditioning input."""
    mcfg = model_config(model)
    B = z.shape[0]
    z = z.to(_param_dtype(model))
    x = torch.cat([z, torch.zeros_like(z)], -1) if mcfg.self_cond else z
    t = torch.full((B,), float(cfg.t_final), device=z.device)
    w = torch.full((B,), float(cfg.w), device=z.device) if mcfg.num_self_cond_cfg_tokens else None
    return model(x, t, w, decode=True).logits


def mask_after_eos(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """(B, L) ids with every position from the first EOS on set to ``pad_id``."""
    keep = torch.cumsum(ids == eos_id, dim=1) == 0
    return torch.where(keep, ids, torch.as_tensor(pad_id, dtype=ids.dtype))


def shift_left(ids: torch.Tensor, shift: torch.Tensor, pad_value: int = 0) -> torch.Tensor:
    """Shift row b of ``ids`` (B, L) left by ``shift[b]`` positions, filling the tail with ``pad_value``."""
    L = ids.shape[1]
    idx = shift[:, None].long() + torch.arange(L, device=ids.device)[None]
    out = torch.gather(ids, 1, idx.clamp(max=L - 1))
    return torch.where(idx < L, out, torch.as_tensor(pad_value, dtype=ids.dtype))


def tokens_from_logits(
    logits: torch.Tensor, eos_id: int, pad_id: int, cond_mask: torch.Tensor | None = None, gen_length: int | None = None
) -> torch.Tensor:
    """Argmax ids (B, L'); for conditional rows the condition prefix is dropped first and
    ``gen_length`` tokens kept; everything after the first EOS becomes ``pad_id``."""
    ids = logits.argmax(-1)
    if cond_mask is not None:
        ids = shift_left(ids, cond_mask.long().sum(1), 0)
        if gen_length is not None:
            ids = ids[:, :gen_length]
    return mask_after_eos(ids, eos_id, pad_id)
