"""Training data (SPEC §1): rows and the model batch (:mod:`.rows`), the prepared dataset on disk and
its memory-mapped reader (:mod:`.dataset`), the input readers (:mod:`.readers`) and
``elflm prepare`` (:mod:`.prepare`: tokenise, pack, shard)."""
from .dataset import PackedDataset, read_meta
from .prepare import prepare
from .readers import load_hf_dataset
from .rows import batch_from_rows, build_rows, collate

__all__ = ["PackedDataset", "batch_from_rows", "build_rows", "collate", "load_hf_dataset", "prepare", "read_meta"]
