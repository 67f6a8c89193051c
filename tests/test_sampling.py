"""Every official sampler trajectory (golden/sampler.npz) and the decoding rules."""
import pytest
import torch

from conftest import load_npz
from golden_utils import T, assert_close, tiny_model
from elflm.config import SampleConfig
from elflm.sampling import (
    Condition, decode_logits, mask_after_eos, sample_latents, shift_left, time_grid, tokens_from_logits,
)

RUNS = [f"{n}/{m}_{g}" for n in ("uncond", "cond") for m in ("ode", "sde") for g in ("uniform", "logit_normal")]


@pytest.fixture(scope="module")
def g(golden_dir):
    return load_npz("sampler.npz")


def run_config(g, run) -> SampleConfig:
    method, grid = run.split("/")[1].split("_", 1)
    return SampleConfig(
        method=method, steps=4, grid=grid, gamma=float(g[f"{run}/sde_gamma"]),
        w=float(g[f"{run}/self_cond_cfg_scale"]), cfg_scale=float(g[f"{run}/cfg_scale"]),
        noise_scale=2.0, p_mean=-1.5, p_std=0.8,
    )


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "sdpa"])
@pytest.mark.parametrize("run", RUNS)
def test_trajectory_matches_official(g, run, fast):
    model = tiny_model("sampler.npz", "params", fast=fast)
    cfg = run_config(g, run)
    k = lambda s: T(g, f"{run}/{s}")
    grid = time_grid(cfg, normal=k("t_grid_normal_raw") if cfg.grid == "logit_normal" else None)
    assert_close(grid, g[f"{run}/t_steps"], 1e-6, "t_steps")
    cond = Condition(k("cond_seq"), k("cond_seq_mask").bool()) if run.startswith("cond") else None
    steps = []
    final = sample_latents(
        model, cfg, k("z_init"), grid, cond=cond, noise=lambda i: k("sde_eps_raw")[i],
        callback=lambda i, t, tn, z, x: steps.append((t, tn, z.clone(), x.clone())),
    )
    assert_close(torch.tensor([s[0] for s in steps]), g[f"{run}/step_t"], 1e-6, "step_t")
    assert_close(torch.tensor([s[1] for s in steps]), g[f"{run}/step_t_next"], 1e-6, "step_t_next")
    assert_close(torch.stack([s[2] for s in steps]), g[f"{run}/step_z"], 1e-4, "step_z")
    assert_close(torch.stack([s[3] for s in steps]), g[f"{run}/step_x_pred"], 1e-4, "step_x_pred")
    assert_close(final, g[f"{run}/final_latent"], 1e-4, "final_latent")

    # decoding from the official final latent isolates the decode step
    logits = decode_logits(model, k("final_latent"), cfg)
    assert_close(logits, g[f"{run}/decode_logits"], 5e-5, "decode_logits")
    assert torch.equal(decode_logits(model, final, cfg).argmax(-1), k("argmax_ids").long())
    pad = int(g[f"{run}/pad_id"])
    if cond is None:
        ids = tokens_from_logits(logits, eos_id=1, pad_id=pad)
    else:
        ids = tokens_from_logits(logits, eos_id=1, pad_id=pad, cond_mask=cond.mask, gen_length=8)
        assert torch.equal(shift_left(logits.argmax(-1), cond.mask.sum(1))[:, :8], k("shifted_ids").long())
    assert torch.equal(ids, k("final_ids").long())


def test_mask_after_eos_and_shift_left():
    ids = torch.tensor([[5, 1, 7, 1], [4, 4, 4, 4]])
    assert mask_after_eos(ids, 1, 0).tolist() == [[5, 0, 0, 0], [4, 4, 4, 4]]
    assert mask_after_eos(ids, 1, 1).tolist() == [[5, 1, 1, 1], [4, 4, 4, 4]]
    assert shift_left(torch.tensor([[1, 2, 3, 4]]), torch.tensor([1]), 9).tolist() == [[2, 3, 4, 9]]


def test_grids():
    u = time_grid(SampleConfig(grid="uniform", steps=4))
    assert u.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    ln = time_grid(SampleConfig(grid="logit_normal", steps=8), generator=torch.Generator().manual_seed(0))
    assert ln[0] == 0 and ln[-1] == 1 and len(ln) == 9 and bool((ln.diff() >= 0).all())
    with pytest.raises(ValueError, match="unknown time grid"):
        time_grid(SampleConfig(grid="cosine"))


def test_sampler_errors(g):
    model = tiny_model("sampler.npz", "params")
    z = torch.randn(1, 16, 32)
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample_latents(model, SampleConfig(method="heun"), z, torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="z_init contains NaN"):
        sample_latents(model, SampleConfig(method="ode"), z * float("nan"), torch.linspace(0, 1, 3))


def test_same_seed_same_samples(g):
    model = tiny_model("sampler.npz", "params")
    cfg = SampleConfig(method="sde", steps=3, gamma=1.0)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(2, 16, 32, generator=gen) * 2
        grid = time_grid(cfg, generator=gen)
        return sample_latents(model, cfg, z, grid, noise=lambda i: torch.randn(2, 16, 32, generator=gen))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
