"""Shared test fixtures: the golden numbers and offline assets in ``../shared``, and the one way
a test may skip (:func:`skip_unless`), which fails instead when ``CI`` is set."""

import gzip
import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each
    torch.set_num_threads(1)

SHARED = Path(os.environ.get("ELFLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN = SHARED / "golden"
ASSETS = SHARED / "assets"


def skip_unless(ok: bool, reason: str) -> None:
    """Skip the calling test when ``ok`` is false, or fail it under CI (``CI`` set), where every
    requirement must be installed and ``../shared`` present."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must provide it")
    pytest.skip(reason)


def need_module(name: str, install: str):
    """Import ``name``, or skip (fail under CI) saying how to install it."""
    skip_unless(importlib.util.find_spec(name) is not None, f"needs the package {name} ({install})")
    return importlib.import_module(name)


def _need(path: Path) -> Path:
    skip_unless(path.exists(), f"{path} not found (set ELFLM_SHARED or put shared/ beside the repository)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _need(GOLDEN)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return _need(ASSETS)


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    return _need(ASSETS / "tokenizers" / "t5-small")


def read_gzip_text(path) -> str:
    """The text of a gzipped UTF-8 file (the shared corpora)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def load_npz(name: str) -> dict:
    """All arrays of a golden ``.npz`` as a plain dict (loaded once per name)."""
    if name not in _NPZ:
        with np.load(_need(GOLDEN / name)) as f:
            _NPZ[name] = {k: f[k] for k in f.files}
    return _NPZ[name]


_NPZ: dict = {}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
