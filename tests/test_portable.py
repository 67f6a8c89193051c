"""Folders that travel: a converted official checkpoint (with the authors' encoder pickle), a saved
model and a training run's checkpoint record no path of this machine or working directory, and
sample after being moved, from another working directory, without the Hub; relative paths work
wherever a path is accepted; model cards; uploads fail at once offline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from elflm import hub
from elflm.checkpoint import TrainingCheckpoint
from elflm.cli import main
from elflm.config import EncoderConfig
from elflm.model import ELF
from elflm.portable import bundle_encoder, resolve_encoder
from elflm.pretrained import CARD, card_metrics
from elflm.train import train

from conftest import SHARED
from golden_utils import FLAX, STEP2, assert_same_weights, muon_weights
from train_fixtures import make_corpus, make_tiny_t5, tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


def sample_elsewhere(folder, cwd: Path, n: int = 2) -> list[dict]:
    """``elflm sample --checkpoint folder`` in a subprocess run from ``cwd``, offline."""
    cwd.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": path}
    args = ["sample", "--checkpoint", str(folder), "--num-samples", str(n), "--steps", "2"]
    r = subprocess.run(
        [sys.executable, "-m", "elflm.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def machine_paths(obj) -> list[str]:
    """Strings of a config that are absolute paths or climb out of their folder."""
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in machine_paths(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in machine_paths(v)]
    return [obj] if isinstance(obj, str) and (obj.startswith("/") or ".." in Path(obj).parts) else []


def test_converted_official_checkpoint_with_the_encoder_pickle_travels(
    golden_dir, t5_tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(SHARED)  # relative paths, as typed on the command line
    out = tmp_path / "converted"
    tokenizer = os.path.relpath(t5_tokenizer_dir, SHARED)
    with pytest.warns(UserWarning, match="encoder embeds only 128"):
        assert main(["convert", "golden/checkpoint", "-o", os.path.relpath(out, SHARED), "--tokenizer", tokenizer]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert machine_paths(cfg) == []
    assert (cfg["encoder"]["weights"], cfg["encoder"]["tokenizer"]) == ("encoder", "encoder")
    assert cfg["source"] == {
        "format": "flax-orbax",
        "path": "checkpoint_3",
        "step": 3,
        "config": "config.yml",
        "weights": "ema",
    }
    model = ELF.from_pretrained(os.path.relpath(out, SHARED), encoder=False)  # relative path to ours too
    assert_same_weights(model.state_dict(), muon_weights(f"{STEP2}/ema_after"))
    moved = Path(shutil.move(str(out), str(tmp_path / "moved" / "elf-tiny")))
    rows = sample_elsewhere(moved, tmp_path / "somewhere-else")
    assert len(rows) == 2 and all(len(r["ids"]) == 16 for r in rows)


def test_training_run_checkpoint_travels(assets_dir, t5_tokenizer_dir, tmp_path, monkeypatch):
    base = tmp_path / "work"
    base.mkdir()
    make_tiny_t5(base / "enc", t5_tokenizer_dir)
    make_corpus(base / "corpus", assets_dir, t5_tokenizer_dir, chars=20_000)
    monkeypatch.chdir(base)
    cfg = tiny_run_config(Path("run"), Path("corpus/data"), Path("enc"), {"train.max_steps": 1})
    assert cfg.encoder.name_or_path == "enc"  # relative to the working directory
    train(cfg, progress=False)
    ckpt = TrainingCheckpoint.latest("run")
    saved = yaml.safe_load((ckpt.path / TrainingCheckpoint.CONFIG).read_text())
    assert saved["encoder"]["name_or_path"] == "encoder" and (ckpt.path / "encoder" / "model.safetensors").is_file()
    assert ckpt.config().encoder.name_or_path == str(ckpt.path / "encoder")
    moved = shutil.move(str(base / "run"), str(tmp_path / "archive" / "run"))
    shutil.rmtree(base / "enc")  # the encoder the run was started with is gone too
    rows = sample_elsewhere(moved, tmp_path / "other")
    assert len(rows) == 2 and all(len(r["ids"]) == 32 for r in rows)
    model = ELF.from_pretrained(moved)  # converted to a model folder: the encoder comes along
    out = model.save_pretrained(tmp_path / "folder")
    assert machine_paths(json.loads((out / "config.json").read_text())) == []
    assert sample_elsewhere(shutil.move(str(out), str(tmp_path / "folder2")), tmp_path / "third", n=1)


def test_bundle_and_resolve(tmp_path, monkeypatch):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spiece.model").write_text("x")
    (tmp_path / "w.pkl").write_text("p")
    monkeypatch.chdir(tmp_path)
    enc = EncoderConfig(name_or_path="t5-small", weights="w.pkl", tokenizer="tok")
    out = bundle_encoder(enc, tmp_path / "m")
    assert (out.name_or_path, out.weights, out.tokenizer) == ("t5-small", "encoder/w.pkl", "encoder/tokenizer")
    assert (tmp_path / "m" / "encoder" / "tokenizer" / "spiece.model").is_file()
    assert (tmp_path / "m" / "encoder" / "w.pkl").is_file()
    for name in ("model", "tok"):  # two folders with a config.json each: never mixed into one
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text(name)
    two = bundle_encoder(EncoderConfig(kind="hf", name_or_path="model", tokenizer="tok"), tmp_path / "two")
    assert (two.name_or_path, two.tokenizer) == ("encoder", "encoder/tokenizer")
    assert (tmp_path / "two" / "encoder" / "config.json").read_text() == "model"
    back = resolve_encoder(out, tmp_path / "m")
    assert back.tokenizer == str(tmp_path / "m" / "encoder" / "tokenizer")
    assert back.weights == str(tmp_path / "m" / "encoder" / "w.pkl") and back.name_or_path == "t5-small"
    assert bundle_encoder(EncoderConfig(weights="random", name_or_path="org/t5"), tmp_path / "n").weights == "random"
    with pytest.raises(
        ValueError, match="encoder.tokenizer='../nowhere' is neither an existing local path nor a Hub id"
    ):
        bundle_encoder(EncoderConfig(tokenizer="../nowhere"), tmp_path / "k")


def test_model_card_and_metrics(golden_dir, tmp_path):
    model = ELF.from_pretrained(FLAX, encoder=False)
    model.pretrained.data.train_path = "embedded-language-flows/openwebtext-t5"
    report = {"samples": {"path": "s.jsonl", "count": 8, "gen_ppl": 25.6, "entropy": 5.2}, "judge": {"name": "gpt2"}}
    assert card_metrics(report) == {"gen_ppl": 25.6, "entropy": 5.2}
    out = model.save_pretrained(tmp_path / "m", metrics=report)
    text = (out / CARD).read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "elflm" and "elflm" in meta["tags"] and meta["base_model"] == "t5-small"
    assert meta["datasets"] == ["embedded-language-flows/openwebtext-t5"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics} == {"gen_ppl": 25.6, "entropy": 5.2}
    assert "ELF.from_pretrained" in text and "depth 2" in text
    assert (
        json.loads((out / "config.json").read_text())["data"]["train_path"] == "embedded-language-flows/openwebtext-t5"
    )
    with pytest.raises(ValueError, match="metrics must be a mapping"):
        card_metrics([1, 2])


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_push_fails_at_once_without_the_hub(golden_dir, tmp_path, monkeypatch, capsys, how):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    model = ELF.from_pretrained(FLAX, encoder=False)
    with pytest.raises(hub.HubError, match="cannot upload.*(HF_HUB_OFFLINE|cannot be reached).*elflm push"):
        model.push_to_hub("me/elf-tiny")
    folder = model.save_pretrained(tmp_path / "m")
    (folder / CARD).unlink()
    assert main(["push", str(folder), "me/elf-tiny"]) == 2
    err = capsys.readouterr().err
    assert "elflm push: error: cannot upload" in err and f"`elflm push {folder} me/elf-tiny` again" in err
    assert not (folder / CARD).exists()  # nothing written before the failure
    assert main(["push", str(folder), "not-a-repo-id"]) == 2
    assert "expected the form 'org/name'" in capsys.readouterr().err
    metrics = tmp_path / "metrics.json"
    metrics.write_text("[1]")
    assert main(["push", str(folder), "me/elf-tiny", "--metrics", str(metrics)]) == 2
    assert "metrics must be a mapping" in capsys.readouterr().err
