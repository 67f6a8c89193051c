"""Rows and masks (SPEC §1): the official row rule, the batch masks, label drop and the loss mask
against golden/t5_encoder.npz."""

import numpy as np
import pytest
import torch

from elflm.data.rows import (
    apply_label_drop,
    batch_from_rows,
    build_rows,
    collate,
    encoder_attention_mask,
    encoder_mask,
    loss_mask,
    rows_from_flat,
)

from conftest import load_npz
from golden_utils import EOS, PAD, T, assert_batch, golden_id_lists


@pytest.fixture(scope="module")
def g(golden_dir):
    return load_npz("t5_encoder.npz")


def golden_batch(g, name):
    return batch_from_rows(
        g[f"{name}/input_ids"], np.stack([g[f"{name}/cond_seq_mask"].sum(1), g[f"{name}/attention_mask"].sum(1)], 1)
    )


def test_golden_batches_from_raw_ids(g):
    uncond, conds, targets = golden_id_lists(g)
    rows, lengths = build_rows(uncond, max_length=16, pad_id=PAD)
    assert lengths.tolist() == [[0, 16], [0, 11], [0, 6]]
    assert_batch(batch_from_rows(rows, lengths), g, "uncond")
    rows, lengths = build_rows(targets, max_length=16, pad_id=EOS, conditions=conds, max_input_length=8)
    assert lengths.tolist() == [[5, 11], [8, 16], [3, 15]]
    assert_batch(batch_from_rows(rows, lengths), g, "cond")
    items = [{"input_ids": r, "cond_len": int(c), "total_len": int(t)} for r, (c, t) in zip(rows, lengths)]
    assert_batch(collate(items), g, "cond")


def test_flat_rows_keep_the_storage_dtype():
    rows, lengths = rows_from_flat(
        np.array([3, 4, 5, 6], np.uint16),
        [1, 3],
        3,
        PAD,
        np.dtype("<u2"),
        np.array([9, 9, 9], np.uint16),
        [2, 1],
        max_input_length=1,
    )
    assert rows.dtype == np.dtype("<u2") and rows.tolist() == [[9, 3, 0], [9, 4, 5]]
    assert lengths.dtype == np.int32 and lengths.tolist() == [[1, 2], [1, 3]]


def test_encoder_attention_mask_semantics():
    rows, lengths = build_rows([[5, 6], [7]], max_length=6, pad_id=EOS, conditions=[[2, 3, 4], []], max_input_length=2)
    assert rows.tolist() == [[2, 3, 5, 6, 1, 1], [7, 1, 1, 1, 1, 1]]
    m = batch_from_rows(rows, lengths)["encoder_attention_mask"]
    assert m[0, :2].tolist() == [[1, 1, 0, 0, 0, 0]] * 2  # condition rows: condition columns only
    assert m[0, 2:].tolist() == [[1, 1, 1, 1, 0, 0]] * 4  # target and padding rows: all valid columns
    assert m[1].tolist() == [[1, 0, 0, 0, 0, 0]] * 6
    with pytest.raises(ValueError, match="one condition per sequence"):
        build_rows([[1]], 4, 0, conditions=[])
    with pytest.raises(ValueError, match="same shape"):
        encoder_attention_mask(torch.ones(2, 5), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"lengths \(B, 2\)"):
        batch_from_rows(rows, lengths[:, :1])


@pytest.mark.parametrize("name", ["uncond", "cond"])
def test_mask_builder_matches_official_collate(g, name):
    em = encoder_attention_mask(T(g, f"{name}/attention_mask"), T(g, f"{name}/cond_seq_mask"))
    assert em.dtype == torch.float32
    assert torch.equal(em, T(g, f"{name}/encoder_attention_mask"))


def test_label_drop_rule_matches_official_train_step(g):
    cm = T(g, "cond/cond_seq_mask")
    em = encoder_attention_mask(T(g, "cond/attention_mask"), cm)
    drop = T(g, "cond/label_drop_rows")
    out = apply_label_drop(em, cm, drop)
    assert torch.equal(out, T(g, "cond/encoder_attention_mask_labeldrop"))
    assert torch.equal(apply_label_drop(em, cm, drop.bool()), out)
    assert not torch.equal(out, em)  # row 0 changed, rows 1 and 2 kept
    assert torch.equal(out[1:], em[1:])
    with pytest.raises(ValueError, match=r"drop \(B,\)"):
        apply_label_drop(em, cm, drop[:2])


def test_encoder_mask_of_a_batch(g):
    uncond, cond = golden_batch(g, "uncond"), golden_batch(g, "cond")
    assert encoder_mask(uncond) is uncond["attention_mask"]  # no condition: the (B, L) padding mask
    assert encoder_mask(uncond, torch.ones(3, dtype=torch.bool)) is uncond["attention_mask"]
    assert encoder_mask(cond) is cond["encoder_attention_mask"]
    assert torch.equal(encoder_mask(cond, torch.zeros(3, dtype=torch.bool)), cond["encoder_attention_mask"])
    drop = T(g, "cond/label_drop_rows").bool()
    assert torch.equal(encoder_mask(cond, drop), T(g, "cond/encoder_attention_mask_labeldrop"))


def test_loss_mask_rules():
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0]]), "cond_seq_mask": torch.tensor([[1, 0, 0, 0]])}
    assert loss_mask(batch, "pad").tolist() == [[0, 1, 1, 0]]
    assert loss_mask(batch, "eos").tolist() == [[0, 1, 1, 1]]
    assert loss_mask(batch, "pad").dtype == torch.float32
