"""The official optimizer, learning-rate schedule and EMA, with optax's exact semantics.

The authors train with ``optax.chain(optax.clip_by_global_norm(1.0),
optax.contrib.muon(learning_rate=schedule))`` (optax 0.2.5). Here that is
:func:`clip_grad_norm_` followed by :class:`Muon`: every parameter with ``ndim == 2`` takes a
Muon step (Nesterov momentum with bias correction, Newton–Schulz orthogonalisation), every other
parameter (biases, norm weights, the ``(1, 4, H)`` control tokens) a Nesterov Adam step. The
learning rate per optimizer update is :func:`lr_at`; :class:`EMA` keeps the averaged weights that
sampling uses. ``torch.optim.Muon`` is not a substitute: it has no bias correction, runs
Newton–Schulz in bfloat16, decays weights by default and takes no non-matrix parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .distributed import unwrap

NS_COEFFS = (3.4445, -4.7750, 2.0315)
GRAM_MIN_RATIO = 16  # newton_schulz(gram=None) takes the Gram form for matrices at least this wide
GRAM_PANELS = 4  # row panels of gram_matrix (upper triangle only: 5/8 of the full product's FLOPs)


# ---------------------------------------------------------------------------- clipping
def clip_grad_norm_(params: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """optax ``clip_by_global_norm``: with ``n`` the L2 norm over all gradients, leave them as
    they are if ``n < max_norm``, else divide every gradient by ``n / max_norm``. Parameters
    without ``.grad`` count as zero. Returns ``n`` before clipping (0-dim tensor, no host sync).

    Works on plain gradients (also after DDP's all-reduce) and on FSDP2 ``DTensor`` gradients:
    the norm of sharded gradients is reduced over the mesh (``full_tensor`` of the partial norm),
    so every rank scales its shards by the same factor."""
    if isinstance(params, torch.Tensor):
        params = [params]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    divisor = torch.where(total < max_norm, torch.ones_like(total), total / max_norm)
    for device_grads in _by_device(grads).values():
        torch._foreach_div_(device_grads, divisor.to(device_grads[0].device))
    return total


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    out: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


# ---------------------------------------------------------------------------- Muon
def newton_schulz(
    x: torch.Tensor, coeffs=NS_COEFFS, steps: int = 5, eps: float = 1e-8, gram: bool | None = None
) -> torch.Tensor:
    """optax ``orthogonalize_via_newton_schulz`` of a matrix ``x`` (m, n): work on the wide
    orientation (transpose when m > n), ``X ← X / (‖X‖_F + eps)``, then ``steps`` times
    ``A = X·Xᵀ; X ← a·X + (b·A + c·A²)·X``; returned in the input orientation, input dtype.

    ``gram=True`` runs the same iteration on the small side: every iterate is ``X_k = Q_k·X_0``,
    so with ``G = X_0·X_0ᵀ`` (k, k), ``A_k = Q_k·G·Q_kᵀ`` and ``Q_{k+1} = (a·I + b·A_k + c·A_k²)·Q_k``;
    two (k, k)×(k, N) products in all instead of two per step (k = min(m, n), N = max(m, n)).
    ``G`` and ``Q`` are float64 (in float32 the squared condition number costs ~100× the plain
    iteration's rounding error; in float64 it is of the plain iteration's order); ``G`` is formed
    on and above the diagonal only (:func:`gram_matrix`). ``None``: Gram for CPU matrices with
    ``N >= GRAM_MIN_RATIO·k`` (embedding-like; there it is ~2-3× cheaper than the plain form)."""
    if x.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(x.shape)}")
    a, b, c = coeffs
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x) + eps)
    if gram is None:
        gram = x.device.type == "cpu" and x.shape[1] >= GRAM_MIN_RATIO * x.shape[0]
    if gram:
        g = gram_matrix(x.double())
        q = None
        for _ in range(steps):
            A = g if q is None else q @ g @ q.mT
            p = torch.addmm(A, A, A, beta=b, alpha=c)
            p.diagonal().add_(a)
            q = p if q is None else p @ q
        x = q.to(x.dtype) @ x
    else:
        for _ in range(steps):
            A = x @ x.mT
            x = torch.addmm(x, torch.addmm(A, A, A, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def gram_matrix(x: torch.Tensor, panels: int = GRAM_PANELS) -> torch.Tensor:
    """``x·xᵀ`` (k, k) of ``x`` (k, N), computed on and above the diagonal only: row panel i times
    rows i… (``panels`` panels), mirrored below; ~(panels + 1)/(2·panels) of the full product's
    FLOPs (each entry is the same dot product as in ``x @ x.mT``)."""
    k = x.shape[0]
    size = -(-k // panels)
    g = x.new_empty(k, k)
    for i in range(0, k, size):
        block = x[i : i + size] @ x[i:].mT  # (size, k − i): the panel's diagonal block and what is right of it
        g[i : i + size, i:] = block
        g[i + size :, i : i + size] = block[:, size:].mT
    return g


def _orthogonalized(m: torch.Tensor, group: dict) -> torch.Tensor:
    """Newton–Schulz of a torch-layout ``(out, in)`` momentum in the Flax ``(in, out)``
    orientation the official code uses. An FSDP2 ``DTensor`` is gathered, orthogonalised whole
    (on every rank) and handed back with the input's sharding."""
    full = m.full_tensor() if hasattr(m, "full_tensor") else m
    o = newton_schulz(full.mT, group["ns_coeffs"], group["ns_steps"], group["eps"], group["ns_gram"]).mT
    if full is m:
        return o
    from torch.distributed.tensor import DTensor, Replicate

    mesh = m.device_mesh
    o = DTensor.from_local(o.contiguous(), mesh, [Replicate()] * mesh.ndim, run_check=False)
    return o.redistribute(mesh, m.placements)


class Muon(torch.optim.Optimizer):
    """optax ``contrib.muon`` (0.2.5 defaults) for torch parameters.

    ``ndim == 2`` parameters (torch ``(out, in)`` weights), with ``n`` the update number from 1::

        m ← β·m + (1−β)·g
        m̂ = β·m/(1 − β^(n+1)) + (1−β)·g/(1 − β^n)             (Nesterov, bias-corrected)
        p ← p − lr·sqrt(max(1, out/in))·NS(m̂)                  (NS: :func:`newton_schulz`)

    all other parameters, Nesterov Adam (``optax.adamw(nesterov=True)``, weight decay 0)::

        m ← b1·m + (1−b1)·g;   v ← b2·v + (1−b2)·g²
        m̂ = b1·m/(1 − b1^(n+1)) + (1−b1)·g/(1 − b1^n);   v̂ = v/(1 − b2^n)
        p ← p − lr·m̂/(sqrt(v̂) + eps)

    ``ns_gram``: how NS runs (:func:`newton_schulz`'s ``gram``; default: the Gram form for
    CPU matrices at least 16 times as wide as tall, within a few times the plain form's float32
    rounding of the plain one).
    ``eps`` serves both branches, as in optax. No weight decay (the official run passes none).
    A parameter without ``.grad`` is stepped with a zero gradient, as optax steps every leaf:
    its momentum keeps moving it (a matrix in the direction orthogonalised at the first such step,
    see :meth:`_muon_update`). ``lr`` is read from each param group at every :meth:`step`
    (set it from :func:`lr_at`). State per parameter: ``step`` (0-dim int64 CPU tensor), ``mu`` and,
    for the Adam parameters, ``nu``; for a matrix stepped without gradient, ``direction``; all shaped
    like the parameter (DTensors under FSDP2)."""

    def __init__(
        self,
        params,
        lr: float = 0.0,
        *,
        momentum: float = 0.95,
        ns_coeffs: tuple[float, float, float] = NS_COEFFS,
        ns_steps: int = 5,
        eps: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        ns_gram: bool | None = None,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if len(ns_coeffs) != 3:
            raise ValueError(f"ns_coeffs must be three numbers (a, b, c), got {ns_coeffs}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if len(adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {adam_betas}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            ns_coeffs=tuple(ns_coeffs),
            ns_steps=ns_steps,
            eps=eps,
            adam_betas=tuple(adam_betas),
            ns_gram=ns_gram,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if g.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0, dtype=torch.int64)
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if p.ndim != 2:
                        state["nu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                n = int(state["step"])
                if p.ndim == 2:
                    self._muon_update(p, None if p.grad is None else g, state, n, group)
                else:
                    self._adam_update(p, g, state["mu"], state["nu"], n, group)
        return loss

    @staticmethod
    def _muon_update(p, g, state, n, group):
        """One Muon update of ``p``; ``g`` None: no gradient (a head the step's branch skipped).
        Then ``m`` only decays and ``m̂ = β·m/(1 − β^(n+1))`` is a positive multiple of ``m``,
        whose direction (kept in ``state["direction"]`` from the first such step) is reused:
        ``NS(c·m) = NS(m)`` up to float rounding, as NS first divides by ``‖m‖ + eps``. On CPU this
        skips the Newton–Schulz of the 30522-wide unembedding on every denoise step after the first."""
        beta, mu = group["momentum"], state["mu"]
        mu.mul_(beta)
        if g is None:
            direction = state.get("direction")
            if direction is None:
                direction = state["direction"] = _orthogonalized(mu * (beta / (1 - beta ** (n + 1))), group)
        else:
            state.pop("direction", None)
            mu.add_(g, alpha=1 - beta)
            mu_hat = torch.mul(mu, beta / (1 - beta ** (n + 1))).add_(g, alpha=(1 - beta) / (1 - beta**n))
            direction = _orthogonalized(mu_hat, group)
        scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        p.add_(direction, alpha=-group["lr"] * scale)

    @staticmethod
    def _adam_update(p, g, mu, nu, n, group):
        b1, b2 = group["adam_betas"]
        mu.mul_(b1).add_(g, alpha=1 - b1)
        nu.mul_(b2).addcmul_(g, g, value=1 - b2)
        mu_hat = torch.mul(mu, b1 / (1 - b1 ** (n + 1))).add_(g, alpha=(1 - b1) / (1 - b1**n))
        denom = (nu / (1 - b2**n)).sqrt_().add_(group["eps"])
        p.addcdiv_(mu_hat, denom, value=-group["lr"])


_HPARAMS = ("momentum", "ns_coeffs", "ns_steps", "eps", "adam_betas", "ns_gram")


def build_optimizer(model: nn.Module, cfg=None) -> torch.optim.Optimizer:
    """:class:`Muon` over the trainable parameters of ``model`` (DDP / ``torch.compile``
    wrappers unwrapped; FSDP2 modules as they are), one param group, ``lr`` 0 until the
    schedule sets it. Hyper-parameters come from ``cfg.muon_<name>`` for ``<name>`` in
    momentum, ns_coeffs, ns_steps, eps, adam_betas, ns_gram where ``cfg`` has that attribute, else the
    official defaults; ``cfg.optimizer == "adamw"`` gives ``torch.optim.AdamW`` with
    ``adam_b1``, ``adam_b2``, ``weight_decay``. (The official ``adam_b1``/``adam_b2``/``weight_decay`` config fields do
    not reach Muon; its Adam branch always uses 0.9/0.999 and no decay.)"""
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if getattr(cfg, "optimizer", "muon") == "adamw":  # the official alternative: optax.adamw
        return torch.optim.AdamW(
            params, lr=0.0, betas=(cfg.adam_b1, cfg.adam_b2), eps=1e-8, weight_decay=cfg.weight_decay
        )
    kw = {k: getattr(cfg, "muon_" + k) for k in _HPARAMS if hasattr(cfg, "muon_" + k)}
    return Muon(params, lr=0.0, **kw)


# ---------------------------------------------------------------------------- LR schedule
def peak_lr(blr: float, global_batch: int) -> float:
    """The official learning-rate scaling ``blr · global_batch / 256``; ``global_batch`` counts
    every sample of one optimizer update (processes × micro-batch × accumulation)."""
    return blr * global_batch / 256


def lr_at(
    step: int, *, peak: float, warmup: int, total: int | None = None, schedule: str = "constant", min_lr: float = 0.0
) -> float:
    """Learning rate of optimizer update ``step`` (counted from 0), as the official
    ``create_learning_rate_fn``: ``peak·step/warmup`` for ``step < warmup`` (so the first update
    has lr 0), then ``peak`` (``constant``) or a cosine from ``peak`` at ``warmup`` down to
    ``min_lr`` at ``total`` and ``min_lr`` after it (``cosine``)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")
    if step < 0 or warmup < 0:
        raise ValueError(f"step and warmup must be >= 0, got step={step}, warmup={warmup}")
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    if total is None or total <= warmup:
        raise ValueError(f"the cosine schedule needs total steps > warmup ({warmup}), got total={total}")
    decay = total - warmup
    alpha = min_lr / peak if peak > 0 else 0.0
    cos = 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
    return peak * ((1 - alpha) * cos + alpha)


# ---------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's parameters (the official ``ema_params1``):
    initialised to a copy of the parameters, then after every optimizer step
    ``ema ← decay·ema + (1 − decay)·param`` (no warm-up, no bias correction).

    Names are those of the plain module's ``state_dict`` (DDP's ``module.`` removed; blocks are
    compiled in place, so their names do not change). Under FSDP2 the averages are DTensor shards
    like the parameters; gather them with ``distributed.full_tensor`` to save."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in _named_params(model)}

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(_named_params(model))
        if params.keys() != self.shadow.keys():
            diff = sorted(params.keys() ^ self.shadow.keys())
            raise ValueError(f"model parameters differ from the EMA's: {diff[:5]}")
        return [params[n] for n in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current parameters of ``model`` into the average (call after ``step()``)."""
        ema = list(self.shadow.values())
        torch._foreach_mul_(ema, self.decay)
        torch._foreach_add_(ema, [p.detach() for p in self._params(model)], alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the parameters of ``model`` with the averages."""
        for p, e in zip(self._params(model), self.shadow.values()):
            p.copy_(e)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.swapped(model):`` runs the block with the averaged weights in ``model``
        (e.g. for sampling) and restores the trained weights afterwards."""
        params = self._params(model)
        backup = [p.detach().clone() for p in params]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: average}`` (the live tensors, not copies)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy averages saved by :meth:`state_dict` (same names and shapes; shard them like the
        parameters first under FSDP2)."""
        if state.keys() != self.shadow.keys():
            diff = sorted(state.keys() ^ self.shadow.keys())
            raise ValueError(f"EMA state names differ from the model's parameters: {diff[:5]}")
        for name, e in self.shadow.items():
            if tuple(state[name].shape) != tuple(e.shape):
                raise ValueError(f"EMA state {name}: shape {tuple(state[name].shape)}, expected {tuple(e.shape)}")
            e.copy_(state[name])


def _named_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return unwrap(model).named_parameters()
