"""Shared test fixtures: the golden numbers and offline assets in ``../shared``."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(os.environ.get("ELFLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN = SHARED / "golden"
ASSETS = SHARED / "assets"


def _need(path: Path) -> Path:
    if path.exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing: CI must run with ../shared beside the checkout")
    pytest.skip(f"{path} not found (set ELFLM_SHARED or put shared/ beside the repository)")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _need(GOLDEN)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return _need(ASSETS)


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    return _need(ASSETS / "tokenizers" / "t5-small")


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
