"""Training data (SPEC §1): rows and their masks (:mod:`.rows`), the prepared dataset on disk and
its memory-mapped reader (:mod:`.dataset`), the input readers (:mod:`.readers`) and
``elflm prepare`` (:mod:`.prepare`: tokenise, pack, shard)."""

from .dataset import PackedDataset, check_dataset, read_meta
from .prepare import prepare, training_dataset
from .readers import load_hf_dataset
from .rows import (
    apply_label_drop,
    batch_from_rows,
    build_rows,
    collate,
    collate_rows,
    device_batch,
    encoder_attention_mask,
    encoder_mask,
    loss_mask,
    row_masks,
)

__all__ = [
    "PackedDataset",
    "apply_label_drop",
    "batch_from_rows",
    "build_rows",
    "check_dataset",
    "collate",
    "collate_rows",
    "device_batch",
    "encoder_attention_mask",
    "encoder_mask",
    "load_hf_dataset",
    "loss_mask",
    "prepare",
    "read_meta",
    "training_dataset",
    "row_masks",
]
