"""``train.cache_latents``: training with the latent cache is bit-identical to training without it
(unconditional and conditional rows with label drop, several epochs); the disk cache is reused by a
later run, keyed on the encoder weights, the data files and the batch shape, and refuses a damaged
part with the fix. Real tiny T5 encoder, real prepared data, real training runs."""

import pytest
import torch

from elflm.data import PackedDataset
from elflm.encoder import TextEncoder
from elflm.errors import DataError
from elflm.latents import LatentCache, cache_key
from elflm.train import train

from train_fixtures import final_weights, make_corpus, make_pairs, make_tiny_t5, tiny_run_config


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    base = tmp_path_factory.mktemp("latents")
    enc = make_tiny_t5(base / "enc", t5_tokenizer_dir)
    data = make_corpus(base / "corpus", assets_dir, t5_tokenizer_dir, chars=2_000)  # a few batches: epochs
    pairs = make_pairs(base / "pairs", assets_dir, t5_tokenizer_dir, 0, 16)
    return {"enc": enc, "data": data, "pairs": pairs, "tok": t5_tokenizer_dir}


def _run(env, out, data, **over):
    cfg = tiny_run_config(out, data, env["enc"], {"train.max_steps": 12, "train.global_batch_size": 4, **over})
    return train(cfg, progress=False)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("conditional", [False, True])
def test_cached_training_is_bit_identical(env, tmp_path, conditional):
    """12 steps over a few epochs: the cached run serves later epochs from the cache and ends with
    exactly the weights of the uncached run."""
    data = env["pairs"] if conditional else env["data"]
    over = (
        {"data.max_input_length": 16, "data.pad_token": "eos", "objective.label_drop_prob": 0.5} if conditional else {}
    )
    if conditional:
        over["objective.decoder_noise_scale"] = 1.0
    plain = _run(env, tmp_path / "plain", data, **over)
    cached = _run(env, tmp_path / "cached", data, **over, **{"train.cache_latents": "memory"})
    assert plain.plan.steps_per_epoch * 2 < 12  # several epochs
    cache = cached.latent_cache
    assert cache.hits > 0 and cache.misses + cache.hits == 12
    if conditional:  # both encodings of a condition row are kept apart: with and without its label
        assert {v for _, v in cache.entries} == {1, 2}
    assert _same(final_weights(tmp_path / "plain"), final_weights(tmp_path / "cached"))


def test_disk_cache_is_reused_and_keyed(env, tmp_path, t5_tokenizer_dir, assets_dir):
    store = tmp_path / "store"
    over = {"train.cache_latents": "disk", "train.latent_cache_dir": str(store)}
    first = _run(env, tmp_path / "a", env["data"], **over)
    parts = list(store.glob("*.safetensors"))
    assert len(parts) == 1 and parts[0].name.startswith(first.latent_cache.key)
    second = _run(env, tmp_path / "b", env["data"], **over)
    assert second.latent_cache.misses == 0 and second.latent_cache.hits == 12  # nothing encoded again
    assert not list((tmp_path / "store").glob("*.tmp*")) and len(list(store.glob("*.safetensors"))) == 1
    assert _same(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))

    # another encoder (one weight changed), other data, another batch shape: other keys
    enc = TextEncoder.from_pretrained(env["enc"])
    ds = PackedDataset(env["data"])
    key = cache_key(enc, ds, (4, 32), torch.device("cpu"))
    assert key == first.latent_cache.key
    assert cache_key(enc, ds, (8, 32), torch.device("cpu")) != key
    other = make_corpus(tmp_path / "other", assets_dir, t5_tokenizer_dir, chars=2_001)
    assert cache_key(enc, PackedDataset(other), (4, 32), torch.device("cpu")) != key
    with torch.no_grad():
        next(enc.model.parameters()).view(-1)[0] += 1e-6
    assert cache_key(enc, ds, (4, 32), torch.device("cpu")) != key


def test_damaged_part_is_refused_with_the_fix(env, tmp_path):
    enc, ds = TextEncoder.from_pretrained(env["enc"]), PackedDataset(env["data"])
    key = cache_key(enc, ds, (4, 32), torch.device("cpu"))
    (tmp_path / f"{key}.1-2.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=r"not a readable latent cache part.*delete .*1-2.safetensors"):
        LatentCache(enc, ds, "disk", (4, 32), tmp_path)
    from safetensors.torch import save_file

    save_file({"hidden": torch.zeros(1, 32, 5), "slots": torch.zeros(1, 2, dtype=torch.int64)}, tmp_path / "x")
    (tmp_path / "x").replace(tmp_path / f"{key}.1-2.safetensors")
    with pytest.raises(DataError, match=r"expected 'hidden' \(K, 32, 32\) float32"):
        LatentCache(enc, ds, "disk", (4, 32), tmp_path)
    with pytest.raises(ValueError, match="train.cache_latents: expected 'memory' or 'disk', got 'yes'"):
        LatentCache(enc, ds, "yes", (4, 32), tmp_path)
