"""Every official sampler trajectory (golden/sampler.npz) through the engine with injected draws,
the decoding rules, the engine's settings checks and its per-row randomness."""

import math
from dataclasses import replace

import pytest
import torch

from elflm.config import ConfigError, SampleConfig
from elflm.sampling import (
    Known,
    RowNoise,
    Sampler,
    decode_logits,
    mask_after_eos,
    shift_left,
    time_grid,
    tokens_from_logits,
)

from conftest import load_npz
from golden_utils import T, assert_close, tiny_model

RUNS = [f"{n}/{m}_{g}" for n in ("uncond", "cond") for m in ("ode", "sde") for g in ("uniform", "logit_normal")]


@pytest.fixture(scope="module")
def g(golden_dir):
    return load_npz("sampler.npz")


def run_config(g, run) -> SampleConfig:
    method, grid = run.split("/")[1].split("_", 1)
    return SampleConfig(
        method=method,
        steps=4,
        grid=grid,
        gamma=float(g[f"{run}/sde_gamma"]),
        w=float(g[f"{run}/self_cond_cfg_scale"]),
        cfg_scale=float(g[f"{run}/cfg_scale"]),
        noise_scale=2.0,
        p_mean=-1.5,
        p_std=0.8,
    )


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "sdpa"])
@pytest.mark.parametrize("run", RUNS)
def test_trajectory_matches_official(g, run, fast):
    model = tiny_model("sampler.npz", "params", fast=fast)
    cfg = run_config(g, run)
    k = lambda s: T(g, f"{run}/{s}")
    grid = time_grid(cfg, normal=k("t_grid_normal_raw") if cfg.grid == "logit_normal" else None)
    assert_close(grid, g[f"{run}/t_steps"], 1e-6, "t_steps")
    cond = None
    if run.startswith("cond"):
        cond = Known(k("cond_seq"), k("cond_seq_mask").bool(), dropped=torch.zeros_like(k("cond_seq")))
    steps = []
    sampler = Sampler(model, cfg)
    state = sampler.state(k("z_init"), grid, cond, noise=lambda i: k("sde_eps_raw")[i])
    final = sampler.sample(state, callback=lambda i, t, tn, z, x: steps.append((t, tn, z.clone(), x.clone())))
    for name, j in (("step_t", 0), ("step_t_next", 1)):  # every row follows the shared grid
        times = torch.stack([s[j] for s in steps])
        assert bool((times == times[:, :1]).all())
        assert_close(times[:, 0], g[f"{run}/{name}"], 1e-6, name)
    assert_close(torch.stack([s[2] for s in steps]), g[f"{run}/step_z"], 1e-4, "step_z")
    assert_close(torch.stack([s[3] for s in steps]), g[f"{run}/step_x_pred"], 1e-4, "step_x_pred")
    assert_close(final, g[f"{run}/final_latent"], 1e-4, "final_latent")

    # decoding from the official final latent isolates the decode step
    logits = decode_logits(model, k("final_latent"), cfg)
    assert_close(logits, g[f"{run}/decode_logits"], 5e-5, "decode_logits")
    assert torch.equal(sampler.decode(final).argmax(-1), k("argmax_ids").long())
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
    with pytest.raises(ConfigError, match="sample.grid: expected one of 'logit_normal', 'uniform', got 'cosine'"):
        SampleConfig(grid="cosine")
    edited = SampleConfig()
    edited.grid = "cosine"  # an in-place edit skips the dataclass's check
    with pytest.raises(ValueError, match="unknown time grid"):
        time_grid(edited)


def test_sampler_errors(g):
    model = tiny_model("sampler.npz", "params")
    z = torch.randn(1, 16, 32)
    with pytest.raises(ConfigError, match="sample.method: expected one of 'ode', 'sde', got 'heun'"):
        Sampler(model, SampleConfig(method="heun"))
    with pytest.raises(ValueError, match="z_init contains NaN"):
        Sampler(model, SampleConfig(method="ode")).state(z * float("nan"), torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match=r"grid must be \(N \+ 1,\) or \(B, N \+ 1\)"):
        Sampler(model, SampleConfig()).state(z, torch.linspace(0, 1, 3).expand(2, -1))
    with pytest.raises(ValueError, match="precision fp64 needs the model in float64"):
        Sampler(model, SampleConfig(), precision="fp64")
    with pytest.raises(ValueError, match="unknown precision"):
        Sampler(model, SampleConfig(), precision="fp16")


@pytest.mark.parametrize(
    "key, value",
    [
        ("steps", 0),
        ("steps", "8"),
        ("steps", True),
        ("w", math.nan),
        ("gamma", math.inf),
        ("cfg_scale", -1.0),
        ("t_final", 1.5),
        ("grid", "cosine"),
    ],
)
def test_bad_settings_are_named(g, key, value):
    model = tiny_model("sampler.npz", "params")
    with pytest.raises(ConfigError, match=f"sample.{key}"):
        Sampler(model, replace(SampleConfig(), **{key: value}))
    edited = SampleConfig()
    setattr(edited, key, value)  # an in-place edit: the Sampler checks again
    with pytest.raises(ConfigError, match=f"sample.{key}"):
        Sampler(model, edited)


def test_same_seed_same_samples(g):
    model = tiny_model("sampler.npz", "params")
    sampler = Sampler(model, SampleConfig(method="sde", steps=3, gamma=1.0))
    run = lambda seed: sampler.sample(sampler.start(range(2), 16, seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_a_row_depends_on_its_seed_and_index_only(g):
    """Row k of a seeded run is the same alone, in any batch, at any position of the batch: the
    same draws, so the latents agree up to the float rounding of batched matmuls (measured ≤ 5e-6
    on values of order 1; the golden sampler tolerance is 1e-4)."""
    model = tiny_model("sampler.npz", "params")
    sampler = Sampler(model, SampleConfig(method="sde", steps=4, gamma=1.5, grid="logit_normal"))
    run = lambda rows, seeds=7: sampler.sample(sampler.start(rows, 16, seeds))
    together = run([0, 1, 2, 3])
    for k in range(4):
        assert torch.allclose(run([k])[0], together[k], atol=2e-5)
    assert torch.allclose(run([3, 1])[1], together[1], atol=2e-5)
    mixed = run([2, 5], seeds=[7, 9])  # rows of different runs share a call
    assert torch.allclose(mixed[0], together[2], atol=2e-5) and torch.allclose(mixed[1], run([5], 9)[0], atol=2e-5)


def test_every_row_draws_its_own_time_grid(g):
    cfg = SampleConfig(steps=6, grid="logit_normal")
    grids = RowNoise([(0, 0), (0, 1), (1, 0)], "cpu").grids(cfg)
    assert grids.shape == (3, 7) and bool((grids.diff(dim=1) >= 0).all())
    assert bool((grids[:, 0] == 0).all() and (grids[:, -1] == 1).all())
    assert not torch.equal(grids[0], grids[1]) and not torch.equal(grids[0], grids[2])
    assert torch.equal(RowNoise([(0, 1)], "cpu").grids(cfg)[0], grids[1])
    uniform = RowNoise([(0, 0), (0, 1)], "cpu").grids(replace(cfg, grid="uniform"))
    assert torch.equal(uniform[0], torch.linspace(0, 1, 7)) and torch.equal(uniform[0], uniform[1])


def test_stepping_by_hand_equals_sample(g):
    """The scheduler interface: a state stepped one step at a time reaches the same latent."""
    model = tiny_model("sampler.npz", "params")
    sampler = Sampler(model, SampleConfig(method="sde", steps=5))
    state = sampler.start([0, 1], 16, 3)
    while not state.done:
        state = sampler.step(state)
    assert state.step == 5 and torch.equal(state.z, sampler.sample(sampler.start([0, 1], 16, 3)))
    with pytest.raises(ValueError, match="last step"):
        sampler.step(state)
