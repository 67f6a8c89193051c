"""Optimizer, schedule and EMA against the official optax chain (golden ``muon.npz``)."""

import io
import math
import socket

import pytest
import torch

from elflm import optim as optim_module
from elflm.formats.flax import flax_params_to_state_dict
from elflm.optim import EMA, Muon, build_optimizer, clip_grad_norm_, gram_matrix, lr_at, newton_schulz, peak_lr

from conftest import load_npz, skip_unless
from golden_utils import TINY, assert_close, tree

ATOL = 1e-6  # README §Tolerances: Muon / EMA params after each step


def golden(prefix: str) -> dict[str, torch.Tensor]:
    """A ``muon.npz`` tree under ``prefix`` with our parameter names and torch layout."""
    return flax_params_to_state_dict(tree(load_npz("muon.npz"), prefix))


def fresh_params() -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(t.clone()) for n, t in golden("params0").items()}


def hparams():
    g = load_npz("muon.npz")
    return float(g["hparams/lr_peak"]), int(g["hparams/num_warmup_steps"]), float(g["hparams/clip_global_norm"])


def official_step(opt, params, grads, step):
    """Clip, set the scheduled lr, step: one update of the official chain. An all-zero golden
    gradient (the branch that skipped a head) is left as ``grad = None``."""
    peak, warmup, clip = hparams()
    for n, p in params.items():
        p.grad = grads[n].clone() if grads[n].any() else None
    norm = clip_grad_norm_(params.values(), clip)
    lr = lr_at(step, peak=peak, warmup=warmup)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return norm, lr


def assert_params(params, expected, what):
    assert params.keys() == expected.keys()
    for n, p in params.items():
        assert_close(p, expected[n], ATOL, f"{what} {n}")


@pytest.mark.usefixtures("golden_dir")
@pytest.mark.parametrize("ns_gram", [None, False, True], ids=["auto", "plain", "gram"])
def test_chain_matches_optax(ns_gram):
    g = load_npz("muon.npz")
    params = fresh_params()
    opt = Muon(params.values(), ns_gram=ns_gram)
    for k in range(3):
        norm, lr = official_step(opt, params, golden(f"chain/step{k}/grads"), k)
        ref_norm = float(g[f"chain/step{k}/grad_global_norm"])
        assert norm.item() == pytest.approx(ref_norm, rel=1e-6), f"step {k} grad norm"
        assert lr == pytest.approx(float(g[f"chain/step{k}/lr"]), rel=1e-6, abs=1e-12), f"step {k} lr"
        assert_params(params, golden(f"chain/step{k}/params_after"), f"step {k}")

    muon_mu = golden("chain/final_state/muon/mu")
    adam = {
        m: flax_params_to_state_dict({k: v for k, v in tree(g, f"chain/final_state/adam/{m}").items() if v.size})
        for m in ("mu", "nu")
    }
    assert set(muon_mu) == {n for n, p in params.items() if p.ndim == 2}
    assert set(adam["mu"]) == set(adam["nu"]) == {n for n, p in params.items() if p.ndim != 2}
    for n, p in params.items():
        state = opt.state[p]
        assert int(state["step"]) == int(g["chain/final_state/muon/count"]) == int(g["chain/final_state/adam/count"])
        refs = {"mu": muon_mu[n]} if p.ndim == 2 else {m: adam[m][n] for m in ("mu", "nu")}
        assert set(state) - {"step"} == set(refs), n
        for m, ref in refs.items():
            assert_close(state[m], ref, 1e-6 * ref.abs().max().item(), f"final state {m} {n}")


@pytest.mark.usefixtures("golden_dir")
@pytest.mark.parametrize("ns_gram", [None, True], ids=["auto", "gram"])
def test_train_steps_and_ema_match_official(ns_gram):
    """The optimizer half of three official ``train_step``s, and ``ema_params1``."""
    g = load_npz("muon.npz")
    params = fresh_params()
    opt = Muon(params.values(), ns_gram=ns_gram)
    ema_model = torch.nn.Module()  # a module whose parameters carry the golden names
    for n, t in golden("params0").items():
        _set(ema_model, n, torch.nn.Parameter(t.clone()))
    ema = EMA(ema_model, decay=float(g["trainstep/hparams/ema_decay1"]))
    for k in range(3):
        _, lr = official_step(opt, params, golden(f"trainstep/step{k}/grads"), k)
        assert lr == pytest.approx(float(g[f"trainstep/step{k}/lr"]), rel=1e-6, abs=1e-12)
        after = golden(f"trainstep/step{k}/params_after")
        assert_params(params, after, f"train step {k}")
        with torch.no_grad():
            for n, p in ema_model.named_parameters():
                p.copy_(after[n])
        ema.update(ema_model)
        expected = golden(f"trainstep/step{k}/ema_after")
        for n, e in ema.state_dict().items():
            assert_close(e, expected[n], ATOL, f"EMA step {k} {n}")


def _set(module: torch.nn.Module, name: str, p: torch.nn.Parameter) -> None:
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    module.register_parameter(leaf, p)


@pytest.mark.usefixtures("golden_dir")
def test_state_dict_resume_is_bit_exact():
    grads = [golden(f"chain/step{k}/grads") for k in range(3)]
    straight = fresh_params()
    opt = Muon(straight.values())
    for k in range(3):
        official_step(opt, straight, grads[k], k)

    first = fresh_params()
    opt = Muon(first.values())
    for k in range(2):
        official_step(opt, first, grads[k], k)
    buf = io.BytesIO()
    torch.save({"params": {n: p.detach() for n, p in first.items()}, "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = {n: torch.nn.Parameter(t.clone()) for n, t in saved["params"].items()}
    opt = Muon(resumed.values())
    opt.load_state_dict(saved["optim"])
    official_step(opt, resumed, grads[2], 2)
    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n


def test_lr_schedule():
    peak = peak_lr(1e-3, 512)
    assert peak == 2e-3
    assert [lr_at(s, peak=peak, warmup=2) for s in range(5)] == pytest.approx([0, 1e-3, 2e-3, 2e-3, 2e-3], abs=1e-15)
    assert lr_at(0, peak=peak, warmup=0) == peak
    cos = dict(peak=1.0, warmup=10, total=110, schedule="cosine", min_lr=0.1)
    assert lr_at(5, **cos) == pytest.approx(0.5)
    assert lr_at(10, **cos) == pytest.approx(1.0)
    assert lr_at(60, **cos) == pytest.approx(0.55)
    assert lr_at(110, **cos) == pytest.approx(0.1)
    assert lr_at(500, **cos) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="constant' or 'cosine"):
        lr_at(0, peak=1.0, warmup=0, schedule="linear")
    with pytest.raises(ValueError, match="total"):
        lr_at(20, peak=1.0, warmup=10, schedule="cosine")


def test_clip_grad_norm():
    a, b, c = (torch.nn.Parameter(torch.zeros(s)) for s in ((3,), (2, 2), (5,)))
    a.grad, b.grad = torch.tensor([0.3, 0.0, 0.4]), torch.zeros(2, 2)
    before = a.grad.clone()
    assert clip_grad_norm_([a, b, c], 1.0).item() == pytest.approx(0.5)
    assert torch.equal(a.grad, before)  # below the threshold: untouched
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 6.0)
    norm = clip_grad_norm_([a, b, c], 2.0)
    assert norm.item() == pytest.approx(13.0)
    assert torch.allclose(a.grad, torch.tensor([3.0, 0.0, 4.0]) * 2 / 13)
    assert c.grad is None


def test_newton_schulz_orientation_and_scale():
    x = torch.randn(24, 10, dtype=torch.float64)
    o = newton_schulz(x)
    assert torch.allclose(o, newton_schulz(x.T).T)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.5  # roughly orthogonal, as the quintic iteration gives


@pytest.mark.parametrize("shape", [(24, 10), (16, 300), (300, 16), (64, 64), (8, 128)])
def test_gram_newton_schulz_equals_the_plain_iteration(shape):
    """The Gram form agrees with the plain iteration to 1e-12 in float64 and in float32 stays
    within a few times the plain iteration's rounding error, also on a gradient-like matrix with a
    wide spread of singular values; ``None`` picks it only for matrices at least 16 times as wide
    as tall."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64))
    k = min(shape)
    x = (u[:, :k] * torch.logspace(0, -4, k, dtype=torch.float64)) @ v[:, :k].T
    exact = newton_schulz(x, gram=False)
    assert (newton_schulz(x, gram=True) - exact).abs().max() < 1e-12
    plain, gram = (newton_schulz(x.float(), gram=flag) for flag in (False, True))
    assert gram.dtype == torch.float32
    assert (gram.double() - exact).abs().max() <= max(4 * (plain.double() - exact).abs().max(), 1e-5)
    assert torch.equal(newton_schulz(x), newton_schulz(x, gram=max(shape) >= 16 * k))


@pytest.mark.parametrize("k, panels", [(1, 4), (3, 4), (10, 4), (13, 4), (16, 1), (16, 16)])
def test_gram_matrix_is_the_full_product(k, panels):
    """The upper-triangle panels, mirrored, give ``x @ x.mT`` for any k (also not a multiple of the
    panel count, or fewer rows than panels)."""
    x = torch.randn(k, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    g = gram_matrix(x, panels)
    assert (g - x @ x.mT).abs().max() < 1e-12


def test_optimizer_and_ema_api():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    net[1].bias.requires_grad_(False)
    opt = build_optimizer(net)
    assert [p.shape for p in opt.param_groups[0]["params"]] == [(3, 4), (3,), (3,)]
    with pytest.raises(ValueError, match="momentum"):
        Muon(net.parameters(), momentum=1.0)
    ema = EMA(net, decay=0.5)
    trained = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    current = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ema.swapped(net):
        for n, p in net.named_parameters():
            assert torch.allclose(p, trained[n] + 0.5)
    for n, p in net.named_parameters():
        assert torch.equal(p, current[n])
    copy = EMA(net, decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert all(torch.equal(copy.shadow[n], ema.shadow[n]) for n in ema.shadow)
    with pytest.raises(ValueError, match="differ"):
        copy.load_state_dict({"0.weight": torch.zeros(3, 4)})


def test_torch_muon_is_not_the_official_optimizer():
    """``torch.optim.Muon`` (bf16 Newton–Schulz, no bias correction) misses the golden step."""
    skip_unless(hasattr(torch.optim, "Muon"), "this torch has no torch.optim.Muon")
    p = torch.nn.Parameter(golden("params0")["blocks.0.attn.qkv.weight"].clone())
    ours = torch.nn.Parameter(p.detach().clone())
    g = golden("trainstep/step2/grads")["blocks.0.attn.qkv.weight"]
    theirs, mine = torch.optim.Muon([p], lr=1e-3, weight_decay=0.0), Muon([ours], lr=1e-3)
    for _ in range(2):
        p.grad, ours.grad = g.clone(), g.clone()
        theirs.step()
        mine.step()
    assert (p - ours).abs().max().item() > 100 * ATOL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    import os

    from torch.distributed.tensor import distribute_tensor

    from elflm import distributed
    from elflm.model import ELF

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    d = distributed.setup("cpu")
    try:
        g = load_npz("muon.npz")
        model = ELF(TINY)
        model.load_state_dict(golden("params0"))
        model = distributed.wrap(model, d, "fsdp")
        opt, ema = build_optimizer(model), EMA(model, decay=float(g["trainstep/hparams/ema_decay1"]))
        params = dict(model.named_parameters())
        assert all(hasattr(p, "device_mesh") for p in params.values())
        for k in range(3):
            grads = golden(f"trainstep/step{k}/grads")
            for n, p in params.items():
                p.grad = distribute_tensor(grads[n], p.device_mesh, p.placements)
            clip_grad_norm_(model.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = lr_at(k, peak=2e-3, warmup=2)
            opt.step()
            ema.update(model)
            for name, ref in (("params_after", params), ("ema_after", ema.state_dict())):
                expected = golden(f"trainstep/step{k}/{name}")
                for n, t in ref.items():
                    assert_close(t.full_tensor(), expected[n], ATOL, f"FSDP2 step {k} {name} {n}")
    finally:
        distributed.teardown()


@pytest.mark.usefixtures("golden_dir")
def test_fsdp2_dtensor_matches_official():
    """Two CPU processes, FSDP2-sharded tiny ELF: clipping, Muon (gathered Newton–Schulz) and
    EMA on DTensors reproduce the official train-step updates."""
    skip_unless(torch.distributed.is_available(), "torch.distributed is not available")
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, _free_port()), nprocs=2)


def test_matrix_without_gradient_reuses_its_direction(monkeypatch):
    """Steps without a gradient decay the momentum only: Muon orthogonalises it once (the first
    such step) and reuses that direction until a gradient comes back; the weights follow the
    optax formula (Newton–Schulz of m̂ at every step) within float rounding."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40, 8))
    opt = Muon([w], lr=0.1)
    beta, ref, mu = 0.95, w.detach().clone(), torch.zeros(40, 8)
    calls = []
    real = optim_module.newton_schulz
    monkeypatch.setattr(optim_module, "newton_schulz", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = [torch.randn(40, 8), None, None, None, torch.randn(40, 8), None, None]
    for n, g in enumerate(grads, 1):
        w.grad = g
        opt.step()
        gz = torch.zeros(40, 8) if g is None else g
        mu = beta * mu + (1 - beta) * gz
        mu_hat = beta * mu / (1 - beta ** (n + 1)) + (1 - beta) * gz / (1 - beta**n)
        ref -= 0.1 * math.sqrt(40 / 8) * real(mu_hat.T).T
        torch.testing.assert_close(w.detach(), ref, atol=1e-6, rtol=1e-6)
        assert ("direction" in opt.state[w]) == (g is None)
    assert len(calls) == 4  # two steps with a gradient, the first step of each gradient-free run
