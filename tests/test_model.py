"""The ELF network against the official forward (golden/elf_model.npz) and on bad input."""

import pytest
import torch

from elflm.config import model_preset
from elflm.model import ELF, apply_rope, rope_tables

from conftest import load_npz
from golden_utils import TINY, T, assert_close, tiny_model

BATCHES = ["uncond", "cond"]


@pytest.fixture(scope="module")
def g(golden_dir):
    return load_npz("elf_model.npz")


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "sdpa"])
@pytest.mark.parametrize("name", BATCHES)
def test_forward_matches_official(g, name, fast):
    m = tiny_model(fast=fast)
    k = lambda s: T(g, f"{name}/{s}")
    ones = torch.ones(3)
    with torch.no_grad():
        out, logits, _ = m(k("x_in"), k("t"), k("w"))
        assert logits is None
        assert_close(out, g[f"{name}/denoise_out"], 1e-5, "denoise_out")
        assert_close(out, g[f"{name}/denoise_out_active_false"], 1e-5, "denoise_out_active_false")
        out, logits, _ = m(k("x_dec_in"), ones, k("w"), decode=True)
        assert_close(out, g[f"{name}/decode_out"], 1e-5, "decode_out")
        assert_close(logits, g[f"{name}/decode_logits"], 5e-5, "decode_logits")
        out, logits, _ = m(k("x_in"), k("t"), k("w"), attention_mask=k("attention_mask"))
        assert_close(out, g[f"{name}/masked/denoise_out"], 1e-5, "masked/denoise_out")
        out, logits, _ = m(k("x_dec_in"), ones, k("w"), decode=True, attention_mask=k("attention_mask"))
        assert_close(out, g[f"{name}/masked/decode_out"], 1e-5, "masked/decode_out")
        assert_close(logits, g[f"{name}/masked/decode_logits"], 5e-5, "masked/decode_logits")
        out, _, _ = m(k("x_in"), k("t"), None)
        assert_close(out, g[f"{name}/no_sccfg/denoise_out"], 1e-5, "no_sccfg")
        out, _, _ = m(k("z"), k("t"), k("w"))
        assert_close(out, g[f"{name}/c_input/denoise_out"], 1e-5, "c_input")


def test_golden_inputs_follow_the_flow(g):
    from elflm import flow

    for name in BATCHES:
        k = lambda s, name=name: T(g, f"{name}/{s}")
        z = flow.add_noise(k("x0"), k("eps"), k("t"), 2.0, k("cond_seq_mask"))
        assert_close(z, g[f"{name}/z"], 1e-6, "z")


def test_padding_mask_changes_padded_rows_only_through_attention(g):
    """Unmasked (official) vs masked outputs differ where rows contain padding."""
    m = tiny_model()
    k = lambda s: T(g, "uncond/" + s)
    with torch.no_grad():
        a = m(k("x_in"), k("t"), k("w")).x_hat
        b = m(k("x_in"), k("t"), k("w"), attention_mask=k("attention_mask")).x_hat
    full = k("attention_mask").bool().all(-1)
    assert torch.allclose(a[full], b[full], atol=1e-5)
    assert (a[~full] - b[~full]).abs().max() > 1e-3


def test_shorter_rows_use_the_same_positions(g):
    m = tiny_model()
    k = lambda s: T(g, "uncond/" + s)
    with torch.no_grad():
        full = m(k("x_in"), k("t"), k("w"), attention_mask=k("attention_mask")).x_hat
        short = m(k("x_in")[:, :8], k("t"), k("w"), attention_mask=k("attention_mask")[:, :8]).x_hat
    # row 2 has 6 valid tokens: with masking, its outputs do not depend on the padded tail
    assert_close(short[2, :6], full[2, :6], 1e-5, "short row")


def test_rope_is_interleaved_and_prefix_unrotated():
    cos, sin = rope_tables(2, 3, 4)
    x = torch.arange(20.0).view(1, 1, 5, 4)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., :2, :], x[..., :2, :])
    p, f0 = 2, 1.0  # text position 2, first pair frequency theta^0
    c, s = torch.cos(torch.tensor(p * f0)), torch.sin(torch.tensor(p * f0))
    x0, x1 = x[0, 0, 4, 0], x[0, 0, 4, 1]
    assert torch.allclose(y[0, 0, 4, :2], torch.stack([x0 * c - x1 * s, x1 * c + x0 * s]))


def test_initialisation_follows_official():
    m = ELF(TINY)
    assert torch.count_nonzero(m.final_layer.linear.weight) == 0
    assert torch.count_nonzero(m.blocks[0].attn.qkv.bias) == 0
    assert 0.01 < m.t_emb_tokens.std() < 0.03
    bound = (6 / (64 + 192)) ** 0.5
    assert m.blocks[0].attn.qkv.weight.abs().max() <= bound


@pytest.mark.parametrize("name,expected", [("elf-b", 104_594_304), ("elf-m", 342_554_400), ("elf-l", 652_117_696)])
def test_parameter_counts(name, expected):
    """Exactly what the authors' model definitions give (C = 512, V = 32128, max length 1024;
    the paper rounds them to 105M / 342M / 652M); the decode head alone is 16,846,976 of them."""
    cfg = model_preset(name)
    assert (cfg.encoder_dim, cfg.vocab_size, cfg.max_length) == (512, 32128, 1024)
    with torch.device("meta"):
        model = ELF(cfg)
    assert model.num_params() == expected
    assert sum(p.numel() for p in model.decoder.parameters()) == cfg.hidden_size * 512 + 512 + 512 * 32128 + 32128


def test_bad_inputs_raise_clear_errors():
    m = ELF(TINY).eval()
    x, t, w = torch.randn(2, 16, 64), torch.rand(2), torch.rand(2)
    with pytest.raises(ValueError, match=r"x must be \(B, L, 64 or 32\)"):
        m(torch.randn(2, 16, 48), t, w)
    with pytest.raises(ValueError, match="t must have shape"):
        m(x, torch.rand(3), w)
    with pytest.raises(ValueError, match="w must have shape"):
        m(x, t, torch.rand(2, 1))
    with pytest.raises(ValueError, match="exceeds max_length"):
        m(torch.randn(2, 17, 64), t, w)
