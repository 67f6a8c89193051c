"""The training loop's per-step work: the DataLoader (the same batches with 0 or 2 workers), masks
built on the device and the (B, L, L) encoder mask only for rows with a condition, statistics
reduced and read only at ``log_every``, activation checkpointing equal to none, and FSDP2's bf16
mixed-precision policy. Real encoder, data, torch.distributed (gloo under torchrun)."""

import json

import pytest
import torch

from elflm.config import ObjectiveConfig, model_preset
from elflm.data import batch_from_rows, build_rows, collate_rows, device_batch, encoder_mask, prepare
from elflm.model import ELF
from elflm.objective import draw, loss_from_latents
from elflm.train import STATS, Trainer, train

from conftest import read_gzip_text
from train_fixtures import ROOT, cli, final_weights, make_corpus, make_tiny_t5, max_diff, tiny_run_config


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    base = tmp_path_factory.mktemp("loop")
    return {
        "enc": make_tiny_t5(base / "enc", t5_tokenizer_dir),
        "data": make_corpus(base, assets_dir, t5_tokenizer_dir),
    }


@pytest.fixture(scope="module")
def conditional_data(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    """Source/target pairs of Gutenberg lines, prepared as conditional rows (16 + 16 tokens)."""
    base = tmp_path_factory.mktemp("cond")
    lines = [line for line in read_gzip_text(assets_dir / "text/gutenberg/val-00.txt.gz").splitlines() if line.strip()]
    pairs = [{"source": a, "target": b} for a, b in zip(lines[0:400:2], lines[1:400:2])]
    (base / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    prepare(
        base / "pairs.jsonl",
        base / "data",
        tokenizer=str(t5_tokenizer_dir),
        max_length=32,
        max_input_length=16,
        workers=1,
        progress=False,
    )
    return base / "data"


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- batches


def test_zero_or_two_loader_workers_train_bit_identically(env, tmp_path):
    over = {"train.max_steps": 4, "train.batch_size": 4}
    runs = {}
    for workers in (0, 2):
        cfg = tiny_run_config(tmp_path / f"w{workers}", env["data"], env["enc"], {**over, "data.num_workers": workers})
        runs[workers] = train(cfg, progress=False)
        assert runs[workers].loader(0).num_workers == workers
    a, b = final_weights(tmp_path / "w0"), final_weights(tmp_path / "w2")
    assert all(torch.equal(a[k], b[k]) for k in a), max_diff(a, b)
    assert [r["loss"] for r in metrics(tmp_path / "w0")] == [r["loss"] for r in metrics(tmp_path / "w2")]


def test_loader_yields_the_plan_rows_in_order_from_any_step(env, tmp_path):
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], {"train.batch_size": 4, "data.num_workers": 2})
    t = Trainer(cfg)
    n, seed = len(t.dataset), cfg.train.seed
    batches = iter(t.loader(3))
    for step in (3, 4):
        for j in range(t.plan.accum):
            host = next(batches)
            assert set(host) == {"input_ids", "lengths"}  # no mask leaves the workers
            rows = t.plan.indices(n, seed, step, j)
            want = collate_rows([t.dataset[int(i)] for i in rows])
            assert torch.equal(host["input_ids"], want["input_ids"]) and torch.equal(host["lengths"], want["lengths"])


def test_masks_are_built_on_the_device_and_the_pair_mask_only_for_conditional_rows():
    rows, lengths = build_rows([[5, 6, 7], [8, 9]], 6, 1)
    host = {"input_ids": torch.as_tensor(rows), "lengths": torch.as_tensor(lengths, dtype=torch.int64)}
    plain = device_batch(host, "cpu")
    assert set(plain) == {"input_ids", "attention_mask", "cond_seq_mask"}
    assert encoder_mask(plain, torch.tensor([True, False])) is plain["attention_mask"]
    ref = batch_from_rows(rows, lengths)
    for k in plain:
        assert torch.equal(plain[k], ref[k]), k
    rows, lengths = build_rows([[5, 6], [7, 8]], 6, 1, conditions=[[2, 3], [4]])
    cond = device_batch({"input_ids": torch.as_tensor(rows), "lengths": torch.as_tensor(lengths)}, "cpu")
    ref = batch_from_rows(rows, lengths)
    assert set(cond) == set(ref) and all(torch.equal(cond[k], ref[k]) for k in ref)
    drop = torch.tensor([True, False])
    assert torch.equal(encoder_mask(cond, drop), encoder_mask(ref, drop))


def encoder_mask_shapes(trainer: Trainer, steps: int) -> list[tuple]:
    """The attention masks the frozen encoder received during ``steps`` training steps."""
    seen = []
    hook = trainer.encoder.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(tuple(kwargs["attention_mask"].shape)), with_kwargs=True
    )
    try:
        for _ in range(steps):
            trainer.train_step()
    finally:
        hook.remove()
    return seen


def test_trainer_encodes_unconditional_rows_with_the_padding_mask(env, tmp_path):
    t = Trainer(tiny_run_config(tmp_path / "run", env["data"], env["enc"], {"train.batch_size": 4}))
    B = t.plan.micro
    assert encoder_mask_shapes(t, 2) == [(B, 1, 1, 32)] * (2 * t.plan.accum)  # (B, L) mask, broadcast


def test_trainer_builds_the_pair_mask_for_conditional_rows(env, conditional_data, tmp_path):
    over = {
        "data.max_length": 32,
        "data.max_input_length": 16,
        "data.pad_token": "eos",
        "objective.label_drop_prob": 0.5,
        "train.batch_size": 4,
    }
    t = Trainer(tiny_run_config(tmp_path / "run", conditional_data, env["enc"], over))
    assert encoder_mask_shapes(t, 2) == [(4, 1, 32, 32)] * (2 * t.plan.accum)


# ----------------------------------------------------------------------------- statistics


def test_train_step_returns_device_tensors(env, tmp_path):
    t = Trainer(tiny_run_config(tmp_path / "run", env["data"], env["enc"]))
    stats = t.train_step()
    assert all(torch.is_tensor(stats[k]) and stats[k].dim() == 0 and stats[k].dtype == torch.float64 for k in STATS)
    assert isinstance(stats["lr"], float)
    window = [stats, t.train_step()]
    expected = {k: (float(window[0][k]) + float(window[1][k])) / 2 for k in STATS}
    assert t.reduce_stats(window) == pytest.approx(expected, rel=1e-12)


COUNTER = r"""
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from pathlib import Path
from train_fixtures import tiny_run_config
from elflm.train import train

calls = []
plain = dist.all_reduce
def counted(*args, **kwargs):
    calls.append(1)
    return plain(*args, **kwargs)
dist.all_reduce = counted

dtypes = []
cfg = tiny_run_config(Path({out!r}), Path({data!r}), Path({enc!r}), json.loads({over!r}))
if cfg.train.distributed == "fsdp":  # the dtype of the block weights the forward computes with
    import elflm.model as m
    forward = m.Block.forward
    def recording(self, x, rope, mask=None):
        dtypes.append(str(self.attn.qkv.weight.dtype))
        return forward(self, x, rope, mask)
    m.Block.forward = recording
train(cfg, progress=False)
probe = {{"all_reduce": len(calls), "dtypes": sorted(set(dtypes))}}
Path({out!r}, f"probe-{{os.environ['RANK']}}.json").write_text(json.dumps(probe))
"""


def run_probe(tmp_path, env, name: str, over: dict) -> list[dict]:
    script = tmp_path / f"{name}.py"
    out = tmp_path / name
    script.write_text(
        COUNTER.format(
            tests=str(ROOT / "tests"), out=str(out), data=str(env["data"]), enc=str(env["enc"]), over=json.dumps(over)
        )
    )
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script))
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"probe-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_statistics_are_reduced_only_when_logging(env, tmp_path):
    """DDP, 5 steps, log_every 2: one all-reduce per log (steps 2, 4, 5), each the mean of its
    window, equal to the per-step losses of one process."""
    over = {"train.max_steps": 5, "train.batch_size": 4, "train.log_every": 2, "train.distributed": "ddp"}
    probes = run_probe(tmp_path, env, "ddp", over)
    assert [p["all_reduce"] for p in probes] == [3, 3]
    recs = metrics(tmp_path / "ddp")
    assert [r["step"] for r in recs] == [2, 4, 5]
    one = tiny_run_config(tmp_path / "one", env["data"], env["enc"], {**over, "train.log_every": 1})
    train(one, progress=False)
    per_step = [r["loss"] for r in metrics(tmp_path / "one")]
    windows = [per_step[0:2], per_step[2:4], per_step[4:5]]
    assert [r["loss"] for r in recs] == pytest.approx([sum(w) / len(w) for w in windows], rel=1e-5)


@pytest.mark.slow
def test_fsdp_bf16_policy_with_activation_checkpointing(env, tmp_path):
    """FSDP2 + bf16 + activation checkpointing on 2 processes: the blocks compute with bf16
    weights, the checkpoint keeps float32 masters, and the run follows one bf16 process."""
    over = {
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.precision": "bf16",
        "train.branch": "per_step",
        "train.activation_checkpointing": True,
    }
    probes = run_probe(tmp_path, env, "fsdp", {**over, "train.distributed": "fsdp"})
    assert all(p["dtypes"] == ["torch.bfloat16"] for p in probes)
    train(tiny_run_config(tmp_path / "one", env["data"], env["enc"], over), progress=False)
    a, b = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one")
    assert all(v.dtype == torch.float32 for v in a.values())
    assert max_diff(a, b) < 2e-2  # bf16 rounding of the blocks' norm weights differs
    losses = [r["loss"] for r in metrics(tmp_path / "fsdp")]
    assert losses == pytest.approx([r["loss"] for r in metrics(tmp_path / "one")], rel=1e-2)


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("decode", [False, True], ids=["denoise", "decode"])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(decode):
    """Recomputed blocks (dropout on: the RNG state is replayed) give bit-identical losses and
    gradients, and keep fewer tensors for backward."""
    cfg = model_preset("tiny", encoder_dim=32, vocab_size=500, max_length=16, depth=4, dropout=0.2)
    ocfg = ObjectiveConfig()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 32, generator=g)
    rows, lengths = build_rows([[5, 6, 7] * 5, [8, 9]], 16, 1)
    batch = batch_from_rows(rows, lengths)
    batch = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in batch.items()}
    out = {}
    for on in (False, True):
        torch.manual_seed(0)
        model = ELF(cfg).train().set_activation_checkpointing(on)
        d = draw(ocfg, 4, 16, 32, generator=torch.Generator().manual_seed(1))
        d.decode = decode
        saved: list[int] = []
        keep = lambda t, saved=saved: saved.append(t.numel()) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            torch.manual_seed(2)
            loss = loss_from_latents(model, x0, batch, ocfg, d).loss
        loss.backward()
        out[on] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, sum(saved))
    (l0, g0, kept0), (l1, g1, kept1) = out[False], out[True]
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert kept1 < kept0


def test_activation_checkpointing_in_training_is_bit_identical(env, tmp_path):
    over = {"train.max_steps": 3, "model.dropout": 0.1, "model.depth": 4}
    train(tiny_run_config(tmp_path / "off", env["data"], env["enc"], over), progress=False)
    on = {**over, "train.activation_checkpointing": True}
    trainer = train(tiny_run_config(tmp_path / "on", env["data"], env["enc"], on), progress=False)
    assert trainer.net.activation_checkpointing
    a, b = final_weights(tmp_path / "off"), final_weights(tmp_path / "on")
    assert all(torch.equal(a[k], b[k]) for k in a), max_diff(a, b)


def test_fsdp_without_torchrun_is_a_clear_error(env, tmp_path):
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], {"train.distributed": "fsdp"})
    with pytest.raises(ValueError, match="needs a process group: launch with torchrun"):
        Trainer(cfg)
