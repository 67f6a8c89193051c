"""The fast paths against the reference paths: SDPA vs float32 attention, cached complex RoPE, the
lean-memory RMSNorm and SwiGLU gate, float32 heads under bf16 autocast, the chunked decode
cross-entropy, the self-conditioning pass on the self-conditioned rows only, and ``torch.compile``
of the blocks and of the sampler's forward.

Tolerances: float32 paths agree to float rounding (1e-5 absolute on O(1) values, gradients 1e-5
of their largest entry). Under bf16 autocast the fast and reference attention differ by bf16
rounding of q, k, v and the attention output (8 mantissa bits): 5e-2 absolute here."""

import pytest
import torch
import torch.nn.functional as F

import elflm.model as model_mod
from elflm import flow, kernels, sampling
from elflm.config import ModelConfig, ObjectiveConfig, SampleConfig
from elflm.kernels import rope_phases, rotate_pairs
from elflm.model import ELF, apply_rope, rope_tables
from elflm.objective import decode_loss, denoise_loss, draw

CFG = ModelConfig(encoder_dim=32, vocab_size=97, max_length=24, hidden_size=64, depth=2, num_heads=4, bottleneck_dim=16)
B, L, C = 4, 24, 32


def make_model(seed=0, **overrides) -> ELF:
    torch.manual_seed(seed)
    m = ELF(ModelConfig(**{**vars(CFG), **overrides}))
    with torch.no_grad():  # the official init zeroes the denoise output layer; make it see something
        m.final_layer.linear.weight.normal_(std=0.1)
    return m


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 2 * C, generator=g)
    t, w = torch.rand(B, generator=g), 3 * torch.rand(B, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 15:] = 0
    mask[3, 5:] = 0
    return x, t, w, mask


def grads(m):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()}


def assert_grads_close(a, b, rel):
    assert a.keys() == b.keys()
    for n in a:
        scale = max(a[n].abs().max().item(), b[n].abs().max().item(), 1e-12)
        err = (a[n] - b[n]).abs().max().item()
        assert err <= rel * scale, f"grad {n}: {err:.3g} > {rel}·{scale:.3g}"


def test_complex_rope_is_the_table_rotation():
    """The complex-product RoPE of the model equals the reference rotation with the tables, in
    float32 and float64, and leaves the control-token rows alone."""
    cos, sin = rope_tables(3, 9, 8, dtype=torch.float64)
    x = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    assert torch.allclose(rotate_pairs(x, rope_phases(cos, sin)), apply_rope(x, cos, sin), atol=1e-12)
    assert torch.allclose(
        rotate_pairs(x.float(), rope_phases(cos.float(), sin.float())), apply_rope(x, cos, sin).float(), atol=1e-6
    )
    assert torch.equal(rotate_pairs(x.float(), rope_phases(cos, sin))[..., :3, :], x[..., :3, :].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_and_gate_match_autograd_of_the_plain_expressions(dtype):
    """RMSNorm and silu(a)·b save less for backward; values and gradients are those of autograd."""
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g).to(dtype).requires_grad_()
    norm = model_mod.RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    gy = torch.randn(3, 5, 16, generator=g)
    h = x.float()
    plain = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps))
    lean = norm.normalize(x)
    assert torch.equal(lean, plain)
    want = torch.autograd.grad(plain, (x, norm.weight), gy)
    got = torch.autograd.grad(lean, (x, norm.weight), gy)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()
    a, b = (torch.randn(3, 5, 8, generator=g).to(dtype).requires_grad_() for _ in range(2))
    gate = kernels.silu_gate(a, b)
    assert torch.equal(gate, F.silu(a) * b)
    want = torch.autograd.grad(F.silu(a) * b, (a, b), gate.detach().float().cos().to(dtype))
    got = torch.autograd.grad(gate, (a, b), gate.detach().float().cos().to(dtype))
    for u, v in zip(got, want):
        assert (u.float() - v.float()).abs().max() <= tol * v.float().abs().max()


def test_rope_phases_are_cached_per_shape_and_device():
    m = make_model()
    a = m.rope(12, 10, "cpu")
    assert m.rope(12, 10, torch.device("cpu")) is a
    assert m.rope(12, 11, "cpu").shape == (23, 8)
    assert torch.equal(a, rope_phases(*rope_tables(12, 10, 16)))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_sdpa_matches_reference_attention(masked):
    m = make_model().eval()
    x, t, w, mask = inputs()
    kw = dict(attention_mask=mask if masked else None)
    with torch.no_grad():
        fast = m.set_fast_attention(True)(x, t, w, decode=True, **kw)
        ref = m.set_fast_attention(False)(x, t, w, decode=True, **kw)
        for a, b in zip(fast[:2], ref[:2]):
            assert (a - b).abs().max() < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast16 = m.set_fast_attention(True)(x, t, w, decode=True, **kw)
            ref16 = m.set_fast_attention(False)(x, t, w, decode=True, **kw)
    for a, b, c in zip(fast16[:2], ref16[:2], ref[:2]):
        assert (a - b).abs().max() < 5e-2 and (a - c).abs().max() < 5e-2


def test_autocast_runs_blocks_in_bf16_and_heads_in_float32(monkeypatch):
    m = make_model().eval()
    x, t, w, mask = inputs()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    targets = torch.randint(0, CFG.vocab_size, (B, L))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits, _ = m(x, t, w, decode=True, attention_mask=mask)
        ce = m(x, t, w, decode=True, targets=targets).token_ce
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    assert out.dtype == logits.dtype == ce.dtype == torch.float32
    with torch.no_grad():
        out32, logits32, _ = m(x, t, w, decode=True, attention_mask=mask)
    assert (out - out32).abs().max() < 5e-2 and (logits - logits32).abs().max() < 5e-2


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-chunk", "chunked"])
def test_chunked_cross_entropy_matches_full_logits(chunk):
    m = make_model()
    h = torch.randn(B, L, CFG.hidden_size, requires_grad=True)
    targets = torch.randint(0, CFG.vocab_size, (B, L))
    targets[0, :7] = -1
    ce = m.decoder.cross_entropy(h, targets, chunk_tokens=chunk)
    ref = torch.where(
        targets >= 0,
        F.cross_entropy(m.decoder(h).flatten(0, 1), targets.flatten().clamp(min=0), reduction="none").view(B, L),
        0.0,
    )
    assert ce.shape == (B, L) and ce.dtype == torch.float32
    assert (ce - ref).abs().max() < 1e-5 and torch.all(ce[0, :7] == 0)
    weight = torch.rand(B, L)
    params = [h, m.decoder.proj.weight, m.decoder.unembed.weight, m.decoder.unembed.bias]
    fast = torch.autograd.grad((ce * weight).sum(), params)
    for g_fast, g_ref in zip(fast, torch.autograd.grad((ref * weight).sum(), params)):
        assert (g_fast - g_ref).abs().max() < 1e-5 * g_ref.abs().max()
    with torch.no_grad():
        assert torch.allclose(m.decoder.cross_entropy(h, targets, chunk_tokens=chunk), ce, atol=1e-6)


def test_fused_cross_entropy_under_bf16_autocast_and_repeated_backward():
    """Under autocast the unembedding runs in bf16 like ``self(x)`` does (loss and gradients
    within bf16 rounding of float32); a second backward through the same graph (retain_graph)
    gives the same gradient although the first one consumed the saved logits."""
    m = make_model()
    h = torch.randn(B, L, CFG.hidden_size, requires_grad=True)
    targets = torch.randint(0, CFG.vocab_size, (B, L))
    ce32 = m.decoder.cross_entropy(h, targets)
    (g32,) = torch.autograd.grad(ce32.sum(), h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce = m.decoder.cross_entropy(h, targets)
        ref = F.cross_entropy(m.decoder(h).float().flatten(0, 1), targets.flatten(), reduction="none").view(B, L)
    assert ce.dtype == torch.float32 and (ce - ref).abs().max() < 1e-3 and (ce - ce32).abs().max() < 0.1
    (g,) = torch.autograd.grad(ce.sum(), h, retain_graph=True)
    assert g.dtype == torch.float32 and (g - g32).abs().max() < 0.05 * g32.abs().max()
    (again,) = torch.autograd.grad(ce.sum(), h)
    assert torch.equal(again, g)


def test_cross_entropy_of_no_target_is_zero_and_chunk_size_is_checked():
    m = make_model()
    h = torch.randn(2, 3, CFG.hidden_size, requires_grad=True)
    ce = m.decoder.cross_entropy(h, torch.full((2, 3), -1))
    assert torch.equal(ce, torch.zeros(2, 3))
    ce.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        m.decoder.cross_entropy(h, torch.zeros(2, 3, dtype=torch.long), chunk_tokens=0)
    with pytest.raises(ValueError, match="targets must be"):
        m(torch.randn(2, 3, 2 * C), torch.rand(2), torch.rand(2), targets=torch.zeros(2, 3, dtype=torch.long))


def test_chunked_cross_entropy_keeps_no_logits_for_backward():
    """With several chunks no (tokens, V) tensor is kept for backward (each chunk is recomputed);
    with one chunk only the logits, on the Function's context, released by the backward."""
    m = make_model()
    h = torch.randn(B, L, CFG.hidden_size, requires_grad=True)
    targets = torch.randint(0, CFG.vocab_size, (B, L))
    for chunk in (B * L, 8):
        saved = []
        keep = saved.append
        with torch.autograd.graph.saved_tensors_hooks(lambda t, keep=keep: keep(t.shape) or t, lambda t: t):
            ce = m.decoder.cross_entropy(h, targets, chunk_tokens=chunk)
        assert not any(len(s) == 2 and s[-1] == CFG.vocab_size and s != m.decoder.unembed.weight.shape for s in saved)
        fns, seen, stack = [], set(), [ce.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            fns += [fn] if hasattr(fn, "logits") else []
            stack += [f for f, _ in fn.next_functions]
        assert len(fns) == (1 if chunk == B * L else B * L // chunk)
        assert all((f.logits is not None) == (chunk == B * L) for f in fns)
        ce.sum().backward()
        assert all(f.logits is None for f in fns)


def objective_batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    x0 = 0.2 * torch.randn(B, L, C, generator=g)
    ids = torch.randint(0, CFG.vocab_size, (B, L), generator=g)
    cond = torch.zeros(B, L, dtype=torch.bool)
    cond[2:, :6] = True
    lmask = (~cond).float()
    lmask[1, 18:] = 0
    return x0, ids, cond, lmask


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["eval-like", "dropout"])
def test_fused_decode_loss_matches_reference(monkeypatch, dropout):
    monkeypatch.setattr(kernels, "CE_CHUNK_ELEMENTS", 7 * CFG.vocab_size)  # 7 tokens per chunk
    x0, ids, cond, lmask = objective_batch()
    cfg = ObjectiveConfig()
    d = draw(cfg, B, L, C, generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (True, False):
        m = make_model(dropout=dropout, depth=4).train()
        torch.manual_seed(5)
        loss = decode_loss(m, x0, ids, lmask, cfg, d, fused_ce=fused)
        loss.backward()
        results.append((loss.item(), grads(m)))
    (lf, gf), (lr, gr) = results
    assert abs(lf - lr) <= 1e-6 * abs(lr)
    assert_grads_close(gf, gr, 1e-5)


@pytest.mark.parametrize("rows", ["mixed", "none", "all"])
def test_self_cond_pass_on_used_rows_matches_official_passes(rows):
    x0, ids, cond, lmask = objective_batch()
    cfg = ObjectiveConfig()
    d = draw(cfg, B, L, C, generator=torch.Generator().manual_seed(4))
    d.self_cond = {
        "mixed": torch.tensor([True, False, True, False]),
        "none": torch.zeros(B, dtype=torch.bool),
        "all": torch.ones(B, dtype=torch.bool),
    }[rows]
    results = []
    for reuse in (True, False):
        m = make_model().train()
        loss = denoise_loss(m, x0, cond, lmask, cfg, d, reuse_prediction=reuse)
        loss.backward()
        results.append((loss.item(), grads(m)))
    (lf, gf), (lr, gr) = results
    assert abs(lf - lr) <= 1e-6 * abs(lr)
    assert_grads_close(gf, gr, 1e-5)


def test_fast_training_loss_under_bf16_autocast_is_close_to_reference():
    x0, ids, cond, lmask = objective_batch()
    cfg = ObjectiveConfig()
    d = draw(cfg, B, L, C, generator=torch.Generator().manual_seed(4))
    d.self_cond = torch.tensor([True, False, True, True])
    losses = {}
    for name, fast in (("fast-bf16", True), ("reference-fp32", False)):
        m = make_model().train().set_fast_attention(fast)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            losses[name, "denoise"] = denoise_loss(m, x0, cond, lmask, cfg, d, reuse_prediction=fast).item()
            losses[name, "decode"] = decode_loss(m, x0, ids, lmask, cfg, d, fused_ce=fast).item()
    for branch in ("denoise", "decode"):
        a, b = losses["fast-bf16", branch], losses["reference-fp32", branch]
        assert abs(a - b) <= 2e-2 * abs(b), (branch, a, b)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    m = make_model(depth=1)
    x, t, w, mask = inputs()
    out = m(x, t, w, attention_mask=mask).x_hat
    out.square().sum().backward()
    eager = grads(m)
    m.zero_grad()
    names = [n for n, _ in m.named_parameters()]
    m.compile_blocks().set_activation_checkpointing(True)  # compiled blocks, recomputed in backward
    assert [n for n, _ in m.named_parameters()] == names
    out_c = m(x, t, w, attention_mask=mask).x_hat
    out_c.square().sum().backward()
    assert (out_c - out).abs().max() < 1e-5
    assert_grads_close(grads(m), eager, 1e-4)


def test_compiled_sampler_matches_eager():
    m = make_model(depth=1).eval()
    cfg = SampleConfig(method="ode", steps=3, grid="uniform")
    seen = []
    eager = sampling.Sampler(m, cfg).sample(sampling.Sampler(m, cfg).start([0, 1], 8, 0))
    fast = sampling.Sampler(m, cfg, compiled=True)
    compiled = fast.sample(fast.start([0, 1], 8, 0), callback=lambda i, t, tn, zz, x: seen.append(x))
    assert (compiled - eager).abs().max() < 1e-5
    assert len({x.data_ptr() for x in seen}) == len(seen)  # outputs are copies, not a reused buffer
    flow.check_finite(compiled=compiled)
