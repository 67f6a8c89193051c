"""Progressive distillation against the official ``distillation`` branch (golden/distill.npz §8)."""

import numpy as np
import pytest
import torch

from elflm import distill, flow
from elflm.config import ConfigError, DistillConfig, ModelConfig, ObjectiveConfig
from elflm.formats.torchport import port_params_to_state_dict
from elflm.model import ELF

from conftest import load_npz
from golden_utils import TINY, T, assert_close, tree

CASES = ("uncond_r1", "uncond_r5", "uncond_one_teacher_step", "cond_r3")
B, L, C = 3, 16, 32


@pytest.fixture(scope="module")
def g(golden_dir):
    return load_npz("distill.npz")


def settings(g, case):
    """(ObjectiveConfig, DistillConfig, seed) of a case: train_tiny.yml plus the case's settings."""
    step, n, decoder_prob, seed = g[f"{case}/settings"].tolist()
    pd = DistillConfig(pd_step_size=step, pd_teacher_steps=int(n))
    return ObjectiveConfig(decoder_prob=decoder_prob), pd, int(seed)


def net(g, prefix: str) -> ELF:
    model = ELF(TINY).set_fast_attention(False)
    state = port_params_to_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in tree(g, prefix).items()})
    model.load_state_dict(state, strict=True)
    return model


def golden_draws(g, case) -> distill.Draws:
    """The official step's recorded draws (``draw_NN_<kind>`` in call order) as our :class:`Draws`."""
    cfg, pd, _ = settings(g, case)
    r = lambda i: T(g, next(k for k in g if k.startswith(f"{case}/draw_{i:02d}_")))  # noqa: E731
    n = pd.pd_teacher_steps
    return distill.Draws(
        ce=r(0).bool(),
        u=flow.logit_normal(r(1), cfg.p_mean, cfg.p_std),
        w=flow.guidance_scale(r(2), cfg.self_cond_cfg_min, cfg.self_cond_cfg_max),
        dec_lambda=flow.logit_normal(r(3), cfg.decoder_p_mean, cfg.decoder_p_std).view(B, L, 1),
        dec_eps=r(4),
        eps=r(5),
        self_cond=r(6).bool(),
        sub_u=flow.logit_normal(r(7), cfg.p_mean, cfg.p_std).view(B, n - 1) if n > 1 else torch.zeros(B, 0),
    )


def batch_of(g, case):
    keys = ("input_ids", "attention_mask", "cond_seq_mask", "encoder_attention_mask")
    return {k: T(g, f"{case}/batch/{k}") for k in keys}


@pytest.mark.parametrize("case", CASES)
def test_draw_reproduces_the_official_draws(g, case):
    """A CPU generator seeded like the official run gives its draws bit for bit."""
    cfg, pd, seed = settings(g, case)
    ours = distill.draw(cfg, pd, B, L, C, torch.Generator().manual_seed(seed))
    ref = golden_draws(g, case)
    for name in ("ce", "u", "w", "dec_lambda", "dec_eps", "eps", "self_cond", "sub_u"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


@pytest.mark.parametrize("case", CASES)
def test_intermediates_match_official(g, case):
    cfg, pd, _ = settings(g, case)
    d = golden_draws(g, case)
    teacher = distill.freeze_teacher(net(g, "teacher"))
    x0, cond = T(g, f"{case}/x0"), T(g, f"{case}/batch/cond_seq_mask").bool()
    a = lambda got, key, tol=1e-5: assert_close(got, g[f"{case}/{key}"], tol, key)  # noqa: E731
    a(d.u, "sample_timesteps_0", 1e-6)
    a(d.w, "sample_cfg_scale_0", 1e-6)
    if pd.pd_teacher_steps > 1:
        a(d.sub_u.flatten(), "sample_timesteps_1", 1e-6)
    full = distill.pd_inputs(teacher, x0, cond, cfg, pd, d, skip_unused_rows=False)
    a(full.t_s, "teacher_pd_target.t_s_0", 1e-6)
    a(full.t_s, "student/t", 1e-6)
    a(full.t_t, "teacher_pd_target.t_t_0", 1e-6)
    if pd.pd_teacher_steps > 1:
        a(full.times, "teacher_pd_target.sub_step_times_0", 1e-6)
    a(full.z, "build_z_t_s_0")
    s0 = flow.restore(torch.zeros_like(x0), x0, cond)
    a(distill.teacher_x_hat(teacher, full.z, s0, full.t_s, d.w), "teacher_x_pred_init_0")
    a(full.sc, "teacher_pd_target.sc_half_0")
    a(full.target, "teacher_pd_target_0")
    a(distill.teacher_target(teacher, x0, cond, full.z, full.sc, full.times, d.w, cfg.t_eps), "teacher_pd_target_0")
    a(full.x, "student/x_input")
    fast = distill.pd_inputs(teacher, x0, cond, cfg, pd, d)  # teacher on the used rows only
    for name in ("t_s", "t_t", "times", "z"):
        assert torch.equal(getattr(fast, name), getattr(full, name)), name
    a(fast.sc, "teacher_pd_target.sc_half_0")
    a(fast.x, "student/x_input")
    assert_close(fast.target[~d.ce], g[f"{case}/teacher_pd_target_0"][~d.ce.numpy()], 1e-5, "target on PD rows")
    out = net(g, "student_init")(full.x, full.t_s, d.w, decode=d.ce)
    a(out.x_hat, "student/x_pred")
    a(out.logits, "student/decoder_logits", 5e-5)


@pytest.mark.parametrize("fused_ce", [True, False], ids=["fused-ce", "logits"])
@pytest.mark.parametrize("skip", [True, False], ids=["used-rows", "all-rows"])
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_official(g, case, skip, fused_ce):
    cfg, pd, _ = settings(g, case)
    teacher = distill.freeze_teacher(net(g, "teacher"))
    student = net(g, "student_init").train()
    out = distill.loss_from_latents(
        student,
        teacher,
        T(g, f"{case}/x0"),
        batch_of(g, case),
        cfg,
        pd,
        golden_draws(g, case),
        skip_unused_rows=skip,
        fused_ce=fused_ce,
    )
    logged = distill.logged_losses(out)
    for part in ("loss", "ce_loss", "l2_loss"):
        ref = float(g[f"{case}/metrics/{part}"])
        assert abs(logged[part] - ref) <= 1e-5 * max(abs(ref), 1e-6), (part, logged[part], ref)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = port_params_to_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in tree(g, f"{case}/grads").items()})
    params = dict(student.named_parameters())
    assert set(grads) == set(params)
    for key, ref_g in grads.items():
        got = params[key].grad if params[key].grad is not None else torch.zeros_like(params[key])
        assert_close(got, ref_g, 1e-4 * ref_g.abs().max().item() + 1e-7, f"grad {key}")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params.values() if p.grad is not None]))
    assert abs(norm.item() - float(g[f"{case}/student/grad_norm"])) <= 1e-5 * float(g[f"{case}/student/grad_norm"])


SMALL = ModelConfig(encoder_dim=8, vocab_size=20, max_length=12, hidden_size=32, depth=2, num_heads=2, bottleneck_dim=8)


def small_net(seed: int) -> ELF:
    torch.manual_seed(seed)
    model = ELF(SMALL).set_fast_attention(False)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    return model


def small_batch(Bn=5, Ln=10, cond_lens=(0, 3, 0, 5, 2)):
    ids = torch.randint(2, SMALL.vocab_size, (Bn, Ln), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(Ln)
    cond = (pos[None] < torch.tensor(cond_lens)[:, None]).float()
    valid = (pos[None] < torch.tensor([10, 9, 6, 10, 8])[:, None]).float()
    enc = torch.where(cond[:, :, None] > 0, cond[:, None, :], valid[:, None, :])  # SPEC §1
    return {"input_ids": ids, "attention_mask": valid, "cond_seq_mask": cond, "encoder_attention_mask": enc}


def test_draw_shapes_dtypes_and_seed():
    cfg, pd = ObjectiveConfig(decoder_prob=0.3), DistillConfig(pd_step_size=0.25, pd_teacher_steps=3)
    a = distill.draw(cfg, pd, 4, 6, 5, torch.Generator().manual_seed(7))
    b = distill.draw(cfg, pd, 4, 6, 5, torch.Generator().manual_seed(7))
    shapes = {
        "ce": (4,),
        "u": (4,),
        "w": (4,),
        "dec_lambda": (4, 6, 1),
        "dec_eps": (4, 6, 5),
        "eps": (4, 6, 5),
        "self_cond": (4,),
        "sub_u": (4, 2),
    }
    for name, shape in shapes.items():
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == shape and torch.equal(x, y), name
        assert x.dtype == (torch.bool if name in ("ce", "self_cond") else torch.float32), name
    assert ((a.u > 0) & (a.u < 1)).all() and ((a.sub_u > 0) & (a.sub_u < 1)).all()
    assert ((a.w >= 0.5) & (a.w <= 5.0)).all()
    c = distill.draw(cfg, pd, 4, 6, 5, torch.Generator().manual_seed(8))
    assert not torch.equal(a.eps, c.eps)
    one = distill.draw(
        ObjectiveConfig(self_cond_prob=0, self_cond_cfg_min=2, self_cond_cfg_max=2),
        DistillConfig(pd_teacher_steps=1, pd_student_schedule="uniform"),
        2,
        3,
        4,
        torch.Generator().manual_seed(0),
    )
    assert one.sub_u.shape == (2, 0) and not one.self_cond.any() and torch.equal(one.w, torch.full((2,), 2.0))
    rows = distill.draw(ObjectiveConfig(decoder_prob=0.2), pd, 4000, 1, 1, torch.Generator().manual_seed(1)).ce
    assert 0.17 < rows.float().mean().item() < 0.23


def test_times_and_sub_step_times():
    ce = torch.tensor([False, True, False])
    t_s, t_t = distill.student_times(ce, torch.tensor([0.5, 0.3, 0.0]), 0.25)
    assert torch.allclose(t_s, torch.tensor([0.375, 1.0, 0.0]))
    assert torch.allclose(t_t, torch.tensor([0.625, 1.0, 0.25]))
    times = distill.sub_step_times(t_s, t_t, torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.6]]))
    expected = [[0.375, 0.4, 0.6, 0.625], [1.0, 1.0, 1.0, 1.0], [0.0, 0.05, 0.15, 0.25]]
    assert torch.allclose(times, torch.tensor(expected))
    t_s, t_t = distill.student_times(torch.tensor([False]), torch.tensor([0.5]), 1.0)  # last round: t_s ≈ 0
    assert t_s.item() == pytest.approx(5e-7) and t_t.item() == pytest.approx(1.0 + 5e-7)


@pytest.mark.parametrize("decoder_prob", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("n,schedule", [(1, "uniform"), (3, "uniform"), (5, "logit_normal")])
def test_general_sizes_skipping_rows_changes_nothing(n, schedule, decoder_prob):
    """Other sizes, a conditional batch, 1 or more sub-steps, either schedule, all/no/some CE rows:
    running the teacher on the used rows only gives the official all-rows loss and gradients."""
    cfg = ObjectiveConfig(decoder_prob=decoder_prob, pad_token="eos", decoder_noise_scale=1.0)
    pd = DistillConfig(pd_step_size=0.2, pd_teacher_steps=n, pd_student_schedule=schedule, pd_teacher_schedule=schedule)
    batch = small_batch()
    x0 = torch.randn(5, 10, 8, generator=torch.Generator().manual_seed(4))
    d = distill.draw(cfg, pd, 5, 10, 8, torch.Generator().manual_seed(5))
    teacher = distill.freeze_teacher(small_net(1))
    results = []
    for skip in (True, False):
        student = small_net(2)
        out = distill.loss_from_latents(student, teacher, x0, batch, cfg, pd, d, skip_unused_rows=skip)
        out.loss.backward()
        results.append((out, {k: p.grad for k, p in student.named_parameters()}))
        assert out.rows.shape == (5,) and torch.isfinite(out.loss) and out.tokens.item() == 50 - 10
    (a, ga), (b, gb) = results
    assert torch.allclose(a.rows, b.rows, rtol=1e-5, atol=1e-6)
    for k in ga:
        if gb[k] is None:
            assert ga[k] is None or ga[k].abs().max() == 0, k
        else:
            assert torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6 * gb[k].abs().max().item() + 1e-9), k
    logged = distill.logged_losses(a)
    ce = a.ce
    assert logged["ce_loss"] == pytest.approx(a.rows[ce].mean().item() if ce.any() else 0.0, rel=1e-6)
    assert logged["l2_loss"] == pytest.approx(a.rows[~ce].mean().item() if (~ce).any() else 0.0, rel=1e-6)


def test_teacher_target_rules():
    """Condition positions stay x0; a span under 1e-3 falls back to the teacher's last x̂; with one
    sub-step the target is the teacher's x̂ itself."""
    teacher = distill.freeze_teacher(small_net(1))
    x0 = torch.randn(2, 6, 8)
    cond = torch.tensor([[1, 1, 0, 0, 0, 0], [0] * 6]).bool()
    z = flow.add_noise(x0, torch.randn(2, 6, 8), torch.tensor([0.3, 0.5]), 2.0, cond)
    sc, w = flow.restore(torch.zeros_like(x0), x0, cond), torch.tensor([1.0, 2.0])
    times = torch.tensor([[0.3, 0.35, 0.4], [0.5, 0.5002, 0.5005]])
    target = distill.teacher_target(teacher, x0, cond, z, sc, times, w, 0.05)
    assert torch.equal(target[0, :2], x0[0, :2])
    x1 = distill.teacher_x_hat(teacher, z, sc, times[:, 0], w)
    v = flow.velocity(x1, z, times[:, 0], 0.05)
    z1 = flow.restore(z + flow.expand(times[:, 1] - times[:, 0], z) * v, x0, cond)
    x2 = distill.teacher_x_hat(teacher, z1, flow.restore(x1, x0, cond), times[:, 1], w)
    assert torch.allclose(target[1], x2[1])
    direct = distill.teacher_target(teacher, x0, cond, z, sc, times[:, [0, 2]], w, 0.05)
    assert torch.equal(direct, x1)


def test_per_row_decode_gate_matches_single_mode_runs():
    model = small_net(2)
    x, t, w = torch.randn(3, 5, 16), torch.rand(3), torch.rand(3) + 1
    gate = torch.tensor([True, False, True])
    mixed = model(x, t, w, decode=gate)
    on, off = model(x, t, w, decode=True), model(x, t, w, decode=False)
    assert torch.allclose(mixed.x_hat[gate], on.x_hat[gate], atol=1e-6)
    assert torch.allclose(mixed.x_hat[~gate], off.x_hat[~gate], atol=1e-6)
    assert torch.allclose(mixed.logits[gate], on.logits[gate], atol=1e-5)
    with pytest.raises(ValueError, match="row gates"):
        model(x, t, w, decode=torch.ones(2, dtype=torch.bool))


def test_guards_and_encoder_entry_point():
    cfg, pd = ObjectiveConfig(), DistillConfig(pd_teacher_steps=2)
    batch, x0 = small_batch(), torch.randn(5, 10, 8)
    d = distill.draw(cfg, pd, 5, 10, 8, torch.Generator().manual_seed(0))
    teacher, student = small_net(1), small_net(2)
    with pytest.raises(ValueError, match="freeze_teacher"):
        distill.loss_from_latents(student, teacher.train(), x0, batch, cfg, pd, d)
    distill.freeze_teacher(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="interior sub-step times"):
        distill.loss_from_latents(student, teacher, x0, batch, cfg, DistillConfig(pd_teacher_steps=4), d)
    with pytest.raises(ValueError, match="do not match the batch masks"):
        distill.loss_from_latents(student, teacher, x0[:, :4], batch, cfg, pd, d)

    class Encoder:  # stands in for the frozen text encoder
        def encode(self, ids, mask):
            return x0

    via_encoder = distill.training_loss(student, teacher, Encoder(), batch, cfg, pd, d)
    assert torch.equal(via_encoder.loss, distill.loss_from_latents(student, teacher, x0, batch, cfg, pd, d).loss)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(pd_step_size=0.0), "pd_step_size"),
        (dict(pd_step_size=1.5), "pd_step_size"),
        (dict(pd_teacher_steps=0), "pd_teacher_steps"),
        (dict(pd_teacher_steps=2.0), "pd_teacher_steps"),
        (dict(pd_student_schedule="cosine"), "pd_student_schedule"),
    ],
)
def test_distill_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**bad)
