"""Rows and masks (SPEC §1): the official row rule and every mask derived from a row.

A row follows the official collate (``utils/data_utils.py``): ``condition[:max_input_length] ++
target`` truncated / padded to ``max_length`` with the pad id (EOS for conditional data,
``pad_token: eos``); an unconditional row has no condition. A row's ``lengths`` entry
``[cond_len, total_len]`` determines its masks: position ``i`` is condition if ``i < cond_len`` and
valid if ``i < total_len``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _offsets(lens: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else np.zeros(0, np.int64)


def rows_from_flat(ids, lens, max_length: int, pad_id: int, dtype, cond=None, cond_lens=None, max_input_length=None):
    """Vectorised official row rule on flat id arrays: row ``n`` is
    ``cond_n[:max_input_length] ++ ids_n`` truncated / padded to ``max_length`` with ``pad_id``.
    ``ids`` is the concatenation of the ``lens`` (N,) sequences (same for ``cond``/``cond_lens``).
    Returns ``rows (N, L)`` of ``dtype`` and ``lengths (N, 2) int32 [cond_len, total_len]``."""
    lens = np.asarray(lens, dtype=np.int64)
    n, L = len(lens), max_length
    rows = np.full((n, L), pad_id, dtype=dtype)
    c = np.zeros(n, np.int64)
    if cond is not None:
        cond_lens = np.asarray(cond_lens, dtype=np.int64)
        keep_c = cond_lens if max_input_length is None else np.minimum(cond_lens, max_input_length)
        c = np.minimum(keep_c, L)
        pos = np.arange(len(cond)) - np.repeat(_offsets(cond_lens), cond_lens)
        row = np.repeat(np.arange(n), cond_lens)
        keep = pos < np.repeat(c, cond_lens)
        rows[row[keep], pos[keep]] = np.asarray(cond)[keep]
    pos = np.arange(len(ids)) - np.repeat(_offsets(lens), lens) + np.repeat(c, lens)
    row = np.repeat(np.arange(n), lens)
    keep = pos < L
    rows[row[keep], pos[keep]] = np.asarray(ids)[keep]
    return rows, np.stack([c, np.minimum(c + lens, L)], axis=1).astype(np.int32)


def build_rows(
    sequences: Sequence[Sequence[int]],
    max_length: int,
    pad_id: int,
    conditions: Sequence[Sequence[int]] | None = None,
    max_input_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows from token-id lists, as the official collate builds them: row ``n`` is
    ``conditions[n][:max_input_length] ++ sequences[n]`` (no condition when ``conditions`` is
    None) truncated / padded to ``max_length`` with ``pad_id``.

    Returns ``rows (N, L) int64`` and ``lengths (N, 2) int32`` = ``[cond_len, total_len]``."""
    if max_length < 1:
        raise ValueError(f"max_length must be ≥ 1, got {max_length}")

    def flat(seqs):
        lens = np.array([len(s) for s in seqs], dtype=np.int64)
        ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if lens.sum() else np.zeros(0, np.int64)
        return ids, lens

    ids, lens = flat(sequences)
    if conditions is None:
        return rows_from_flat(ids, lens, max_length, pad_id, np.int64)
    if len(conditions) != len(sequences):
        raise ValueError(f"expected one condition per sequence, got {len(conditions)} and {len(sequences)}")
    cond, cond_lens = flat(conditions)
    return rows_from_flat(ids, lens, max_length, pad_id, np.int64, cond, cond_lens, max_input_length)


def encoder_attention_mask(attention_mask: torch.Tensor, cond_seq_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, L) float32 encoder mask from ``attention_mask`` (B, L) (valid tokens) and
    ``cond_seq_mask`` (B, L) (condition tokens): a condition row attends only to condition
    columns, every other row (padding rows included) to every valid column."""
    if attention_mask.dim() != 2 or attention_mask.shape != cond_seq_mask.shape:
        raise ValueError(
            f"expected attention_mask and cond_seq_mask of the same shape (B, L), got "
            f"{tuple(attention_mask.shape)} and {tuple(cond_seq_mask.shape)}"
        )
    valid, cond = attention_mask.bool(), cond_seq_mask.bool()
    rows = cond[:, :, None]
    return ((rows & cond[:, None, :]) | (~rows & valid[:, None, :])).float()


def apply_label_drop(mask: torch.Tensor, cond_seq_mask: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """The (B, L, L) encoder ``mask`` after label drop: in rows with ``drop`` (B,) set, non-condition
    rows lose the condition columns, ``mask·(1 − drop·(1 − cond)_i·cond_j)``. Returns float32."""
    B, L = cond_seq_mask.shape[0], cond_seq_mask.shape[-1]
    if cond_seq_mask.dim() != 2 or mask.shape != (B, L, L) or drop.shape != (B,):
        raise ValueError(
            f"expected mask (B, L, L), cond_seq_mask (B, L) and drop (B,), got {tuple(mask.shape)}, "
            f"{tuple(cond_seq_mask.shape)} and {tuple(drop.shape)}"
        )
    cond, d = cond_seq_mask.float(), drop.float()
    return mask.float() * (1 - d[:, None, None] * (1 - cond)[:, :, None] * cond[:, None, :])


def row_masks(lengths: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_mask`` (``i < total_len``) and ``cond_seq_mask`` (``i < cond_len``), both (B, L)
    float32 on the device of ``lengths`` (B, 2) ``[cond_len, total_len]``."""
    pos = torch.arange(length, device=lengths.device)
    return (pos < lengths[:, 1:]).float(), (pos < lengths[:, :1]).float()


def batch_from_rows(rows, lengths) -> dict[str, torch.Tensor]:
    """The model batch from rows (B, L) of ids and lengths (B, 2) ``[cond_len, total_len]``, as the
    official collate builds it: ``input_ids`` (B, L) int64, ``attention_mask`` and ``cond_seq_mask``
    (B, L) float32 (:func:`row_masks`) and ``encoder_attention_mask`` (B, L, L) float32 (see
    :func:`encoder_attention_mask`). The training loop builds the lean :func:`device_batch` instead."""
    ids = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
    if ids.dim() != 2 or lengths.shape != (ids.shape[0], 2):
        raise ValueError(f"expected rows (B, L) and lengths (B, 2), got {tuple(ids.shape)} and {tuple(lengths.shape)}")
    attention_mask, cond_seq_mask = row_masks(lengths, ids.shape[1])
    return {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "cond_seq_mask": cond_seq_mask,
        "encoder_attention_mask": encoder_attention_mask(attention_mask, cond_seq_mask),
    }


def collate_rows(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The host side of a training batch, what a ``DataLoader`` worker collates and pins: ``input_ids``
    (B, L) int64 and ``lengths`` (B, 2) int64 ``[cond_len, total_len]`` of dataset items
    (``input_ids`` (L,), ``cond_len``, ``total_len``; see :class:`~elflm.data.PackedDataset`). The
    masks are built from them on the device by :func:`device_batch`."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    rows = np.stack([np.asarray(it["input_ids"]) for it in items]).astype(np.int64)
    lengths = np.array([[it["cond_len"], it["total_len"]] for it in items], dtype=np.int64)
    return {"input_ids": torch.from_numpy(rows), "lengths": torch.from_numpy(lengths)}


def collate(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Batch of dataset items (``input_ids`` (L,), ``cond_len``, ``total_len``; see
    :class:`~elflm.data.PackedDataset`); see :func:`batch_from_rows` for the keys."""
    rows = collate_rows(items)
    return batch_from_rows(rows["input_ids"], rows["lengths"])


def device_batch(
    rows: dict[str, torch.Tensor], device, non_blocking: bool = False, conditional: bool | None = None
) -> dict[str, torch.Tensor]:
    """The model batch of :func:`collate_rows` output, on ``device``: the ids and lengths are copied
    (``non_blocking`` from pinned memory) and the masks built there: ``attention_mask``,
    ``cond_seq_mask`` (B, L) and, only when some row has a condition (``conditional``; None: read
    from the host ``lengths``, no device sync), ``encoder_attention_mask`` (B, L, L). Without it the
    rows are encoded with the (B, L) ``attention_mask``, which their (B, L, L) mask would equal."""
    ids = rows["input_ids"].to(device, non_blocking=non_blocking)
    lengths = rows["lengths"].to(device, non_blocking=non_blocking)
    attention_mask, cond_seq_mask = row_masks(lengths, ids.shape[1])
    batch = {"input_ids": ids, "attention_mask": attention_mask, "cond_seq_mask": cond_seq_mask}
    if bool(rows["lengths"][:, 0].any()) if conditional is None else conditional:
        batch["encoder_attention_mask"] = encoder_attention_mask(attention_mask, cond_seq_mask)
    return batch


def encoder_mask(batch: dict, label_drop: torch.Tensor | None = None) -> torch.Tensor:
    """The mask a batch is encoded with: the (B, L, L) ``encoder_attention_mask`` (with
    :func:`apply_label_drop` of ``label_drop`` (B,) bool, elementwise, no host sync), or the (B, L)
    ``attention_mask`` it equals when the batch has no (B, L, L) mask (:func:`device_batch` of rows
    without a condition) or no row with a condition (any HF encoder takes that one)."""
    mask = batch.get("encoder_attention_mask")
    if mask is None or not bool(batch["cond_seq_mask"].any()):
        return batch["attention_mask"]
    if label_drop is not None:
        mask = apply_label_drop(mask, batch["cond_seq_mask"], label_drop.to(mask.device))
    return mask


def loss_mask(batch: dict, pad_token: str) -> torch.Tensor:
    """(B, L) float32 tokens of the loss: ``(attention_mask if pad_token == 'pad' else 1)·(1 − cond_seq_mask)``."""
    valid = batch["attention_mask"].float()
    if pad_token != "pad":
        valid = torch.ones_like(valid)
    return valid * (1 - batch["cond_seq_mask"].float())
