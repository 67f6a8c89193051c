"""Losses and gradients of one official train step (golden/train_step.npz)."""

import pytest
import torch

from elflm import flow
from elflm.config import ObjectiveConfig
from elflm.data.rows import batch_from_rows, build_rows, encoder_mask
from elflm.formats.flax import flax_params_to_state_dict
from elflm.objective import Draws, draw, encode_batch, logged_losses, loss_from_latents, masked_mean

from conftest import load_npz
from golden_utils import T, assert_close, tiny_model, tree

CASES = [(n, b) for n in ("uncond", "cond") for b in ("denoise", "decode")]


def objective_config(name: str) -> ObjectiveConfig:
    if name == "uncond":
        return ObjectiveConfig(decoder_noise_scale=5.0, pad_token="pad", label_drop_prob=0.0)
    return ObjectiveConfig(decoder_noise_scale=1.0, pad_token="eos", label_drop_prob=0.1)


def golden_draws(g, name: str, branch: str) -> Draws:
    """The official step's draws, mapped onto our :class:`Draws`."""
    r = lambda s: T(g, f"{name}/{branch}/rand/{s}")
    cfg = objective_config(name)
    B, L, C = g[f"{name}/{branch}/rand/train_step/normal_0"].shape
    return Draws(
        decode=bool(g[f"{name}/{branch}/rand/train_step/bernoulli_0"]),
        t=flow.logit_normal(r("sampling_utils/normal_0"), cfg.p_mean, cfg.p_std),
        eps=r("train_step/normal_0"),
        w=flow.guidance_scale(r("sampling_utils/uniform_0"), cfg.self_cond_cfg_min, cfg.self_cond_cfg_max),
        self_cond=r("train_step/uniform_0") < cfg.self_cond_prob,
        dec_lambda=flow.logit_normal(r("train_step/normal_1").reshape(B, L, 1), cfg.decoder_p_mean, cfg.decoder_p_std),
        dec_eps=r("train_step/normal_2"),
        label_drop=T(g, f"{name}/batch/label_drop_mask").bool(),
    )


@pytest.fixture(scope="module")
def g(golden_dir):
    return load_npz("train_step.npz")


def batch_of(g, name):
    return {
        k: T(g, f"{name}/batch/{k}") for k in ("input_ids", "attention_mask", "cond_seq_mask", "encoder_attention_mask")
    }


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "official-passes"])
@pytest.mark.parametrize("name,branch", CASES)
def test_loss_and_gradients_match_official(g, name, branch, reuse):
    model = tiny_model("train_step.npz", "params")
    model.train()
    d = golden_draws(g, name, branch)
    assert d.decode == (branch == "decode")
    assert_close(d.t, g[f"{name}/{branch}/drawn/t"], 1e-6, "t")
    assert_close(d.w, g[f"{name}/{branch}/drawn/self_cond_cfg_scale"], 1e-6, "w")
    x0 = T(g, f"{name}/{branch}/inter/x0_encoded")
    cfg = objective_config(name)
    out = loss_from_latents(model, x0, batch_of(g, name), cfg, d, reuse_prediction=reuse)
    ref = float(g[f"{name}/{branch}/metrics/loss"])
    assert abs(out.loss.item() - ref) <= 1e-5 * abs(ref), (out.loss.item(), ref)
    logged = logged_losses(out, cfg)
    for part in ("ce_loss", "l2_loss"):
        exp = float(g[f"{name}/{branch}/metrics/{part}"])
        assert abs(logged[part] - exp) <= 1e-5 * max(abs(exp), 1e-6), (part, logged[part], exp)
    out.loss.backward()
    grads = flax_params_to_state_dict(tree(g, f"{name}/{branch}/grads"))
    params = dict(model.named_parameters())
    assert set(grads) == set(params)
    for key, ref_g in grads.items():
        got = params[key].grad if params[key].grad is not None else torch.zeros_like(params[key])
        tol = 1e-4 * ref_g.abs().max().item() + 1e-7
        assert_close(got, ref_g, tol, f"grad {key}")


def test_golden_noisy_latent(g):
    for name in ("uncond", "cond"):
        d = golden_draws(g, name, "denoise")
        x0 = T(g, f"{name}/denoise/inter/x0_encoded")
        z = flow.add_noise(x0, d.eps, d.t, 2.0, T(g, f"{name}/batch/cond_seq_mask"))
        assert_close(z, g[f"{name}/denoise/inter/denoiser_z_before_label_drop"], 1e-6, "z")


def test_encode_batch_uses_the_label_dropped_encoder_mask():
    class Recorder:
        def encode(self, input_ids, mask):
            self.mask = mask
            return torch.zeros(*input_ids.shape, 2)

    batch = batch_from_rows(*build_rows([[5, 6], [7, 8]], 5, 1, conditions=[[2, 3], [4]]))
    drop = torch.tensor([True, False])
    enc = Recorder()
    assert encode_batch(enc, batch, drop).shape == (2, 5, 2)
    assert torch.equal(enc.mask, encoder_mask(batch, drop)) and not torch.equal(
        enc.mask, batch["encoder_attention_mask"]
    )


def test_masked_mean():
    assert masked_mean(torch.tensor([[5.0, 1.0, 3.0, 7.0]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]])).item() == 2.0
    assert masked_mean(torch.tensor([[5.0]]), torch.tensor([[0.0]])).item() == 0.0


def test_draw_is_deterministic_and_well_formed():
    cfg = ObjectiveConfig(label_drop_prob=0.5)
    a = draw(cfg, 4, 8, 3, torch.Generator().manual_seed(1))
    b = draw(cfg, 4, 8, 3, torch.Generator().manual_seed(1))
    assert a.decode == b.decode and torch.equal(a.eps, b.eps) and torch.equal(a.t, b.t)
    assert a.eps.shape == (4, 8, 3) and a.dec_lambda.shape == (4, 8, 1)
    assert ((a.t > 0) & (a.t < 1)).all() and ((a.w >= 0.5) & (a.w <= 5.0)).all()
    branches = [draw(cfg, 1, 1, 1, torch.Generator().manual_seed(s)).decode for s in range(400)]
    assert 0.12 < sum(branches) / 400 < 0.28


def test_nan_latents_and_shape_mismatch_raise(g):
    model = tiny_model("train_step.npz", "params")
    d = golden_draws(g, "uncond", "denoise")
    x0 = T(g, "uncond/denoise/inter/x0_encoded").clone()
    batch = batch_of(g, "uncond")
    x0[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x0 contains NaN"):
        loss_from_latents(model, x0, batch, objective_config("uncond"), d)
    with pytest.raises(ValueError, match="do not match the batch masks"):
        loss_from_latents(model, x0[:, :8].nan_to_num(), batch, objective_config("uncond"), d)
