"""Reliability of every command (docs/reliability.md): the real writers (model folders, prepared
data, training checkpoints) killed at random moments leave the complete old or new output;
SIGINT / SIGTERM end train, prepare, sample, sweep and serve with one line, exit status 128 + the
signal and no worker left; a file-size limit is a one-line error that keeps the previous output; a
second writer of one output is refused; a damaged latest checkpoint makes --resume fall back to
the newest valid one; paths are kept as given. Signals are sent to this process (the commands run
in-process through ``elflm.cli.main``), kills go to forked children: no interpreter start-up per case."""

import json
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from test_files import dead_pid, forked, kill_at_random

from elflm import files
from elflm.checkpoint import CheckpointError, TrainingCheckpoint
from elflm.cli import main
from elflm.config import load_config
from elflm.data import PackedDataset, prepare
from elflm.model import ELF

from conftest import need_module, read_gzip_text
from tiny_model import make_tiny_model
from train_fixtures import ROOT, SAME_THREADS, make_corpus, make_tiny_judge, make_tiny_t5, tiny_run_config, write_config


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    base = tmp_path_factory.mktemp("reliability")
    enc = make_tiny_t5(base / "enc", t5_tokenizer_dir)
    corpus = base / "corpus.txt"
    corpus.write_text(read_gzip_text(assets_dir / "text/gutenberg/val-00.txt.gz")[:40_000], encoding="utf-8")
    return {
        "base": base,
        "enc": enc,
        "data": make_corpus(base / "corpus", assets_dir, t5_tokenizer_dir),
        "corpus": corpus,
        "model": make_tiny_model(base / "model", t5_tokenizer_dir, max_length=16),
        "tok": t5_tokenizer_dir,
    }


# ----------------------------------------------------------------------------- kills during real writers


def test_model_folder_writes_survive_kills(env, tmp_path):
    """save_pretrained (what convert writes) of two models of different depth, alternately, killed
    at random: the folder always loads, with the config and weights of one of them."""
    base = ELF.from_pretrained(env["model"])
    deep = ELF(base.config.__class__(**{**vars(base.config), "depth": 3}))
    target = tmp_path / "m"
    base.save_pretrained(target)
    want = {2: base.state_dict(), 3: deep.state_dict()}

    def write_forever():
        while True:
            for m in (deep, base):
                m.save_pretrained(target, settings=base.pretrained, encoder=base.encoder, overwrite=True)

    def check():
        got = ELF.from_pretrained(target, encoder=False)
        ref = want[got.config.depth]
        assert all(torch.equal(v, ref[k]) for k, v in got.state_dict().items())

    kill_at_random(write_forever, check, times=8, window=0.8, seed=2)


def test_prepared_data_survive_kills(env, tmp_path):
    """prepare into one folder with two row lengths, alternately, killed at random (tokenising,
    packing, replacing): the folder always holds one of the two complete datasets."""
    out = tmp_path / "data"
    kw = dict(tokenizer=str(env["tok"]), workers=1, progress=False, chunk_size=8000)
    want = {}
    for L in (16, 32):
        meta = prepare(env["corpus"], tmp_path / f"ref{L}", max_length=L, **kw)
        want[L] = (meta["rows"], np.asarray(PackedDataset(tmp_path / f"ref{L}")[meta["rows"] - 1]["input_ids"]))
    prepare(env["corpus"], out, max_length=16, **kw)

    def write_forever():
        while True:
            for L in (32, 16):
                prepare(env["corpus"], out, max_length=L, overwrite=True, **kw)

    def check():
        ds = PackedDataset(out)
        rows, last = want[ds.max_length]
        assert len(ds) == rows and np.array_equal(np.asarray(ds[rows - 1]["input_ids"]), last)

    kill_at_random(write_forever, check, times=6, window=1.2, seed=3)


def test_training_checkpoints_survive_kills(tmp_path):
    """Checkpoints written one after the other (keep_last=2), killed at random: the run always
    resumes from a checkpoint that verifies and holds its own step's tensors."""
    run = tmp_path / "run"

    def content(step):
        raw = {"w": torch.full((512, 512), float(step))}
        return dict(raw=raw, ema=raw, optimizer={"state": {}, "param_groups": []}, state={"step": step})

    from elflm.config import Config

    TrainingCheckpoint.write(run, 1, config=Config(), keep_last=2, **content(1))

    def write_forever():
        for step in range(2, 10_000):
            TrainingCheckpoint.write(run, step, config=Config(), keep_last=2, **content(step))

    def check():
        ckpt = TrainingCheckpoint.resumable(run, report=lambda m: pytest.fail(m))
        assert torch.equal(ckpt.raw()["w"], torch.full((512, 512), float(ckpt.state()["step"])))

    kill_at_random(write_forever, check, times=8, window=0.6, seed=4)


# ----------------------------------------------------------------------------- signals


class Signaller:
    """Sends ``signum`` to this process from a thread once ``ready()`` holds while an elflm command
    runs (its handler installed, not ``outside``), after ``delay`` s; on exit the thread is joined,
    so that no signal is sent after the block."""

    def __init__(self, signum: int, ready=lambda: True, delay: float = 0.0, outside=None):
        self.signum, self.ready, self.delay, self.outside = signum, ready, delay, outside
        self.done, self.sent = threading.Event(), False

    def _installed(self) -> bool:
        return signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None, self.outside)

    def _run(self):
        while not self.done.wait(0.02):
            if self._installed() and self.ready():
                self.done.wait(self.delay)
                if self._installed():
                    os.kill(os.getpid(), self.signum)
                    self.sent = True
                return

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def interrupted(argv, signum, ready=lambda: True, delay=0.0) -> int:
    """Run ``elflm argv`` in this process and interrupt it; returns the exit status. A signal that
    lands after the command's own handler is gone is caught here (and fails the test) rather than
    reaching pytest."""
    late = []

    def catch(n, frame):
        late.append(n)

    outer = {s: signal.signal(s, catch) for s in (signal.SIGINT, signal.SIGTERM)}
    code = None
    try:
        with Signaller(signum, ready, delay, outside=catch) as sender:
            try:
                main(argv)
            except SystemExit as e:
                code = e.code
            except KeyboardInterrupt:  # the signal landed as the command was returning
                late.append(signum)
        time.sleep(0.05)  # a signal sent just before the join is handled while ``catch`` is installed
    finally:
        for s, handler in outer.items():
            signal.signal(s, handler)
    assert sender.sent and not late, f"the signal reached elflm {argv[0]} after it had finished (exit {code})"
    return code


def no_workers_left() -> bool:
    return not multiprocessing.active_children()


def test_sigterm_ends_training_with_the_last_checkpoint(env, tmp_path, capsys):
    over = {"train.max_steps": 10_000, "train.save_every": 2, "train.log_every": 1000, "data.num_workers": 2}
    cfg = write_config(tiny_run_config(tmp_path / "run", env["data"], env["enc"], over), tmp_path / "c.yaml")
    ready = lambda: TrainingCheckpoint.latest(tmp_path / "run") is not None  # noqa: E731
    code = interrupted(["train", "--config", str(cfg), "--no-progress"], signal.SIGTERM, ready)
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("elflm train: interrupted (SIGTERM); the last checkpoint is ")
    assert line.endswith(f"continue with: elflm train --config {cfg} --resume")
    last = TrainingCheckpoint.latest(tmp_path / "run")
    assert str(last.path) in line and last.damage() is None
    assert no_workers_left() and not files.lock_path(tmp_path / "run").exists()


def test_sigint_ends_prepare_and_rerunning_resumes(env, tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["prepare", str(env["corpus"]), "-o", str(out), "--tokenizer", str(env["tok"]), "--max-length", "32"]
    argv += ["--workers", "2", "--chunk-size", "2000", "--no-progress"]
    ready = lambda: len(list((out / ".prepare-work").glob("chunk-*.npz"))) >= 2  # noqa: E731
    assert interrupted(argv, signal.SIGINT, ready) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err.strip() == (
        f"elflm prepare: interrupted (SIGINT); the tokenised chunks are kept in {out / '.prepare-work'}: the same "
        f"command resumes; {out} holds the earlier dataset (if any) until the new one is complete"
    )
    assert no_workers_left() and not (out / "meta.json").exists()
    assert main(argv) == 0
    ref = prepare(env["corpus"], tmp_path / "ref", tokenizer=str(env["tok"]), max_length=32, progress=False)
    assert json.loads((out / "meta.json").read_text())["rows"] == ref["rows"]
    assert (out / "ids-00000.bin").read_bytes() == (tmp_path / "ref/ids-00000.bin").read_bytes()


def test_sigint_ends_sample_and_writes_nothing(env, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    argv = ["sample", "--checkpoint", str(env["model"]), "--num-samples", "64", "--steps", "5000", "-o", str(out)]
    assert interrupted(argv, signal.SIGINT, delay=1.0) == 130
    err = capsys.readouterr().err
    assert err.rstrip().endswith(  # the last line (after a progress bar, when one was on screen)
        f"elflm sample: interrupted (SIGINT); nothing was written to {out} (samples are written once all are "
        "done): run the command again"
    )
    assert "Traceback" not in err and sorted(tmp_path.iterdir()) == []


def test_sigterm_ends_sweep_and_rerunning_resumes(env, tmp_path, capsys, assets_dir):
    judge = make_tiny_judge(tmp_path / "judge", assets_dir)
    out = tmp_path / "sweep"
    argv = ["sweep", "--checkpoint", str(env["model"]), "-o", str(out), "--num-samples", "4", "--steps", "1,4000"]
    argv += ["--judge", str(judge), "--no-plots"]
    ready = lambda: (out / "sweep.csv").is_file()  # noqa: E731
    assert interrupted(argv, signal.SIGTERM, ready) == 143
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"elflm sweep: interrupted (SIGTERM); the settings finished so far are kept in {out}: the same command "
        "resumes the sweep"
    )
    assert [p.name.split("-")[1] for p in (out / "samples").iterdir()] == ["steps1"]  # the finished setting
    assert main([*argv[:-4], "1", "--judge", str(judge), "--no-plots"]) == 0  # the finished setting is reused
    assert "(reused)" in capsys.readouterr().err


def test_sigint_ends_the_server(env):
    """The real ``elflm serve`` process (uvicorn configures logging process-wide, so it runs apart
    from pytest): SIGINT during a sampler call answers it 503 and ends with one line, status 130."""
    need_module("uvicorn", "pip install 'elflm[serve]'")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    def health():
        try:
            return json.loads(urllib.request.urlopen(f"{url}/health", timeout=1).read())
        except OSError:
            return None

    answers = []

    def slow_request():  # a sampler call in progress when the server is told to stop
        body = json.dumps({"steps": 100_000, "num_samples": 8}).encode()
        req = urllib.request.Request(f"{url}/generate", body, {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=120).read()
        except urllib.error.HTTPError as e:
            answers.append((e.code, json.loads(e.read())["detail"]))

    argv = ["serve", "--checkpoint", str(env["model"]), "--port", str(port), "--max-steps", "1000000"]
    run_env = {**SAME_THREADS, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "elflm.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=run_env,
    )
    try:
        deadline = time.time() + 120
        while health() is None:
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        request = threading.Thread(target=slow_request, daemon=True)
        request.start()
        time.sleep(2)  # the request reaches the batcher and its sampler call is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "elflm serve: interrupted (SIGINT); the server stopped"
    assert "Traceback" not in err
    request.join(10)
    assert answers == [(503, "the server is stopping")]  # the request in progress is answered


def test_workers_end_when_their_parent_is_killed(env, tmp_path):
    """prepare's tokenising processes die with a parent killed by SIGKILL (nothing can catch it)."""
    out = tmp_path / "data"
    pid = forked(
        lambda: prepare(env["corpus"], out, tokenizer=str(env["tok"]), workers=2, chunk_size=200, progress=False)
    )
    children = []
    deadline = time.time() + 60
    while time.time() < deadline and len(children) < 2:
        tasks = Path(f"/proc/{pid}/task")
        children = [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
        time.sleep(0.05)
    assert len(children) >= 2, "the workers never started"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{c}").exists() for c in children):
        time.sleep(0.05)
    assert not any(Path(f"/proc/{c}").exists() for c in children)


# ----------------------------------------------------------------------------- resource faults


def limited(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_file_size_limit_during_convert_is_one_line_and_keeps_the_model(env, tmp_path):
    target = tmp_path / "converted"
    assert main(["convert", str(env["model"]), "-o", str(target)]) == 0
    r = subprocess.run(
        [sys.executable, "-m", "elflm.cli", "convert", str(env["model"]), "-o", str(target), "--overwrite"],
        cwd=ROOT,
        env={**SAME_THREADS, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        preexec_fn=limited(20_000),
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"elflm convert: error: cannot write {target}: a file reached the file-size limit of 19.5 KiB (ulimit -f); "
        f"the output needs about {files.size_text(files_bytes(env['model']))}; raise the limit or write "
        f"elsewhere. {target} was left as it was"
    )
    ELF.from_pretrained(target)  # the previous conversion still loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]


def files_bytes(model_folder: Path) -> int:
    return sum(
        v.numel() * v.element_size() for v in ELF.from_pretrained(model_folder, encoder=False).state_dict().values()
    )


def test_file_size_limit_during_a_checkpoint_and_prepare_keeps_the_previous(env, tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    from elflm.config import Config

    raw = {"w": torch.zeros(64, 64)}
    TrainingCheckpoint.write(run, 1, raw=raw, ema=raw, optimizer={}, config=Config(), state={"step": 1}, keep_last=1)
    prepare(env["corpus"], data, tokenizer=str(env["tok"]), max_length=16, progress=False)
    report = tmp_path / "errors.json"

    def write_big():
        big = {"w": torch.zeros(512, 512)}
        errors = []
        for limit, write in (
            (
                200_000,
                lambda: TrainingCheckpoint.write(
                    run, 2, raw=big, ema=big, optimizer={}, config=Config(), state={"step": 2}, keep_last=1
                ),
            ),
            (
                8_000,
                lambda: prepare(
                    env["corpus"], data, tokenizer=str(env["tok"]), max_length=32, overwrite=True, progress=False
                ),
            ),
        ):
            limited(limit)()
            try:
                write()
            except files.NoSpaceError as e:
                errors.append(str(e))
        report.write_text(json.dumps(errors))

    os.waitpid(forked(write_big), 0)
    errors = json.loads(report.read_text())
    assert len(errors) == 2
    assert errors[0].startswith(f"cannot write {run / 'checkpoints/step_0000002'}: a file reached the file-size limit")
    assert "the output needs about 2.0 MiB" in errors[0]
    assert errors[1].startswith(f"cannot write {data / '.prepare-work'}/chunk-000000.npz: a file reached the file-size")
    assert errors[1].endswith(f"kept in {data / '.prepare-work'}, the same command resumes")
    assert TrainingCheckpoint.resumable(run).state()["step"] == 1
    assert PackedDataset(data).max_length == 16


# ----------------------------------------------------------------------------- concurrency


def test_a_second_writer_of_one_output_is_refused(env, tmp_path, capsys):
    held = tmp_path / "held"
    outputs = [tmp_path / "m", tmp_path / "run", tmp_path / "s.jsonl"]

    def hold():
        with files.locked(outputs[0]), files.locked(outputs[1]), files.locked(outputs[2]):
            held.touch()
            time.sleep(120)

    pid = forked(hold)
    try:
        while not held.exists():
            time.sleep(0.01)
        cfg = write_config(tiny_run_config(outputs[1], env["data"], env["enc"]), tmp_path / "c.yaml")
        for argv, target in (
            (["convert", str(env["model"]), "-o", str(outputs[0])], outputs[0]),
            (["train", "--config", str(cfg), "--no-progress"], outputs[1]),
            (["sample", "--checkpoint", str(env["model"]), "--num-samples", "1", "-o", str(outputs[2])], outputs[2]),
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith(f"elflm {argv[0]}: error: {target} is being written by another process (pid {pid} ")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert main(["convert", str(env["model"]), "-o", str(outputs[0])]) == 0  # the dead owner holds nothing


# ----------------------------------------------------------------------------- checkpoint integrity


def flip_bytes(path: Path, count: int = 256) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_damaged_latest_checkpoint_falls_back_on_resume(env, tmp_path, capsys):
    over = {"train.max_steps": 4, "train.save_every": 2}
    cfg = write_config(tiny_run_config(tmp_path / "run", env["data"], env["enc"], over), tmp_path / "c.yaml")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    ckpts = tmp_path / "run/checkpoints"
    latest, previous = ckpts / "step_0000004", ckpts / "step_0000002"
    good = (latest / "raw.safetensors").read_bytes()
    for damage, what in (
        (lambda: flip_bytes(latest / "raw.safetensors"), "raw.safetensors does not match its recorded SHA-256"),
        (lambda: (latest / "ema.safetensors").write_bytes(b"\0" * 10), "ema.safetensors has 10 bytes"),
    ):
        damage()
        with pytest.raises(CheckpointError, match=what):  # loading verifies the file it reads
            ELF.from_pretrained(latest, raw=what.startswith("raw"), encoder=False)
        capsys.readouterr()
        assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 0
        err = capsys.readouterr().err
        assert f"warning: checkpoint {latest} is damaged ({what}" in err
        assert f"set aside as {ckpts / 'damaged-step_0000004'}" in err
        assert (latest / "raw.safetensors").read_bytes() == good  # steps 3-4 redone from step 2: the same weights
        assert TrainingCheckpoint(latest).damage() is None
    flip_bytes(latest / "optimizer.pt")
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", str(latest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"elflm train: error: cannot resume from {latest}: the checkpoint is damaged: optimizer.pt does not match "
        f"its recorded SHA-256 (damaged on disk); the newest valid checkpoint of the run is {previous}"
    )


# ----------------------------------------------------------------------------- paths as given


def test_paths_are_kept_as_given(env, tmp_path):
    name = " a #1\ntwo "  # leading / trailing blanks, a comment sign, a newline
    cfg = load_config(
        write_config(tiny_run_config(tmp_path, env["data"], env["enc"]), tmp_path / "c.yaml"),
        [
            f"train.output_dir={tmp_path / name}",
            f"train.resume={tmp_path / name}",
        ],
    )
    assert cfg.train.output_dir == str(tmp_path / name) and cfg.train.resume == str(tmp_path / name)
    out = tmp_path / f"{name}.jsonl"
    assert (
        main(["sample", "--checkpoint", str(env["model"]), "--num-samples", "1", "--steps", "1", "-o", str(out)]) == 0
    )
    assert len(out.read_text().splitlines()) == 1
    assert main(["sample", "--checkpoint", str(env["model"]), "--num-samples", "1", "-o", str(out)]) == 2  # exists
    data = tmp_path / f"{name}-data"
    prepare(env["corpus"], data, tokenizer=str(env["tok"]), max_length=16, progress=False)
    assert PackedDataset(data).max_length == 16


def test_every_command_says_what_an_interruption_left(tmp_path):
    from elflm.cli import COMMANDS, STATES, build_parser

    assert set(STATES) == set(COMMANDS)
    out = tmp_path / "d"
    argv = ["distill", "--config", "distill-elf-b-owt", f"train.output_dir={out}"]
    state = STATES["distill"](build_parser().parse_args([*argv, "--curriculum", "4,2"]))
    assert (
        state == f"the finished rounds and the current round's checkpoints are kept in {out}: the same command resumes"
    )
    state = STATES["distill"](build_parser().parse_args(argv))
    assert state == f"no checkpoint was written to {out} yet: the same command starts the run over"
    from elflm.config import Config

    raw = {"w": torch.zeros(2)}
    TrainingCheckpoint.write(out, 3, raw=raw, ema=raw, optimizer={}, config=Config(), state={"step": 3}, keep_last=1)
    state = STATES["distill"](build_parser().parse_args([*argv, "--teacher", "a b"]))
    assert state == (
        f"the last checkpoint is {out / 'checkpoints/step_0000003'} (step 3); continue with: elflm distill --config "
        f"distill-elf-b-owt --teacher 'a b' train.output_dir={out} --resume"
    )


def test_a_new_run_over_an_earlier_one_needs_overwrite(env, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_config(tiny_run_config(run, env["data"], env["enc"], {"train.max_steps": 4}), tmp_path / "c.yaml")
    raw = {"w": torch.zeros(2)}
    for step in (2, 4):  # an earlier run's checkpoints
        TrainingCheckpoint.write(
            run, step, raw=raw, ema=raw, optimizer={}, config=load_config(cfg), state={"step": step}, keep_last=2
        )
    argv = ["train", "--config", str(cfg), "--no-progress", "train.max_steps=2", "train.save_every=1"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"elflm train: error: train.output_dir {run} holds the checkpoints of an earlier run (the newest: step 4): "
        "continue it with --resume, or pass --overwrite to start over (its checkpoints are removed), or choose "
        "another folder"
    )
    assert main([*argv, "--overwrite"]) == 0  # no step-4 checkpoint of the earlier run is left to resume from
    assert [c.path.name for c in TrainingCheckpoint.all(run)] == ["step_0000001", "step_0000002"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    stray = run / f".checkpoints.tmp-{dead_pid()}-0000abcd@{socket.gethostname()}"  # a removal killed midway
    stray.mkdir()
    TrainingCheckpoint.start_over(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoints")) == []
