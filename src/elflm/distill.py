"""Progressive distillation (PD) of ELF, as the official ``distillation`` branch trains it (golden
README §8). Each row takes one branch: CE (decode mode at t = 1 on the decoder latent, as in
training's decode branch) or PD: from ``z_{t_s}`` the student predicts in one step the x̂ implied
by the frozen teacher's Euler sub-steps from ``t_s`` to ``t_t = t_s + pd_step_size``.

Every random quantity of a step lives in :class:`Draws`; :func:`draw` makes them from a
``torch.Generator`` in the official call order (for a network with SC-CFG tokens, a CPU generator
seeded s gives the official step's draws under ``torch.manual_seed(s)``, bit for bit).
Time: t = 0 noise, t = 1 data.

Runs: :class:`DistillTrainer` is the :class:`~elflm.train.Trainer` whose step is this objective
(``elflm distill``: DDP / FSDP2, bf16, compile, EMA, checkpoints with exact resume, logging and
evaluation as in training); :func:`run_curriculum` runs rounds of shrinking step counts, each
student starting from the previous round's EMA weights, resumable at any moment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import distributed, flow
from .config import Config, ConfigError, DistillConfig, ModelConfig, ObjectiveConfig, validate
from .data.rows import loss_mask
from .files import write_text
from .model import ELF, model_config
from .objective import encode_batch, masked_mean
from .optim import EMA
from .plan import flops_per_token
from .train import Trainer

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


def logged_losses(out: PDLossOutput) -> dict[str, torch.Tensor]:
    """The official logged parts: ``loss``, and the mean row loss of the CE rows (``ce_loss``) and of
    the PD rows (``l2_loss``), each 0 when the step has no such row; 0-dim float64 tensors on the
    loss's device (no host sync)."""
    rows = out.rows.double()
    part = lambda m: torch.where(m, rows, 0.0).sum() / m.sum().clamp(min=1)  # noqa: E731
    return {"loss": out.loss.detach().double(), "ce_loss": part(out.ce), "l2_loss": part(~out.ce)}


def pd_flops_per_token(m: ModelConfig, length: int, cfg: ObjectiveConfig, pd: DistillConfig) -> float:
    """Expected model FLOPs per token of one PD step: the student's forward + backward (3 forwards;
    the decode head on the CE rows) and, on the PD rows, the teacher's forwards (the self-cond seed on
    a ``self_cond_prob`` share, then ``pd_teacher_steps``)."""
    p = cfg.decoder_prob
    student = 3 * (p * flops_per_token(m, length, True) + (1 - p) * flops_per_token(m, length, False))
    teacher = (1 - p) * (cfg.self_cond_prob + pd.pd_teacher_steps) * flops_per_token(m, length, False)
    return student + teacher


# ------------------------------------------------------------------------------ runs

_ARCHITECTURE = [
    f.name for f in fields(ModelConfig) if f.name not in ("encoder_dim", "vocab_size", "max_length", "dropout")
]
_ENCODER_KEYS = (
    "kind",
    "latent_mean",
    "latent_std",
)  # noted when the config differs (paths may name one encoder twice)


def require_teacher(pd: DistillConfig) -> None:
    """Raise :class:`~elflm.config.ConfigError` when ``distill.teacher`` is not set."""
    if not pd.teacher:
        raise ConfigError(
            "distill.teacher is not set: give the model to distil (--teacher PATH_OR_ID, or distill.teacher= in "
            "the config: a model folder, training run, official checkpoint or Hub id)",
            "distill.teacher",
        )


def load_teacher(pd: DistillConfig, which: str = "teacher") -> ELF:
    """The network ``distill.teacher`` (``which="student_init"``: ``distill.student_init``) names,
    on the CPU, without its encoder, with the EMA weights unless ``teacher_use_ema`` is false; its
    settings in ``.pretrained``."""
    require_teacher(pd)
    name = getattr(pd, which)
    try:
        return ELF.from_pretrained(name, raw=not pd.teacher_use_ema, encoder=False)
    except (OSError, ValueError) as e:
        raise type(e)(f"distill.{which}={name!r}: {e}") from e


def student_config(cfg: Config, teacher: ELF) -> tuple[Config, list[str]]:
    """``cfg`` with the teacher's architecture (``model``, but the config's ``dropout`` and
    ``data.max_length``) and embedding space (``encoder``, latent mean / std included): the student
    keeps both, as officially. Also the lines naming what the config said otherwise."""
    t, settings = teacher.config, teacher.pretrained
    if cfg.data.max_length > t.max_length:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the teacher's max_length {t.max_length}; "
            f"set data.max_length <= {t.max_length}",
            "data.max_length",
        )
    notes = [
        f"model.{k}: the config says {getattr(cfg.model, k)!r}, the teacher has {getattr(t, k)!r}; "
        "the student keeps the teacher's"
        for k in _ARCHITECTURE
        if getattr(cfg.model, k) != getattr(t, k)
    ]
    model = replace(cfg.model, **{k: getattr(t, k) for k in _ARCHITECTURE})
    e, o = settings.encoder, settings.objective
    encoder = replace(
        e,
        latent_mean=o.latent_mean if e.latent_mean is None else e.latent_mean,
        latent_std=o.latent_std if e.latent_std is None else e.latent_std,
    )
    notes += [
        f"encoder.{k}: the config says {getattr(cfg.encoder, k)!r}, the teacher's embedding space has "
        f"{getattr(encoder, k)!r}; the student keeps the teacher's"
        for k in _ENCODER_KEYS
        if getattr(cfg.encoder, k) not in (None, getattr(encoder, k))
    ]
    return validate(replace(cfg, model=model, encoder=encoder)), notes


def _check_same_network(got: ModelConfig, want: ModelConfig, what: str) -> None:
    diff = [k for k in _ARCHITECTURE + ["encoder_dim", "vocab_size"] if getattr(got, k) != getattr(want, k)]
    if diff:
        raise ValueError(
            f"{what} does not fit the student: "
            + ", ".join(f"{k} {getattr(got, k)} vs {getattr(want, k)}" for k in diff)
            + "; the teacher, the student and its encoder must share one architecture and embedding space"
        )


class DistillTrainer(Trainer):
    """The :class:`~elflm.train.Trainer` of one PD round: the step is :func:`loss_from_latents` with
    the frozen teacher ``cfg.distill.teacher`` (eval mode, EMA weights by default, on every process,
    compiled with ``train.compile``), draws from ``(seed, step, micro-batch)``. The student has the
    teacher's architecture and encoder (:func:`student_config`) and starts from the teacher's
    weights, or those of ``distill.student_init``; its EMA starts from them too. Everything else
    (DDP / FSDP2, bf16, checkpoints and exact resume, logging, evaluation, previews) is the
    Trainer's; ``train.branch`` does not apply (rows choose their branch in one student forward)."""

    def __init__(self, cfg: Config, device: str | None = None):
        teacher = load_teacher(cfg.distill)
        cfg, notes = student_config(cfg, teacher)
        super().__init__(cfg, device)
        if self.dist.main:
            for line in notes:
                print(f"distill: {line}", file=sys.stderr)
        _check_same_network(teacher.config, self.model_config, f"the teacher {cfg.distill.teacher}")
        self.teacher = freeze_teacher(teacher.to(self.dist.device))
        if cfg.train.compile:
            self.teacher.compile_blocks()
        start = teacher
        if cfg.distill.student_init:
            start = load_teacher(cfg.distill, "student_init")
            _check_same_network(start.config, self.model_config, f"distill.student_init={cfg.distill.student_init}")
        distributed.load_full_state_dict(self.net, start.state_dict())
        self.ema = EMA(self.net, decay=cfg.train.ema_decay)

    def flops_per_token(self, length: int) -> float:
        return pd_flops_per_token(self.model_config, length, self.cfg.objective, self.cfg.distill)

    def micro_loss(self, batch: dict, j: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The PD loss of micro-batch ``j`` of the current step (draws from ``(seed, step, j)``) and
        its logged parts (:func:`logged_losses`)."""
        cfg, d = self.cfg, self.dist
        B, L = batch["input_ids"].shape
        gen = flow.seeded(cfg.train.seed, self.step, j, device=d.device)
        draws = draw(cfg.objective, cfg.distill, B, L, self.model_config.encoder_dim, generator=gen, device=d.device)
        x0 = self.latents(batch, j)
        out = loss_from_latents(self.model, self.teacher, x0, batch, cfg.objective, cfg.distill, draws)
        return out.loss, logged_losses(out)


def distill(cfg: Config, device: str | None = None, progress: bool = True) -> DistillTrainer:
    """One PD round (``elflm distill``): build a :class:`DistillTrainer` from ``cfg`` and run it to
    the end; returns the trainer."""
    trainer = DistillTrainer(cfg, device)
    try:
        trainer.fit(progress=progress)
    finally:
        distributed.teardown()
    return trainer


AUTHORS_CURRICULUM = (16, 8, 4, 2, 1)  # student steps per round (scripts/progressive_distillation.sh)
TEACHER_RESOLUTION = 64  # the teacher's Euler sub-step, pd_step_size / pd_teacher_steps, is 1/64 in every round
STATE = "curriculum.json"  # in train.output_dir: the plan and the rounds done


@dataclass(frozen=True)
class Round:
    """Round ``index`` (from 1) of a curriculum: an N = ``steps``-step student (``pd_step_size`` 1/N)
    taught with ``teacher_steps`` Euler sub-steps per student step."""

    index: int
    steps: int
    teacher_steps: int

    def folder(self, output_dir: str | Path) -> Path:
        """The round's run folder, named as officially: ``round<k>_<N>step``."""
        return Path(output_dir) / f"round{self.index}_{self.steps}step"


def curriculum_rounds(steps: Sequence[int] = AUTHORS_CURRICULUM, resolution: int = TEACHER_RESOLUTION) -> list[Round]:
    """The rounds of a curriculum of student step counts ``steps`` (strictly decreasing, each
    dividing ``resolution``): round k has ``pd_teacher_steps = resolution / N_k``, so that the teacher's
    Euler sub-step, ``pd_step_size / pd_teacher_steps = 1/resolution``, is the same in every round
    (the authors: 16, 8, 4, 2, 1 at 64, i.e. 4, 8, 16, 32, 64 sub-steps; their script calls this
    ``pd_step_size * pd_teacher_steps = 1/64``, which its own table contradicts)."""
    shown = ",".join(map(str, steps))
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"teacher resolution {resolution!r}: expected an integer >= 1 (the authors: 64)")
    if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps):
        raise ValueError(f"curriculum {shown!r}: expected student step counts >= 1, e.g. 16,8,4,2,1")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"curriculum {shown}: the step counts must shrink from round to round, e.g. 16,8,4,2,1")
    bad = [n for n in steps if resolution % n]
    if bad:
        raise ValueError(
            f"curriculum {shown}: {', '.join(map(str, bad))} does not divide the teacher resolution {resolution} "
            "(each round's pd_teacher_steps is resolution / steps); choose divisors or another resolution"
        )
    return [Round(k, n, resolution // n) for k, n in enumerate(steps, 1)]


def round_config(cfg: Config, rnd: Round, previous: Path | None) -> Config:
    """The config of round ``rnd``: ``pd_step_size`` 1/N and its ``pd_teacher_steps``, the run folder
    :meth:`Round.folder` under ``cfg.train.output_dir`` resumed when it has a checkpoint, the student
    from ``previous`` (the last round's folder; round 1: ``distill.student_init`` or the teacher) and
    ``sample.steps`` N (the student's default sampler)."""
    pd = replace(
        cfg.distill,
        pd_step_size=1.0 / rnd.steps,
        pd_teacher_steps=rnd.teacher_steps,
        student_init=str(previous) if previous is not None else cfg.distill.student_init,
    )
    train = replace(cfg.train, output_dir=str(rnd.folder(cfg.train.output_dir)), resume="auto")
    return validate(replace(cfg, distill=pd, train=train, sample=replace(cfg.sample, steps=rnd.steps)))


def _read_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path}: cannot read the curriculum state ({e}); remove it to start the curriculum over"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("done"), int):
        raise ValueError(f"{path}: not a curriculum state; remove it to start the curriculum over")
    return state


def run_curriculum(
    cfg: Config,
    steps: Sequence[int] = AUTHORS_CURRICULUM,
    resolution: int = TEACHER_RESOLUTION,
    *,
    device: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Progressive distillation in rounds (:func:`curriculum_rounds`), each a :class:`DistillTrainer`
    run (:func:`round_config`) in its folder under ``train.output_dir``; returns the round folders
    (the last holds the final student). Every round trains ``train.max_steps`` steps (or
    ``train.epochs``).

    ``train.output_dir/curriculum.json`` records the plan and the rounds done (written after a
    round's last checkpoint), so a curriculum stopped at any moment resumes where it stopped when
    called again with the same plan: finished rounds are skipped, the current one resumes from its
    latest checkpoint. Under ``torchrun`` every process runs the rounds; rank 0 writes."""
    rounds = curriculum_rounds(list(steps), resolution)
    if cfg.train.resume not in (None, "auto"):
        raise ValueError(
            f"train.resume={cfg.train.resume!r}: a curriculum resumes from its own state "
            f"({Path(cfg.train.output_dir) / STATE}); drop train.resume (--resume)"
        )
    require_teacher(cfg.distill)
    out = Path(cfg.train.output_dir)
    state_file = out / STATE
    plan = {
        "rounds": [r.steps for r in rounds],
        "teacher_steps": [r.teacher_steps for r in rounds],
        "teacher": cfg.distill.teacher,
        "student_init": cfg.distill.student_init,
    }
    state = _read_state(state_file)
    if state is not None and {k: state.get(k) for k in plan} != plan:
        raise ValueError(
            f"{state_file}: this folder holds another curriculum ({ {k: state.get(k) for k in plan} }); this call "
            f"asks for {plan}. Use another train.output_dir, or the same --curriculum / teacher to resume it"
        )
    done = state["done"] if state is not None else 0
    d = distributed.setup(device or cfg.train.device, group=cfg.train.distributed == "fsdp")
    folders, previous = [], None
    try:
        for rnd in rounds:
            folders.append(rnd.folder(out))
            if rnd.index <= done:
                previous = folders[-1]
                continue
            rcfg = round_config(cfg, rnd, previous)
            if d.main:
                start = previous or cfg.distill.student_init or f"the teacher {cfg.distill.teacher}"
                print(
                    f"curriculum round {rnd.index}/{len(rounds)}: {rnd.steps}-step student (pd_step_size "
                    f"1/{rnd.steps}, {rnd.teacher_steps} teacher sub-steps) from {start} -> {folders[-1]}",
                    file=sys.stderr,
                    flush=True,
                )
            trainer = DistillTrainer(rcfg, device)
            trainer.fit(progress=progress)
            del trainer
            distributed.barrier(d)  # the round's last checkpoint is written before anyone reads it
            if d.main:
                out.mkdir(parents=True, exist_ok=True)
                write_text(state_file, json.dumps({**plan, "done": rnd.index}, indent=1) + "\n")
            previous = folders[-1]
    finally:
        distributed.teardown()
    return folders
