"""The ELF training objective (SPEC §5): one branch per step, denoise (velocity L2 with the
self-conditioning-CFG target) or decode (token cross-entropy).

Every random quantity of a step lives in :class:`Draws`, so tests can inject the golden draws;
:func:`draw` makes them from a ``torch.Generator``. Time: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import flow
from .config import ObjectiveConfig
from .data.rows import encoder_mask, loss_mask
from .model import model_config


@dataclass
class Draws:
    """Random draws of one training step for a batch of B rows of L tokens, width C."""

    decode: bool  # branch: True = decode (cross-entropy), False = denoise
    t: torch.Tensor  # (B,) denoise times
    eps: torch.Tensor  # (B, L, C) standard-normal noise for z_t
    w: torch.Tensor  # (B,) self-conditioning-CFG scales
    self_cond: torch.Tensor  # (B,) bool, rows that get the self-conditioning input
    dec_lambda: torch.Tensor  # (B, L, 1) per-token signal fraction of the decode branch
    dec_eps: torch.Tensor  # (B, L, C) standard-normal noise of the decode branch
    label_drop: torch.Tensor  # (B,) bool, rows whose condition is dropped (CFG training)


def draw(cfg: ObjectiveConfig, B: int, L: int, C: int, generator=None, device=None) -> Draws:
    """Draw every random quantity of one step from ``generator``."""
    g = dict(generator=generator, device=device)
    decode = bool(torch.rand((), **g) < cfg.decoder_prob)
    return Draws(
        decode=decode,
        t=flow.sample_time(B, cfg.time_schedule, cfg.p_mean, cfg.p_std, **g),
        eps=torch.randn(B, L, C, **g),
        w=flow.guidance_scale(torch.rand(B, **g), cfg.self_cond_cfg_min, cfg.self_cond_cfg_max),
        self_cond=torch.rand(B, **g) < cfg.self_cond_prob,
        dec_lambda=flow.logit_normal(torch.randn(B, L, 1, **g), cfg.decoder_p_mean, cfg.decoder_p_std),
        dec_eps=torch.randn(B, L, C, **g),
        label_drop=torch.rand(B, **g) < cfg.label_drop_prob,
    )


@dataclass
class LossOutput:
    loss: torch.Tensor  # () the differentiated loss of the branch taken
    decode: bool  # which branch
    tokens: torch.Tensor  # () number of tokens in the loss mask


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ per_token·mask / max(Σ mask, 1) over the whole batch, (B, L) -> (), or along ``dim``
    (``dim=-1``: per row, (B, L) -> (B,)). Masked-out entries never leak in (not even NaN)."""
    mask = mask.to(per_token.dtype)
    total = torch.where(mask > 0, per_token, 0.0) * mask
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1.0)
    return total.sum(dim) / mask.sum(dim).clamp(min=1.0)


def denoise_loss(model, x0, cond, lmask, cfg: ObjectiveConfig, d: Draws, reuse_prediction: bool = True):
    """Velocity L2 with the self-conditioning-CFG target. x0 (B, L, C) after label drop, cond (B, L)
    bool condition positions, lmask (B, L). With ``reuse_prediction`` the guided-pass velocity is the
    detached prediction itself (same input for self-conditioned rows, no dropout), saving one pass,
    and the no-grad self-conditioning pass runs only on the self-conditioned rows, the only ones
    whose input or target use it (at least one row, so every process makes the same calls). The
    result equals the official passes' up to float rounding (with dropout: in distribution, as
    fewer dropout masks are drawn)."""
    mcfg = model_config(model)
    w = d.w if mcfg.num_self_cond_cfg_tokens else None
    z = flow.add_noise(x0, d.eps, d.t, cfg.noise_scale, cond)
    target = flow.velocity(x0, z, d.t, cfg.t_eps)
    if cfg.self_cond_prob == 0 or not mcfg.self_cond:
        v = flow.velocity(model(z, d.t, w).x_hat, z, d.t, cfg.t_eps)
        return masked_mean((v - target).pow(2).mean(-1), lmask)
    use = d.self_cond.to(x0.device)[:, None, None]
    with torch.no_grad():
        sc0 = flow.restore(torch.zeros_like(x0), x0, cond)
        rows = torch.arange(x0.shape[0], device=x0.device)
        if reuse_prediction:
            used = use.flatten().nonzero().flatten()  # host sync: the batch size of the pass
            rows = used if used.numel() else rows[:1]
        pick = lambda a: None if a is None else a.index_select(0, rows)
        o0 = model(torch.cat([pick(z), pick(sc0)], -1), pick(d.t), pick(w)).x_hat.to(x0.dtype)
        x_u = sc0.index_copy(0, rows, flow.restore(o0, pick(x0), pick(cond)))
        v_u = torch.zeros_like(z).index_copy(0, rows, flow.velocity(o0, pick(z), pick(d.t), cfg.t_eps))
    sc = flow.restore(x_u * use.to(x_u.dtype), x0, cond)
    v = flow.velocity(model(torch.cat([z, sc], -1), d.t, w).x_hat, z, d.t, cfg.t_eps)
    if w is not None:
        with torch.no_grad():
            if reuse_prediction and not (model.training and mcfg.dropout > 0):
                v_c = v.detach()
            else:
                v_c = flow.velocity(model(torch.cat([z, x_u], -1), d.t, w).x_hat, z, d.t, cfg.t_eps)
            guide = (1 - 1 / flow.expand(w, x0)) * (v_c - v_u)
            target = target + torch.where(use, guide, 0.0)
    return masked_mean((v - target.float()).float().pow(2).mean(-1), lmask)


def decode_loss(model, x0, input_ids, lmask, cfg: ObjectiveConfig, d: Draws, fused_ce: bool = True):
    """Token cross-entropy of the decode mode on ``z_dec = λ·x0 + (1 − λ)·σ_dec·ε`` at t = 1
    (condition positions noised too). x0 (B, L, C), input_ids (B, L) -> (). ``fused_ce``: the model
    computes the cross-entropy of the loss-mask tokens only, in chunks, without the (B, L, V)
    logits (``model(..., targets=)``); else the reference: full logits, then cross-entropy."""
    mcfg = model_config(model)
    w = d.w if mcfg.num_self_cond_cfg_tokens else None
    z = flow.decoder_latent(x0, d.dec_lambda, d.dec_eps, cfg.decoder_noise_scale)
    x = torch.cat([z, torch.zeros_like(z)], -1) if mcfg.self_cond and cfg.self_cond_prob > 0 else z
    if fused_ce:
        targets = torch.where(lmask > 0, input_ids.long(), -1)
        ce = model(x, torch.ones_like(d.t), w, decode=True, targets=targets).token_ce
    else:
        logits = model(x, torch.ones_like(d.t), w, decode=True).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten().long(), reduction="none")
    return masked_mean(ce.view_as(input_ids).float(), lmask)


def loss_from_latents(
    model, x0, batch: dict, cfg: ObjectiveConfig, d: Draws, reuse_prediction: bool = True, fused_ce: bool = True
) -> LossOutput:
    """The step loss given clean latents ``x0`` (B, L, C) of ``batch`` (``input_ids``,
    ``attention_mask``, ``cond_seq_mask`` (B, L)). Label-dropped rows get zero condition latents.
    ``reuse_prediction`` / ``fused_ce``: the fast paths of :func:`denoise_loss` / :func:`decode_loss`."""
    flow.check_finite(x0=x0)
    cond = batch["cond_seq_mask"].bool()
    if x0.shape[:2] != cond.shape:
        raise ValueError(f"latents {tuple(x0.shape)} do not match the batch masks {tuple(cond.shape)}")
    drop = d.label_drop.to(cond.device)[:, None] & cond
    x0 = flow.restore(x0, 0.0, drop)
    lmask = loss_mask(batch, cfg.pad_token)
    if d.decode:
        loss = decode_loss(model, x0, batch["input_ids"], lmask, cfg, d, fused_ce)
    else:
        loss = denoise_loss(model, x0, cond, lmask, cfg, d, reuse_prediction)
    return LossOutput(loss=loss, decode=d.decode, tokens=lmask.sum())


def encode_batch(encoder, batch: dict, label_drop: torch.Tensor | None = None) -> torch.Tensor:
    """Clean latents (B, L, C) of a batch; for label-dropped rows the target tokens may not attend
    to the condition in the encoder (SPEC §1); ``label_drop`` (B,) bool."""
    return encoder.encode(batch["input_ids"], encoder_mask(batch, label_drop))


def training_loss(
    model, encoder, batch: dict, cfg: ObjectiveConfig, d: Draws, reuse_prediction: bool = True, fused_ce: bool = True
) -> LossOutput:
    """Encode ``batch`` with the frozen ``encoder`` and return the loss of one step."""
    x0 = encode_batch(encoder, batch, d.label_drop)
    return loss_from_latents(model, x0, batch, cfg, d, reuse_prediction, fused_ce)


def logged_losses(out: LossOutput, cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """The official logged parts: the branch loss divided by its probability, the other 0; 0-dim
    float64 tensors on the loss's device (no host sync: the training loop reads them when it logs)."""
    value = out.loss.detach().double()
    p = cfg.decoder_prob if out.decode else 1 - cfg.decoder_prob
    part = value / p if p > 0 else torch.zeros_like(value)
    zero = torch.zeros_like(value)
    return {"loss": value, "ce_loss": part if out.decode else zero, "l2_loss": zero if out.decode else part}
