"""The training planner: its memory estimate against the measured peak of real CPU training
steps, the per-GPU rules, the largest micro-batch, FLOPs and the ``elflm plan`` command.

How the peak of a real step is measured: glibc's ``mallinfo2()`` gives the bytes the C heap holds
in use (``uordblks``, plus ``hblkhd`` for blocks served by mmap); torch's CPU allocator takes every
tensor from that heap. A dispatch mode reads it after every op of one training step of a real
:class:`~elflm.train.Trainer` (real encoder, data, model, Muon, EMA; the second step, so the
optimizer state exists); the peak less the reading before the step is the step's own memory
(tensors and whatever else the step allocates). The persistent state alive across steps (weights,
EMA, optimizer state, encoder) is added as the bytes of those real tensors. Temporaries that live
inside a single kernel are seen by neither side."""

import ctypes
import ctypes.util
import gc
import json

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from elflm.cli import main
from elflm.config import load_config
from elflm.encoder import build_encoder
from elflm.plan import GiB, Tracer, format_plan, nbytes, parse_memory, per_gpu, plan, step_flops_per_token
from elflm.train import Trainer

from conftest import skip_unless
from train_fixtures import make_corpus, make_tiny_t5, tiny_run_config, write_config

SMALL = {"model.hidden_size": 128, "model.depth": 4, "train.global_batch_size": 16, "data.max_length": 64}


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    base = tmp_path_factory.mktemp("plan")
    data = make_corpus(base, assets_dir, t5_tokenizer_dir, max_length=64)
    return {"enc": make_tiny_t5(base / "enc", t5_tokenizer_dir), "data": data}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_in_use():
    """A function returning the C heap's bytes in use, or None without glibc's mallinfo2."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return lambda: libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd


class HeapPeak(TorchDispatchMode):
    def __init__(self, in_use):
        super().__init__()
        self.in_use = in_use
        self.peak = in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def measured_peak(cfg, in_use) -> tuple[int, int]:
    """(peak bytes of one real training step with the persistent state, the step's own part)."""
    t = Trainer(cfg)
    t.train_step()  # the optimizer state now exists
    gc.collect()
    states = [*t.net.parameters(), *t.ema.state_dict().values(), *t.encoder.parameters(), *t.encoder.buffers()]
    states += [v for s in t.optimizer.state.values() for v in s.values()]
    before = in_use()
    with HeapPeak(in_use) as heap:
        t.train_step()
    return nbytes(states) + heap.peak - before, heap.peak - before


@pytest.mark.parametrize("ac", [False, True], ids=["ac-off", "ac-on"])
@pytest.mark.parametrize("branch", ["denoise", "decode"])
def test_memory_estimate_matches_measured_cpu_steps(env, tmp_path, branch, ac):
    in_use = heap_in_use()
    skip_unless(in_use is not None, "needs glibc's mallinfo2 to measure the heap")
    over = {**SMALL, "objective.decoder_prob": float(branch == "decode"), "train.activation_checkpointing": ac}
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], over)
    total, own = measured_peak(cfg, in_use)
    tracer = Tracer(cfg, build_encoder(cfg.encoder), device="cpu")
    est = tracer.step(16, branch == "decode", ac)
    s = tracer.states
    assert est.peak == pytest.approx(total, rel=0.15), (est, total)
    assert est.peak - (s.params + s.optimizer + s.ema + s.encoder) == pytest.approx(own, rel=0.15)
    assert est.activations > 0 and est.optimizer_temporaries > 0


def test_activation_checkpointing_and_batch_size_move_the_estimate(env, tmp_path):
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], SMALL)
    tracer = Tracer(cfg, build_encoder(cfg.encoder))
    for decode in (False, True):
        plain, ckpt = tracer.step(32, decode, False), tracer.step(32, decode, True)
        assert ckpt.activations < plain.activations
        grow = tracer.step(64, decode, False).activations - plain.activations
        assert grow > 0
        if not decode:  # (the decode loss's chunks have a fixed size: less than linear there)
            assert 0.8 * plain.activations < grow < 1.2 * plain.activations
    s = tracer.states
    assert s.params == s.grads == s.ema == 4 * s.num_params
    assert s.num_params == sum(p.numel() for p in tracer.model.parameters())
    step = tracer.step(32, True, False)
    ddp = per_gpu(s, step, "ddp", 8, "fp32")
    assert (
        per_gpu(s, step, "ddp", 2, "fp32")
        == ddp
        == s.params + s.grads + s.optimizer + s.ema + s.encoder + max(step.activations, step.optimizer_temporaries)
    )
    fsdp = [per_gpu(s, step, "fsdp", n, "fp32") for n in (2, 4, 8)]
    assert fsdp[0] > fsdp[1] > fsdp[2] and per_gpu(s, step, "fsdp", 8, "bf16") < fsdp[2]
    with pytest.raises(ValueError, match="unknown strategy 'zero'"):
        per_gpu(s, step, "zero", 8, "fp32")


def test_plan_suggests_the_largest_micro_batch_that_fits(env, tmp_path):
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], SMALL)
    encoder = build_encoder(cfg.encoder)
    r = plan(cfg, encoder, gpus=1, gpu="A100", gpu_memory=GiB // 4, micro_batch=8, headroom=0.2)
    tracer = Tracer(cfg, encoder)
    assert r.usable == int(0.8 * GiB / 4) and r.micro_batch == 8 and set(r.memory) == {"none"}
    for ac in (False, True):
        b = r.largest_micro_batch["none"]["ac_on" if ac else "ac_off"]
        peaks = [max(tracer.step(n, d, ac).peak for d in (False, True)) for n in (b, b + 1)]
        assert b >= 1 and peaks[0] <= r.usable < peaks[1], (ac, b, peaks)
    assert r.largest_micro_batch["none"]["ac_on"] > r.largest_micro_batch["none"]["ac_off"]
    assert r.memory["none"]["ac_off"]["decode"] == tracer.step(8, True, False).peak
    flops = step_flops_per_token(tracer.model_config, 64, cfg.objective.decoder_prob)
    assert r.flops_per_token["training_step"] == flops
    assert r.throughput["40%"]["total"] == pytest.approx(0.4 * 156e12 / flops)  # A100, TF32
    text = format_plan(r)
    assert "largest micro-batch" in text and "none" in text
    json.dumps(r.to_dict())


def test_parse_memory_and_plan_errors(env, tmp_path):
    assert parse_memory("80GB") == parse_memory("80 GiB") == parse_memory("80") == 80 * GiB
    assert parse_memory("40960MB") == 40 * GiB and parse_memory("1.5TB") == int(1.5 * 2**40)
    for bad in ("", "eighty", "-3GB", "0GB", "80PB"):
        with pytest.raises(ValueError, match="GPU memory"):
            parse_memory(bad)
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], SMALL)
    enc = build_encoder(cfg.encoder)
    with pytest.raises(ValueError, match="unknown GPU"):
        plan(cfg, enc, gpu="TPU")
    with pytest.raises(ValueError, match="gpus=0"):
        plan(cfg, enc, gpus=0)
    with pytest.raises(ValueError, match="headroom"):
        plan(cfg, enc, headroom=1.5)


def test_cli_plan(env, tmp_path, capsys):
    cfg = tiny_run_config(tmp_path / "run", env["data"], env["enc"], SMALL)
    path = write_config(cfg, tmp_path / "c.yaml")
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", str(path), "train.precision=bf16", "--gpus", "4", "--gpu-memory", "2GB"]
    assert main([*argv, "--micro-batch", "4", "--no-suggest", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memory per GPU" in printed and "4 × H100" in printed
    report = json.loads(out.read_text())
    assert report["gpus"] == 4 and report["micro_batch"] == 4 and report["model"]["precision"] == "bf16"
    assert set(report["memory"]) == {"ddp", "fsdp"} and report["largest_micro_batch"] == {}
    with pytest.raises(SystemExit):
        main(["plan", "--config", str(path), "--gpu-memory", "lots"])
    assert "expected a size such as 80GB" in capsys.readouterr().err
    assert main(["plan", "--config", str(path), "--gpu", "TPU", "--no-suggest"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
    assert main(["plan", "--config", str(path), "--json", str(tmp_path / "nope" / "p.json")]) == 2
    assert "--json" in capsys.readouterr().err


@pytest.mark.slow
def test_bundled_elf_b_config_plans_without_weights(tmp_path):
    """ELF-B at 1024 tokens, bf16: the encoder's architecture is all the planner needs."""
    from transformers import T5Config, T5EncoderModel

    from elflm.encoder import TextEncoder

    cfg = load_config("elf-b-owt", ["train.precision=bf16"])
    r = plan(cfg, TextEncoder(T5EncoderModel(T5Config())), gpus=8, micro_batch=32, suggest=False)
    assert 100e6 < r.states.num_params < 110e6 and r.model["length"] == 1024
    ddp, fsdp = r.memory["ddp"], r.memory["fsdp"]
    assert fsdp["ac_off"]["decode"] < ddp["ac_off"]["decode"] < 80 * GiB
    assert ddp["ac_on"]["denoise"] < ddp["ac_off"]["denoise"] / 2
