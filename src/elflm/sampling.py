"""The sampling engine (SPEC §6): a :class:`Sampler` is configured once (settings, model,
precision) and then stepped, like a diffusers scheduler; it owns the time grid and all noise.

Randomness is per row: row ``r`` of a run seeded with ``s`` draws everything from its own
generator ``flow.seeded(s, r)``: its initial noise (L, C), then its time grid (logit-normal: the
N − 1 inner times; uniform grids draw nothing), then the SDE noise (L, C) of each step in order.
A sample therefore depends only on its seed, its row index and the settings, never on the rows it
is batched with. Tests inject the official draws instead (:meth:`Sampler.state`).

Every row has its own time grid, so times are (B,) tensors throughout. Steps 0 … N−2 use the
configured method, the last step is always ODE; adding a method is adding a function to
:data:`STEPS`. Known positions (a condition, a prompt, the known tokens of a template: one
mechanism, :class:`Known`) are held at their clean latents at every step. Time: t = 0 noise,
t = 1 data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from . import flow
from .config import ConfigError, SampleConfig, check_section
from .errors import check_int
from .model import model_config

PRECISIONS = ("fp32", "bf16", "fp64")


@dataclass
class Known:
    """Latents held fixed during sampling: ``latents`` (B, L, C) at the ``mask`` (B, L) positions.
    ``dropped`` (B, L, C): what the condition-dropped evaluation of classifier-free guidance holds
    there instead (zeros at the condition, as the label drop of training); None when there is no
    condition to drop (then the sampler does not guide)."""

    latents: torch.Tensor
    mask: torch.Tensor
    dropped: torch.Tensor | None = None

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, C) with the known positions set to the known latents."""
        return flow.restore(x, self.latents, self.mask)

    def without_condition(self) -> Known:
        """The counterpart held by the condition-dropped evaluation of classifier-free guidance."""
        return Known(self.dropped, self.mask)

    def to(self, dtype: torch.dtype) -> Known:
        return Known(self.latents.to(dtype), self.mask.bool(), None if self.dropped is None else self.dropped.to(dtype))


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


def ode_step(predict, z, t, t_next, cfg: SampleConfig, eps=None, known=None):
    """Euler: ``z + (t_next − t)·v(z, t)``; ``t``, ``t_next`` (B,)."""
    v, x = predict(z, t)
    return z + flow.expand(t_next - t, z) * v, x


def sde_step(predict, z, t, t_next, cfg: SampleConfig, eps, known=None):
    """Churn γ: step back to ``t_back = α·t`` with fresh noise ``eps`` (B, L, C, standard normal),
    ``α = clip(1 − γ·(t_next − t), 0, 1)`` per row, then Euler from ``t_back`` to ``t_next``."""
    alpha = (1.0 - cfg.gamma * (t_next - t)).clamp(0.0, 1.0)
    t_back = alpha * t
    a = flow.expand(alpha, z)
    z_back = a * z + (1.0 - a) * eps.to(z.dtype) * cfg.noise_scale
    if known is not None:
        z_back = known.restore(z_back)
    v, x = predict(z_back, t_back)
    return z_back + flow.expand(t_next - t_back, z) * v, x


STEPS: dict[str, Callable] = {"ode": ode_step, "sde": sde_step}


def check_settings(cfg: SampleConfig) -> SampleConfig:
    """``cfg`` if it is a valid :class:`~elflm.config.SampleConfig` (also after an in-place edit),
    else a :class:`~elflm.config.ConfigError` naming the setting (:func:`~elflm.config.check_section`)."""
    if not isinstance(cfg, SampleConfig):
        raise ConfigError(f"sampler settings: expected a SampleConfig, got {type(cfg).__name__}", "sample")
    check_section("sample", cfg)
    return cfg


def used_settings(cfg: SampleConfig, conditional: bool) -> dict:
    """The sampler settings that shaped a sample, for its record: the churn γ only for SDE, the
    logit-normal parameters only for that grid, the classifier-free guidance scale only with a
    condition."""
    keys = ["method", "steps", "grid", "w", "noise_scale", "t_eps", "t_final"]
    keys += ["gamma"] if cfg.method == "sde" else []
    keys += ["p_mean", "p_std"] if cfg.grid == "logit_normal" else []
    keys += ["cfg_scale"] if conditional else []
    return {k: getattr(cfg, k) for k in keys}


class RowNoise:
    """The random streams of a batch: row b draws from ``flow.seeded(seed_b, index_b)`` on
    ``device``, first its initial noise, then its time grid, then one (L, C) normal per SDE step."""

    def __init__(self, streams: Sequence[tuple[int, int]], device):
        self.generators = [flow.seeded(seed, index, device=device) for seed, index in streams]
        self.device = device

    def normal(self, *shape: int) -> torch.Tensor:
        """(B, *shape) standard normals, row b from its own stream."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    def grids(self, cfg: SampleConfig) -> torch.Tensor:
        """(B, steps + 1) time grids, row b's drawn from its own stream."""
        return torch.stack([time_grid(cfg, generator=g, device=self.device) for g in self.generators])


@dataclass
class State:
    """A batch in flight: ``z`` (B, L, C), the previous clean estimate ``x_hat`` (B, L, C), the
    time ``grid`` (B, N + 1), the next ``step`` index, the ``known`` positions and the source of
    the SDE noise of step i (``noise(i)`` → (B, L, C) standard normal)."""

    z: torch.Tensor
    x_hat: torch.Tensor
    grid: torch.Tensor
    step: int
    known: Known | None
    noise: Callable[[int], torch.Tensor] | None

    @property
    def num_steps(self) -> int:
        return self.grid.shape[1] - 1

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps


class Sampler:
    """The ELF sampler for ``model`` with settings ``cfg``: :meth:`start` (rows of a seeded run) or
    :meth:`state` (injected draws) make a :class:`State`; :meth:`step` advances it one step,
    :meth:`sample` to the end; :meth:`decode` gives the decode-mode logits of the final latent.

    ``precision``: ``fp32``; ``bf16`` (autocast of the transformer blocks, as in training: norms,
    input projections, control tokens and heads stay float32); ``fp64`` (a model cast to float64,
    state in float64). ``compiled``: the forward of every step and of the decode pass runs through
    ``torch.compile`` with static shapes (on CUDA ``mode="reduce-overhead"``: CUDA graphs)."""

    def __init__(self, model, cfg: SampleConfig, *, precision: str = "fp32", compiled: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.model, self.cfg, self.precision = model, check_settings(cfg), precision
        self.mcfg = model_config(model)
        param = next(model.parameters())
        self.device = param.device
        if (precision == "fp64") != (param.dtype == torch.float64):
            raise ValueError(
                f"precision {precision} needs the model in {'float64' if precision == 'fp64' else 'float32'}; "
                f"it is in {param.dtype} (load it with the matching dtype)"
            )
        self.dtype = torch.float64 if precision == "fp64" else torch.float32
        self.compiled = compiled
        self.forward = model
        if compiled:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.forward = torch.compile(model, dynamic=False, mode=mode)

    # -- states -----------------------------------------------------------------------------------

    def state(
        self,
        z_init: torch.Tensor,
        grid: torch.Tensor,
        known: Known | None = None,
        noise: Callable[[int], torch.Tensor] | None = None,
    ) -> State:
        """A state from given draws: ``z_init`` (B, L, C) already × noise scale, ``grid`` (N + 1,)
        shared or (B, N + 1) per row, ``noise(i)`` the SDE noise of step i (default ``randn``)."""
        flow.check_finite(z_init=z_init)
        if z_init.dim() != 3 or z_init.shape[-1] != self.mcfg.encoder_dim:
            raise ValueError(f"z_init must be (B, L, {self.mcfg.encoder_dim}), got {tuple(z_init.shape)}")
        B = z_init.shape[0]
        grid = grid.to(self.device, self.dtype)
        grid = grid.expand(B, -1) if grid.dim() == 1 else grid
        if grid.shape[0] != B or grid.shape[1] < 2:
            raise ValueError(f"grid must be (N + 1,) or (B, N + 1) with B = {B}, N >= 1; got {tuple(grid.shape)}")
        z = z_init.to(self.device, self.dtype)
        if known is not None:
            known = known.to(self.dtype)
            z = known.restore(z)
        x_hat = torch.zeros_like(z) if known is None else known.restore(torch.zeros_like(z))
        return State(z, x_hat, grid, 0, known, noise)

    def start(
        self, rows: Sequence[int], length: int, seed: int | Sequence[int] = 0, known: Known | None = None
    ) -> State:
        """The state of rows ``rows`` (global indices) of ``length`` tokens of a run seeded with
        ``seed`` (one seed, or one per row): every draw from the row's own stream (:class:`RowNoise`)."""
        check_int("length", length, 1, self.mcfg.max_length)
        seeds = [seed] * len(rows) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(rows) or not rows:
            raise ValueError(
                f"expected one seed per row and at least one row, got {len(seeds)} seeds for {len(rows)} rows"
            )
        streams = RowNoise(list(zip(seeds, rows)), self.device)
        z = streams.normal(length, self.mcfg.encoder_dim) * self.cfg.noise_scale
        grid = streams.grids(self.cfg)
        return self.state(z, grid, known, noise=lambda i: streams.normal(length, self.mcfg.encoder_dim))

    # -- stepping ---------------------------------------------------------------------------------

    def predict(self, z: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor, known: Known | None):
        """``(v, x̂)`` (B, L, C) at times ``t`` (B,): one forward on ``[z, x̂_prev]`` with the
        self-conditioning-CFG scale ``w``; with classifier-free guidance (``cfg_scale != 1`` and a
        condition to drop, ``known.dropped``) the conditional and condition-dropped evaluations run
        as one batched forward,
        mixed as ``u + c·(c − u)``. Known positions get ``x̂ = known``, ``v = 0``."""

        def fix(v, x, k):
            return (v, x) if k is None else (flow.restore(v, 0.0, k.mask), k.restore(x))

        if known is None or known.dropped is None or self.cfg.cfg_scale == 1:
            return fix(*self._net(z, t, x_prev), known)
        unc = known.without_condition()
        v, x = self._net(torch.cat([z, unc.restore(z)]), torch.cat([t, t]), torch.cat([x_prev, unc.restore(x_prev)]))
        (v_c, v_u), (x_c, x_u) = v.chunk(2), x.chunk(2)
        v_c, x_c = fix(v_c, x_c, known)
        v_u, x_u = fix(v_u, x_u, unc)
        c = self.cfg.cfg_scale
        return fix(v_u + c * (v_c - v_u), x_u + c * (x_c - x_u), known)

    def _net(self, z, t, x_prev):
        B = z.shape[0]
        w = torch.full((B,), float(self.cfg.w), device=z.device) if self.mcfg.num_self_cond_cfg_tokens else None
        x_in = torch.cat([z, x_prev], -1) if self.mcfg.self_cond else z
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            x = self.forward(x_in, t.float() if self.dtype != torch.float64 else t, w).x_hat
        x = x.to(z.dtype, copy=self.compiled)  # out of the CUDA graph's buffers
        return flow.velocity(x, z, t, self.cfg.t_eps), x

    @torch.no_grad()
    def step(self, state: State) -> State:
        """``state`` advanced by one step (``cfg.method``; the last step ODE)."""
        if state.done:
            raise ValueError(f"the state is at its last step ({state.num_steps})")
        i, N = state.step, state.num_steps
        method = self.cfg.method if i < N - 1 else "ode"
        eps = None
        if method != "ode":
            eps = state.noise(i) if state.noise is not None else torch.randn_like(state.z)
        t, t_next = state.grid[:, i], state.grid[:, i + 1]
        z, x = STEPS[method](
            lambda zz, tt: self.predict(zz, tt, state.x_hat, state.known),
            state.z,
            t,
            t_next,
            self.cfg,
            eps,
            state.known,
        )
        return replace(state, z=z, x_hat=x, step=i + 1)

    @torch.no_grad()
    def sample(self, state: State, callback: Callable | None = None) -> torch.Tensor:
        """Run ``state`` to the end; ``callback(i, t, t_next, z, x̂)`` (t, t_next (B,)) sees every
        step. Returns the final latent (B, L, C)."""
        while not state.done:
            i = state.step
            state = self.step(state)
            if callback is not None:
                callback(i, state.grid[:, i], state.grid[:, i + 1], state.z, state.x_hat)
        return state.z

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode-mode logits (B, L, V) float32 of latents ``z`` (B, L, C) (:func:`decode_logits`),
        through the compiled forward when ``compiled``."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = decode_logits(self.forward, z, self.cfg)
        return logits.to(torch.float32, copy=self.compiled)  # out of the CUDA graph's buffers


@torch.no_grad()
def decode_logits(model, z: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """Decode-mode logits (B, L, V) at ``t = cfg.t_final`` with zero self-conditioning input;
    ``model`` is an :class:`~elflm.model.ELF` or its ``torch.compile`` wrapper."""
    mcfg = model_config(model)
    B = z.shape[0]
    z = z.to(next(model.parameters()).dtype)
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
    """The official decoding: argmax ids (B, L'); for conditional rows the condition prefix is
    dropped first and ``gen_length`` tokens kept; everything after the first EOS becomes ``pad_id``."""
    ids = logits.argmax(-1)
    if cond_mask is not None:
        ids = shift_left(ids, cond_mask.long().sum(1), 0)
        if gen_length is not None:
            ids = ids[:, :gen_length]
    return mask_after_eos(ids, eos_id, pad_id)
