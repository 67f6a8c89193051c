"""Small real components for training tests: a tiny random T5 encoder folder (32 wide, the
real T5 vocabulary and tokenizer), a prepared Gutenberg slice, prepared Multi30k pairs, a tiny
random GPT-2 judge, and helpers to run the CLI (also under torchrun) and compare the final weights
of runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from elflm.checkpoint import TrainingCheckpoint
from elflm.config import dump_config, from_dict

from conftest import read_gzip_text


def make_tiny_t5(folder: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer, 32-wide T5 encoder with the t5-small tokenizer, saved as an HF folder."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=32128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="relu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(folder)
    for f in Path(tokenizer_dir).iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    return folder


def make_corpus(folder: Path, assets_dir: Path, tokenizer_dir: Path, chars: int = 60_000, max_length: int = 32) -> Path:
    """Pack the first ``chars`` characters of the Gutenberg validation shard into rows."""
    from elflm.data import prepare

    text = read_gzip_text(assets_dir / "text/gutenberg/val-00.txt.gz")[:chars]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    prepare(
        folder / "corpus.txt",
        folder / "data",
        tokenizer=str(tokenizer_dir),
        max_length=max_length,
        workers=1,
        progress=False,
    )
    return folder / "data"


def tiny_run_config(out: Path, data: Path, encoder: Path, overrides: dict | None = None):
    """A tiny run config dict → Config (4 steps by default, batch 8, CPU)."""
    d = {
        "model": {"preset": "tiny"},
        "encoder": {"kind": "t5", "name_or_path": str(encoder)},
        "data": {"train_path": str(data), "max_length": 32},
        "train": {
            "max_steps": 4,
            "global_batch_size": 8,
            "lr": 2e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "save_every": 0,
            "keep_last": 0,
            "output_dir": str(out),
            "device": "cpu",
            "seed": 0,
        },
        "sample": {"method": "sde", "steps": 4},
    }
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        d.setdefault(section, {})[name] = value
    return from_dict(d)


def write_config(cfg, path: Path) -> Path:
    dump_config(cfg, path)
    return path


def make_pairs(folder: Path, assets_dir: Path, tokenizer_dir: Path, start: int, count: int) -> Path:
    """German→English Multi30k validation pairs ``start … start + count − 1`` prepared as
    conditional rows of 32 tokens (16 condition tokens, EOS padding)."""
    from elflm.data import prepare

    folder.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        lines = read_gzip_text(assets_dir / f"text/multi30k/val.{lang}.gz").splitlines()[start : start + count]
        (folder / f"pairs.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare(
        [folder / "pairs.de", folder / "pairs.en"],
        folder / "data",
        tokenizer=str(tokenizer_dir),
        max_length=32,
        max_input_length=16,
        format="parallel",
        workers=1,
        progress=False,
    )
    return folder / "data"


def make_tiny_judge(folder: Path, assets_dir: Path) -> Path:
    """A random 2-layer GPT-2 (64 positions) with the real GPT-2 tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(assets_dir / "tokenizers" / "gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tok), initializer_range=0.3)
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


ROOT = Path(__file__).resolve().parents[1]
# subprocesses use this process's thread count, so that kernels reduce in the same order (bit-exact)
SAME_THREADS = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def cli(*args, timeout=300, env_extra=None):
    e = {**SAME_THREADS, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def final_weights(out: Path) -> dict:
    last = TrainingCheckpoint.latest(out)
    return {**{f"raw/{k}": v for k, v in last.raw().items()}, **{f"ema/{k}": v for k, v in last.ema().items()}}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
