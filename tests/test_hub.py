"""The Hugging Face Hub, offline: snapshots in the cache load (converted once when foreign), Hub
files resolve from the cache, and a missing network fails at once saying what to do."""

import importlib.util
import shutil

import pytest
from safetensors.torch import load_file

from elflm import hub
from elflm.config import sampler_preset
from elflm.formats.torchport import port_params_to_state_dict
from elflm.generate import generate
from elflm.model import ELF
from elflm.pretrained import WEIGHTS

from conftest import GOLDEN, load_npz
from golden_utils import (
    FLAX,
    FLAX_CONFIG,
    PORT,
    STEP2,
    T,
    assert_close,
    assert_same_weights,
    muon_weights,
    pd_weights,
    write_pd_checkpoint,
)


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("ELFLM_CACHE", str(tmp_path / "elflm-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def port_folder(golden_dir, tmp_path_factory):
    return ELF.convert(PORT, tmp_path_factory.mktemp("port") / "model", config=FLAX_CONFIG)


def _hub_snapshot(cache, repo_id: str, commit: str, files: dict) -> None:
    """A Hugging Face cache entry as snapshot_download leaves it (files copied, not linked)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        (shutil.copytree if src.is_dir() else shutil.copy)(src, snap / name)


def test_names(tmp_path):
    assert hub.is_hub_id("org/name") and not hub.is_hub_id("name") and not hub.is_hub_id("org/repo/file.pkl")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not hub.is_hub_id(tmp_path / "org" / "name")
    assert hub.is_offline() and not hub.is_offline(False)
    assert hub.cache_root() == tmp_path / "elflm-cache"
    assert hub.resolve_file(tmp_path / "org", "thing") == tmp_path / "org"
    with pytest.raises(FileNotFoundError, match="no such local file or folder, and not a Hub id"):
        hub.resolve_file(tmp_path / "missing.pkl", "encoder pickle")
    with pytest.raises(FileNotFoundError, match="expected a local file or a Hub file 'org/repo/file'"):
        hub.resolve_file("org/missing.pkl", "encoder pickle")


def test_hub_snapshot_of_an_official_checkpoint_converts_once_offline(golden_dir, tmp_path):
    _hub_snapshot(
        tmp_path / "hub-cache", "someone/elf-tiny", "a" * 40, {"checkpoint_3": FLAX, "config.yml": FLAX_CONFIG}
    )
    model = ELF.from_pretrained("someone/elf-tiny", encoder=False)
    assert_same_weights(model.state_dict(), muon_weights(f"{STEP2}/ema_after"))
    converted = tmp_path / "elflm-cache" / "converted" / "models--someone--elf-tiny" / ("a" * 40)
    assert model.pretrained.source["hub"] == {"repo_id": "someone/elf-tiny", "commit": "a" * 40}
    stamp = (converted / WEIGHTS).stat().st_mtime_ns
    ELF.from_pretrained("someone/elf-tiny", encoder=False)
    assert (converted / WEIGHTS).stat().st_mtime_ns == stamp  # cached, not converted again


def test_hub_snapshot_in_our_format_loads_directly(port_folder, tmp_path):
    _hub_snapshot(tmp_path / "hub-cache", "someone/elf-ours", "b" * 40, {p.name: p for p in port_folder.iterdir()})
    model = ELF.from_pretrained("someone/elf-ours", encoder=False)
    assert_same_weights(model.state_dict(), load_file(port_folder / WEIGHTS))
    assert not (tmp_path / "elflm-cache").exists()


@pytest.mark.filterwarnings("ignore:the tokenizer .* has 32100 tokens")
def test_the_distilled_checkpoint_by_hub_id_and_file(golden_dir, t5_tokenizer_dir, tmp_path):
    """embedded-language-flows/ELF-B-PD-owt-torch as its snapshot may hold it (checkpoint_<step>, no
    config): the published settings (max_length 1024, the few-step sampler) complete it; it samples
    with the fewstep preset."""
    repo = "embedded-language-flows/ELF-B-PD-owt-torch"
    file = write_pd_checkpoint(tmp_path / "snap", step=5, config=False)
    _hub_snapshot(tmp_path / "hub-cache", repo, "d" * 40, {file.name: file})
    for name in (repo, f"{repo}/{file.name}"):
        model = ELF.from_pretrained(name, encoder=GOLDEN / "t5_encoder_tiny.pkl", tokenizer=t5_tokenizer_dir)
        assert_same_weights(model.state_dict(), port_params_to_state_dict(pd_weights("teacher")))
        assert model.config.max_length == 1024 and model.pretrained.source["format"] == "torch-port"
        s = model.pretrained.sample
        assert (s.method, s.steps, s.gamma, s.w) == ("sde", 1, 1.5, 2.5)
    assert model.pretrained.encoder.weights.endswith("t5_encoder_tiny.pkl")
    assert ELF.from_pretrained(repo, raw=True, encoder=False).state_dict().keys() == model.state_dict().keys()
    rows = generate(
        model, model.encoder, sampler_preset("fewstep", 4, model.pretrained.sample), num_samples=2, length=12
    )
    assert [(r["steps"], r["gamma"], r["w"], len(r["ids"])) for r in rows] == [(4, 1.5, 2.5, 12)] * 2


def test_encoder_pickle_from_the_hub_cache(golden_dir, t5_tokenizer_dir, port_folder, tmp_path):
    _hub_snapshot(tmp_path / "hub-cache", "someone/encoder", "c" * 40, {"enc.pkl": GOLDEN / "t5_encoder_tiny.pkl"})
    enc = ELF.from_pretrained(port_folder, encoder="someone/encoder/enc.pkl", tokenizer=t5_tokenizer_dir).encoder
    g = load_npz("t5_encoder.npz")
    assert_close(enc.hidden(T(g, "uncond/input_ids")), g["no_mask/hidden"], 1e-5, "hidden")  # no mask at all
    with pytest.raises(hub.HubError, match="someone/encoder:other.pkl.*HF_HUB_OFFLINE"):
        ELF.from_pretrained(port_folder, encoder="someone/encoder/other.pkl", tokenizer=t5_tokenizer_dir)


def test_no_network_error_explains_what_to_do(tmp_path):
    with pytest.raises(OSError) as e:
        ELF.from_pretrained("embedded-language-flows/ELF-B-owt", encoder=False)
    assert isinstance(e.value, hub.HubError)
    msg = str(e.value)
    for part in ("embedded-language-flows/ELF-B-owt", "HF_HUB_OFFLINE", str(tmp_path / "hub-cache"), "local path"):
        assert part in msg
    with pytest.raises(hub.HubError, match="(?s)cannot get the tokenizer 'org/no-such-tokenizer'.*HF_HUB_OFFLINE=1"):
        from transformers import AutoTokenizer

        hub.load_hf(AutoTokenizer.from_pretrained, "org/no-such-tokenizer", "tokenizer")


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_every_kind_of_hub_id_fails_at_once(how, monkeypatch):
    """Checkpoint, encoder pickle, tokenizer, encoder, judge and dataset ids: a HubError naming
    HF_HUB_OFFLINE and the local alternatives, from the cache only (no retries)."""
    from elflm import evaluate
    from elflm.data.readers import load_hf_dataset
    from elflm.encoder import TextEncoder, load_tokenizer

    if how == "unreachable endpoint":
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
        assert "cannot be reached" in hub.unavailable()
    else:
        assert hub.unavailable() == "offline mode is on (HF_HUB_OFFLINE=1)"
    calls = {
        "checkpoint": lambda: ELF.from_pretrained("embedded-language-flows/ELF-B-owt", encoder=False),
        "checkpoint file": lambda: ELF.from_pretrained("Ugness/elf-torch/checkpoints/x.ckpt", encoder=False),
        "encoder pickle": lambda: hub.resolve_file("org/enc/t5.pkl", "encoder pickle"),
        "tokenizer": lambda: load_tokenizer("t5-small"),
        "encoder": lambda: TextEncoder.from_pretrained("org/encoder"),
        "judge": lambda: evaluate.load_judge("gpt2-large"),
    }
    if importlib.util.find_spec("datasets"):
        calls["dataset"] = lambda: load_hf_dataset("embedded-language-flows/openwebtext-t5")
    for kind, call in calls.items():
        with pytest.raises(hub.HubError) as e:
            call()
        msg = str(e.value)
        assert "HF_HUB_OFFLINE" in msg and "local path" in msg, (kind, msg)
        assert ("offline mode is on" if how == "HF_HUB_OFFLINE" else "cannot be reached") in msg, (kind, msg)
