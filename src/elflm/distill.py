"""Progressive distillation (PD) of ELF, as the official ``distillation`` branch trains it (golden
README §8). Each row takes one branch: CE (decode mode at t = 1 on the decoder latent, as in
training's decode branch) or PD: from ``z_{t_s}`` the student predicts in one step the x̂ implied
by the frozen teacher's Euler sub-steps from ``t_s`` to ``t_t = t_s + pd_step_size``.

Every random quantity of a step lives in :class:`Draws`; :func:`draw` makes them from a
``torch.Generator`` in the official call order (for a network with SC-CFG tokens, a CPU generator
seeded s gives the official step's draws under ``torch.manual_seed(s)``, bit for bit).
Time: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import flow
from .config import DistillConfig, ObjectiveConfig
from .data.rows import loss_mask
from .model import model_config
from .objective import encode_batch, masked_mean

MIN_SPAN = 1e-6  # floor of the span in the implied-x̂ ratio
FALLBACK_SPAN = 1e-3  # rows with a shorter span take the teacher's last x̂ as target


@dataclass
class Draws:
    """Random draws of one PD step for B rows of L tokens, width C, n = ``pd_teacher_steps``."""

    ce: torch.Tensor  # (B,) bool, rows of the CE (decode) branch; the others are PD rows
    u: torch.Tensor  # (B,) student time from pd_student_schedule, before the rescale to the span
    w: torch.Tensor  # (B,) self-conditioning-CFG scales
    dec_lambda: torch.Tensor  # (B, L, 1) per-token signal fraction of the decoder latent
    dec_eps: torch.Tensor  # (B, L, C) standard-normal noise of the decoder latent
    eps: torch.Tensor  # (B, L, C) standard-normal noise of z_{t_s}
    self_cond: torch.Tensor  # (B,) bool, PD rows whose self-cond half is the teacher's seed x̂
    sub_u: torch.Tensor  # (B, n − 1) unsorted interior sub-step times in [0, 1] from pd_teacher_schedule

    def to(self, device) -> Draws:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def draw(cfg: ObjectiveConfig, pd: DistillConfig, B: int, L: int, C: int, generator=None, device=None) -> Draws:
    """Draw every random quantity of one PD step from ``generator``, in the official order."""
    g = dict(generator=generator, device=device)
    coin = lambda p: torch.bernoulli(torch.full((B,), float(p), device=device), generator=generator).bool()  # noqa: E731
    ce = coin(cfg.decoder_prob)
    u = flow.sample_time(B, pd.pd_student_schedule, cfg.p_mean, cfg.p_std, **g)
    if cfg.self_cond_cfg_max > cfg.self_cond_cfg_min:
        w = flow.guidance_scale(torch.rand(B, **g), cfg.self_cond_cfg_min, cfg.self_cond_cfg_max)
    else:
        w = torch.full((B,), float(cfg.self_cond_cfg_min), device=device)
    dec_lambda = flow.logit_normal(torch.randn(B * L, **g), cfg.decoder_p_mean, cfg.decoder_p_std).view(B, L, 1)
    dec_eps = torch.randn(B, L, C, **g)
    eps = torch.randn(B, L, C, **g)
    self_cond = coin(cfg.self_cond_prob) if cfg.self_cond_prob > 0 else torch.zeros(B, dtype=torch.bool, device=device)
    n = pd.pd_teacher_steps
    if n > 1:
        sub_u = flow.sample_time(B * (n - 1), pd.pd_teacher_schedule, cfg.p_mean, cfg.p_std, **g).view(B, n - 1)
    else:
        sub_u = torch.zeros(B, 0, device=device)
    return Draws(ce, u, w, dec_lambda, dec_eps, eps, self_cond, sub_u)


def student_times(ce: torch.Tensor, u: torch.Tensor, pd_step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_s, t_t), each (B,): PD rows ``t_s = u·max(1 − pd_step_size, 1e-6)``, ``t_t = t_s +
    pd_step_size`` (just above 1 when ``pd_step_size = 1``, as officially); CE rows (1, 1)."""
    t_s = u * max(1.0 - pd_step_size, 1e-6)
    t_t = t_s + pd_step_size
    one = torch.ones_like(t_s)
    return torch.where(ce, one, t_s), torch.where(ce, one, t_t)


def sub_step_times(t_s: torch.Tensor, t_t: torch.Tensor, sub_u: torch.Tensor) -> torch.Tensor:
    """(B, n + 1) teacher times ``[t_s, t_s + (t_t − t_s)·sort(sub_u), t_t]`` of (B,) spans and
    (B, n − 1) draws; CE rows (t_s = t_t = 1) give all ones."""
    span = (t_t - t_s)[:, None]
    inner = t_s[:, None] + span * sub_u.sort(dim=-1).values
    return torch.cat([t_s[:, None], inner, t_t[:, None]], dim=-1)


def freeze_teacher(teacher):
    """Make ``teacher`` a frozen teacher (eval mode, no parameter gradients) and return it."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _net_input(model, z: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """``[z, sc]`` (B, L, 2C) for a self-conditioned network, else ``z``."""
    return torch.cat([z, sc], dim=-1) if model_config(model).self_cond else z


@torch.no_grad()
def teacher_x_hat(teacher, z: torch.Tensor, sc: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One frozen teacher forward in denoise mode: x̂ (B, L, C) of ``[z, sc]`` (each (B, L, C)) at
    times ``t`` (B,) with self-cond-CFG scales ``w`` (B,)."""
    return teacher(_net_input(teacher, z, sc), t, w).x_hat.to(z.dtype)


@torch.no_grad()
def teacher_target(teacher, x0, cond, z, sc, times, w, t_eps: float) -> torch.Tensor:
    """The PD target (B, L, C). The teacher takes n = ``times.shape[1] − 1`` Euler sub-steps of
    ``v = (x̂ − z)/max(1 − t, t_eps)`` from ``z`` = z_{t_s} (B, L, C) at ``times[:, 0]`` = t_s to
    ``times[:, -1]`` = t_t, the condition positions (``cond`` (B, L)) pinned to ``x0``; its
    self-cond half is ``sc`` on the first sub-step, then its previous x̂ (condition positions x0).
    The target is the x̂ at t_s implied by the result, ``z + (1 − t_s)/max(t_t − t_s, 1e-6)·(z_tt −
    z)``, or the last x̂ where ``t_t − t_s < 1e-3``; with n = 1 the teacher's x̂ itself."""
    t_s, t_t = times[:, 0], times[:, -1]
    x_hat = teacher_x_hat(teacher, z, sc, t_s, w)
    if times.shape[1] == 2:
        return x_hat
    z_t = z
    for k in range(times.shape[1] - 1):
        if k:
            x_hat = teacher_x_hat(teacher, z_t, flow.restore(x_hat, x0, cond), times[:, k], w)
        v = flow.velocity(x_hat, z_t, times[:, k], t_eps)
        z_t = flow.restore(z_t + flow.expand(times[:, k + 1] - times[:, k], z_t) * v, x0, cond)
    span = t_t - t_s
    ratio = (1 - t_s) / span.clamp(min=MIN_SPAN)
    target = z + flow.expand(ratio, z) * (z_t - z)
    return torch.where((span < FALLBACK_SPAN).view(-1, 1, 1), x_hat, target)


class PDInputs(NamedTuple):
    """What the teacher side of a PD step builds (:func:`pd_inputs`); B rows, L tokens, width C."""

    t_s: torch.Tensor  # (B,) student time (CE rows: 1)
    t_t: torch.Tensor  # (B,) end of the student's step (CE rows: 1)
    times: torch.Tensor  # (B, n + 1) teacher sub-step times
    z: torch.Tensor  # (B, L, C) z_{t_s}, condition positions clean
    sc: torch.Tensor  # (B, L, C) self-cond half of student and teacher (condition positions: x0, CE rows too)
    target: torch.Tensor  # (B, L, C) PD target (CE rows: unused by the loss, arbitrary when skipped)
    x: torch.Tensor  # (B, L, 2C) student input [decoder latent (CE rows) or z_{t_s}, sc]; without self-cond (B, L, C)


def _on_rows(fn, rows: torch.Tensor | None, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)`` on the batch rows ``rows`` only (None: all), scattered into zeros elsewhere."""
    if rows is None:
        return fn(*args)
    out = fn(*(a.index_select(0, rows) for a in args))
    return out.new_zeros((args[0].shape[0], *out.shape[1:])).index_copy(0, rows, out)


def _rows(mask: torch.Tensor, skip: bool) -> torch.Tensor | None:
    """Indices of the rows set in ``mask`` (B,), at least one so that every process makes the same
    teacher calls; None (all rows) unless ``skip``."""
    if not skip:
        return None
    rows = mask.nonzero().flatten()  # host sync: the batch size of the teacher passes
    return rows if rows.numel() else rows.new_zeros(1)


@torch.no_grad()
def pd_inputs(
    teacher, x0, cond, cfg: ObjectiveConfig, pd: DistillConfig, d: Draws, skip_unused_rows: bool = True
) -> PDInputs:
    """The teacher side of a step: times, z_{t_s}, the self-cond half (rows with ``d.self_cond``
    among the PD rows: the teacher's x̂ on ``[z_{t_s}, s0]``, s0 zero but x0 at condition
    positions; other rows s0), the target of :func:`teacher_target` and the student input. x0 (B, L,
    C) clean latents, cond (B, L) bool condition positions. ``skip_unused_rows``: the teacher runs
    only on the rows whose result the loss uses (the seed on self-conditioned PD rows, the target on
    PD rows) instead of on all rows as officially; equal up to float rounding."""
    if d.sub_u.shape[1] != pd.pd_teacher_steps - 1:
        raise ValueError(
            f"draws hold {d.sub_u.shape[1]} interior sub-step times, pd_teacher_steps="
            f"{pd.pd_teacher_steps} needs {pd.pd_teacher_steps - 1}; draw with the same DistillConfig"
        )
    t_s, t_t = student_times(d.ce, d.u.to(x0.dtype), pd.pd_step_size)
    times = sub_step_times(t_s, t_t, d.sub_u.to(x0.dtype))
    z = flow.add_noise(x0, d.eps, t_s, cfg.noise_scale, cond)
    w = d.w.to(x0.dtype)
    s0 = flow.restore(torch.zeros_like(x0), x0, cond)
    use = d.self_cond & ~d.ce
    sc = s0
    if cfg.self_cond_prob > 0 and model_config(teacher).self_cond:
        seed = _on_rows(lambda *a: teacher_x_hat(teacher, *a), _rows(use, skip_unused_rows), z, s0, t_s, w)
        sc = flow.restore(torch.where(use[:, None, None], seed, 0.0), x0, cond)
    target = _on_rows(
        lambda *a: teacher_target(teacher, *a, cfg.t_eps), _rows(~d.ce, skip_unused_rows), x0, cond, z, sc, times, w
    )
    z_dec = flow.decoder_latent(x0, d.dec_lambda, d.dec_eps, cfg.decoder_noise_scale)
    x = _net_input(teacher, torch.where(d.ce[:, None, None], z_dec, z), sc)
    return PDInputs(t_s, t_t, times, z, sc, target, x)


@dataclass
class PDLossOutput:
    loss: torch.Tensor  # () the differentiated loss: mean over rows of the row losses
    rows: torch.Tensor  # (B,) detached row losses: token CE (CE rows) or x̂ MSE (PD rows)
    ce: torch.Tensor  # (B,) bool, CE rows
    tokens: torch.Tensor  # () number of tokens in the loss mask


def loss_from_latents(
    student,
    teacher,
    x0,
    batch: dict,
    cfg: ObjectiveConfig,
    pd: DistillConfig,
    d: Draws,
    skip_unused_rows: bool = True,
    fused_ce: bool = True,
) -> PDLossOutput:
    """The PD step loss given clean latents ``x0`` (B, L, C) of ``batch`` (``input_ids``,
    ``attention_mask``, ``cond_seq_mask`` (B, L)); no label drop (the official step has none). One
    student forward on :func:`pd_inputs`' input at t_s with the rows' w and per-row mode (decode on
    CE rows); row loss = loss-mask mean over the row's tokens of the token cross-entropy (CE rows)
    or of the channel-mean ``(x̂ − target)²`` (PD rows: x̂ itself, not a velocity); loss = mean over
    rows. ``fused_ce``: the model computes the cross-entropy of the CE rows' loss-mask tokens only
    (else full logits, then cross-entropy)."""
    flow.check_finite(x0=x0)
    cond = batch["cond_seq_mask"].bool()
    if x0.shape[:2] != cond.shape:
        raise ValueError(f"latents {tuple(x0.shape)} do not match the batch masks {tuple(cond.shape)}")
    if teacher.training:
        raise ValueError("the teacher is in training mode; freeze it first: elflm.distill.freeze_teacher(teacher)")
    d = d.to(x0.device)
    inp = pd_inputs(teacher, x0, cond, cfg, pd, d, skip_unused_rows)
    lmask = loss_mask(batch, cfg.pad_token)
    ids = batch["input_ids"].long()
    if fused_ce:
        targets = torch.where((lmask > 0) & d.ce[:, None], ids, -1)
        out = student(inp.x, inp.t_s, d.w, decode=d.ce, targets=targets)
        token_ce = out.token_ce
    else:
        out = student(inp.x, inp.t_s, d.w, decode=d.ce)
        token_ce = F.cross_entropy(out.logits.float().flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
    ce_rows = masked_mean(token_ce.float(), lmask, dim=-1)
    mse_rows = masked_mean((out.x_hat.float() - inp.target.float()).pow(2).mean(-1), lmask, dim=-1)
    rows = torch.where(d.ce, ce_rows, mse_rows)
    return PDLossOutput(loss=rows.mean(), rows=rows.detach(), ce=d.ce, tokens=lmask.sum())


def training_loss(
    student,
    teacher,
    encoder,
    batch: dict,
    cfg: ObjectiveConfig,
    pd: DistillConfig,
    d: Draws,
    skip_unused_rows: bool = True,
    fused_ce: bool = True,
) -> PDLossOutput:
    """Encode ``batch`` with the frozen ``encoder`` and return the PD loss of one step."""
    x0 = encode_batch(encoder, batch)
    return loss_from_latents(student, teacher, x0, batch, cfg, pd, d, skip_unused_rows, fused_ce)


def logged_losses(out: PDLossOutput) -> dict[str, float]:
    """The official logged parts: ``loss``, and the mean row loss of the CE rows (``ce_loss``) and of
    the PD rows (``l2_loss``), each 0 when the step has no such row."""
    part = lambda m: float(torch.where(m, out.rows, 0.0).sum() / m.sum().clamp(min=1))  # noqa: E731
    return {"loss": float(out.loss.detach()), "ce_loss": part(out.ce), "l2_loss": part(~out.ce)}
