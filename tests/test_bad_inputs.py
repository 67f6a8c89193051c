"""Bad input of every kind reaches no traceback: configs, data files, model folders and training
checkpoints, command-line arguments, Python API arguments, HTTP requests and resumed runs that
drift from their checkpoint. Each command-line case asserts the exit status and one short
``elflm COMMAND: error: …`` line naming what is wrong; each HTTP case the status and a short
detail that does not repeat the input; each API case the error type and message.

Real parts throughout: a tiny trained run, real model folders damaged on disk, the real CLI entry
point (in this process, for speed), a real uvicorn server on loopback."""

import io
import json
import math
import shutil
import socket
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from elflm import ELF, SampleConfig, Sampler, generate
from elflm.checkpoint import TrainingCheckpoint
from elflm.cli import main
from elflm.config import ConfigError
from elflm.errors import ElflmError
from elflm.infill import infill
from elflm.serve import Limits, create_app
from elflm.train import train

from conftest import need_module
from tiny_model import make_tiny_model
from train_fixtures import make_corpus, make_tiny_t5, tiny_run_config, write_config

SHORT = 800  # characters of an error line (some quote a library's reason)


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets_dir, t5_tokenizer_dir):
    """A trained tiny run (2 steps, checkpoints at 1 and 2), a model folder, and damaged copies."""
    base = tmp_path_factory.mktemp("bad")
    enc = make_tiny_t5(base / "enc", t5_tokenizer_dir)
    data = make_corpus(base / "corpus", assets_dir, t5_tokenizer_dir, chars=20_000)
    cfg = tiny_run_config(base / "run", data, enc, {"train.max_steps": 2, "train.save_every": 1})
    run_yaml = write_config(cfg, base / "run.yaml")
    train(cfg, progress=False)
    model = make_tiny_model(base / "model", t5_tokenizer_dir)
    e = {"base": base, "enc": enc, "data": data, "run_yaml": run_yaml, "run": base / "run", "model": model}
    e["step2"] = TrainingCheckpoint.latest(base / "run").path

    def text(name: str, content: str | bytes):
        path = base / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        e[name.replace(".", "_").replace("-", "_")] = path

    text("bin.yaml", bytes(range(128, 256)) * 3)
    text("list.yaml", "- train\n- model\n")
    text("tag.yaml", "train: !!python/object/apply:os.system ['echo hi']\n")
    text("empty.jsonl", "")

    def data_copy(name: str, edit):
        folder = base / name
        shutil.copytree(data, folder)
        edit(folder)
        e[name.replace("-", "_")] = folder

    meta = json.loads((data / "meta.json").read_text())
    data_copy("d-list", lambda f: (f / "meta.json").write_text("[]"))
    data_copy("d-shards", lambda f: (f / "meta.json").write_text(json.dumps({**meta, "shards": 5})))
    data_copy("d-cut", lambda f: (f / "meta.json").write_text(json.dumps(meta)[:40]))
    data_copy("d-bin", lambda f: (f / "meta.json").write_bytes(b"\xff\xfe" * 20))
    shard = meta["shards"][0]
    data_copy("d-short", lambda f: (f / shard["ids"]).write_bytes((f / shard["ids"]).read_bytes()[:100]))
    escape = {**meta, "shards": [{**shard, "ids": "../" + shard["ids"]}]}
    data_copy("d-escape", lambda f: (f / "meta.json").write_text(json.dumps(escape)))
    data_copy("d-maxlen", lambda f: (f / "meta.json").write_text(json.dumps({**meta, "max_length": "32"})))

    def model_copy(name: str, edit):
        folder = base / name
        shutil.copytree(model, folder)
        edit(folder)
        e[name.replace("-", "_")] = folder

    config = json.loads((model / "config.json").read_text())

    def model_config(**sections):
        return lambda f: (f / "config.json").write_text(json.dumps({**config, **sections}))

    weights = load_file(str(model / "model.safetensors"))
    model_copy("m-depth", model_config(model={**config["model"], "depth": "two"}))
    model_copy("m-heads", model_config(model={**config["model"], "num_heads": 0}))
    model_copy("m-ratio", model_config(model={**config["model"], "mlp_ratio": 1e999}))
    model_copy("m-list", lambda f: (f / "config.json").write_text("[]"))
    model_copy("m-bin", lambda f: (f / "config.json").write_bytes(b"\x00\xff" * 50))
    model_copy("m-version", model_config(version="two"))
    model_copy("m-sample", model_config(sample=[1, 2]))
    model_copy("m-steps", model_config(sample={**config["sample"], "steps": True}))
    model_copy("m-cut", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500]))
    nan = {k: torch.full_like(v, math.nan) for k, v in weights.items()}
    model_copy("m-nan", lambda f: save_file(nan, str(f / "model.safetensors")))
    inf = {**weights, "final_layer.linear.weight": torch.full_like(weights["final_layer.linear.weight"], math.inf)}
    model_copy("m-inf", lambda f: save_file(inf, str(f / "model.safetensors")))
    model_copy("m-shape", lambda f: save_file({**weights, "x_embed": torch.zeros(2)}, str(f / "model.safetensors")))

    class Unsafe:  # what an unsafe pickle would run: never reached, weights_only refuses the global
        def __reduce__(self):
            return (shutil.rmtree, (str(base / "run"),))

    def unsafe(f):
        (f / "encoder" / "model.safetensors").unlink()
        torch.save({"x": Unsafe()}, f / "encoder" / "pytorch_model.bin")

    model_copy("m-pickle", unsafe)

    def custom_code(f):
        cfg = json.loads((f / "encoder" / "config.json").read_text())
        cfg.update(model_type="elflm-custom", auto_map={"AutoConfig": "custom.CustomConfig"})
        (f / "encoder" / "config.json").write_text(json.dumps(cfg))
        (f / "encoder" / "custom.py").write_text(
            "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"
            "from transformers import PretrainedConfig\n"
            "class CustomConfig(PretrainedConfig):\n    model_type = 'elflm-custom'\n"
        )

    model_copy("m-remote", custom_code)

    def ckpt_copy(name: str, edit):
        folder = base / name
        shutil.copytree(e["step2"], folder)
        edit(folder)
        e[name.replace("-", "_")] = folder

    ckpt_copy("c-ema", lambda f: (f / "ema.safetensors").write_bytes((f / "ema.safetensors").read_bytes()[:300]))
    ckpt_copy("c-raw", lambda f: (f / "raw.safetensors").write_bytes(b"\x00" * 64))
    ckpt_copy("c-state", lambda f: (f / "trainer_state.json").write_text("[]"))

    def unverified(content: str):  # a checkpoint from before sha256.json: its state is read as it is
        return lambda f: ((f / "sha256.json").unlink(), (f / "trainer_state.json").write_text(content))

    ckpt_copy("c-list", unverified("[]"))
    ckpt_copy("c-step", unverified('{"step": "two"}'))
    ckpt_copy("c-optim", lambda f: (f / "optimizer.pt").write_bytes(b"not a zip archive"))
    enc2 = base / "enc2"  # another encoder: the same architecture, other weights
    shutil.copytree(enc, enc2)
    enc_weights = load_file(str(enc / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in enc_weights.items()}, str(enc2 / "model.safetensors"))
    e["enc2"] = enc2
    e["data2"] = make_corpus(base / "corpus2", assets_dir, t5_tokenizer_dir, chars=12_000)
    return e


def cli_error(capsys, args: list, status: int = 2) -> str:
    """Run ``elflm args`` in this process; assert ``status``, no traceback and one short error line."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == status and len(lines) == 1, (code, err[-3000:])
    assert len(lines[0]) < SHORT, lines[0]
    return lines[0]


def fill(args: list, env: dict) -> list[str]:
    return [str(a).format(**{k: str(v) for k, v in env.items()}) for a in args]


TRAIN = ["train", "--config", "{run_yaml}", "--no-progress"]
RESUME = ["train", "--config", "{run_yaml}", "--resume", "--no-progress"]
FRESH = [*TRAIN, "train.output_dir={base}/fresh-run"]  # a new run: no earlier checkpoints in the way
SAMPLE = ["sample", "--checkpoint", "{model}", "-o", "{base}/out.jsonl"]
ONE = [*SAMPLE, "--num-samples", "1", "--steps", "1"]

CASES = [
    # configs: a value of the wrong type, non-finite, out of range; files that are not configs
    ("config mlp_ratio inf", [*TRAIN, "model.mlp_ratio=inf"], "model.mlp_ratio: expected a finite number"),
    ("config lr nan", [*TRAIN, "train.lr=nan"], "train.lr: expected a finite number"),
    ("config lr negative", [*TRAIN, "train.lr=-1"], "train.lr=-1.0: expected null (blr scaling) or > 0"),
    ("config seed negative", [*TRAIN, "train.seed=-1"], "train.seed=-1: expected an integer in [0, 2**63)"),
    ("config seed huge", [*TRAIN, "train.seed=1e30"], "train.seed: expected an integer in (-2**63, 2**63)"),
    ("config bool is no int", [*TRAIN, "model.depth=true"], "model.depth: expected an integer, got True"),
    ("config heads zero", [*TRAIN, "model.num_heads=0"], "model.num_heads=0: expected an integer >= 1"),
    ("config batch fraction", [*TRAIN, "train.global_batch_size=2.5"], "train.global_batch_size: expected an integ"),
    ("config steps bound", [*TRAIN, "sample.steps=1000001"], "sample.steps=1000001: expected at most 100,000"),
    ("config depth bound", [*TRAIN, "model.depth=100000000"], "model.depth=100000000: expected at most 1,024"),
    ("config workers bound", [*TRAIN, "data.num_workers=1000"], "data.num_workers=1000: expected at most 256"),
    ("config on_nonfinite", [*TRAIN, "train.on_nonfinite=ignore"], "train.on_nonfinite: expected one of 'stop'"),
    ("config last override", [*TRAIN, "train.lr=1", "train.lr=abc"], "(override 'train.lr=abc')"),
    ("config binary", ["train", "--config", "{bin_yaml}"], "bin.yaml: not a UTF-8 text file"),
    ("config list", ["train", "--config", "{list_yaml}"], "list.yaml: expected a mapping of sections"),
    ("config python tag", ["train", "--config", "{tag_yaml}"], "tag.yaml:1:8: malformed YAML"),
    ("config missing", ["train", "--config", "{base}/none.yaml"], "none.yaml' not found"),
    ("device out of range", [*ONE, "--device", "cuda:99"], "device cuda:99"),
    # data files
    ("meta list", [*FRESH, "data.train_path={d_list}"], "meta.json: expected a JSON object, got list"),
    ("meta shards int", [*FRESH, "data.train_path={d_shards}"], "meta.json: 'shards' must be a list of shards"),
    ("meta cut", [*FRESH, "data.train_path={d_cut}"], "meta.json: not valid JSON"),
    ("meta binary", [*FRESH, "data.train_path={d_bin}"], "meta.json: not valid JSON"),
    ("meta max_length text", [*FRESH, "data.train_path={d_maxlen}"], "'max_length' must be an integer >= 1"),
    ("shard short", [*FRESH, "data.train_path={d_short}"], "ids-00000.bin: expected"),
    ("shard path escapes", [*FRESH, "data.train_path={d_escape}"], "shards[0].ids must be a file name in the folder"),
    ("data missing", [*FRESH, "data.train_path={base}/nodata"], "nodata"),
    ("input missing", [*SAMPLE, "--input", "{base}/none.txt", "--max-input-length", "8"], "none.txt: no such file"),
    ("eval empty", ["eval", "{empty_jsonl}", "--judge", "none"], "empty.jsonl: no samples"),
    # model folders
    ("folder depth text", [*ONE, "--checkpoint", "{m_depth}"], "config.json: model.depth: expected an integer"),
    ("folder heads zero", [*ONE, "--checkpoint", "{m_heads}"], "config.json: model.num_heads=0"),
    ("folder ratio inf", [*ONE, "--checkpoint", "{m_ratio}"], "model.mlp_ratio: expected a finite number, got inf"),
    ("folder list", [*ONE, "--checkpoint", "{m_list}"], "config.json: not an elflm config"),
    ("folder binary", [*ONE, "--checkpoint", "{m_bin}"], "config.json: cannot read config"),
    ("folder version", [*ONE, "--checkpoint", "{m_version}"], '"version" must be an integer'),
    ("folder sample list", [*ONE, "--checkpoint", "{m_sample}"], "'sample' must be a mapping"),
    ("folder steps bool", [*ONE, "--checkpoint", "{m_steps}"], "sample.steps: expected an integer, got True"),
    ("weights cut", [*ONE, "--checkpoint", "{m_cut}"], "cannot read safetensors weights"),
    ("weights nan", [*ONE, "--checkpoint", "{m_nan}"], "47 of 47 weight tensors hold NaN or infinite values"),
    ("weights inf", [*ONE, "--checkpoint", "{m_inf}"], "1 of 47 weight tensors hold NaN or infinite values"),
    ("weights extra", [*ONE, "--checkpoint", "{m_shape}"], "unexpected keys ['x_embed']"),
    ("encoder pickle", [*ONE, "--checkpoint", "{m_pickle}"], "torch.load(weights_only=True) refuses"),
    ("checkpoint missing", [*ONE, "--checkpoint", "{base}/nomodel"], "nomodel: no such file or folder"),
    # damaged training checkpoints
    ("ema cut", [*ONE, "--checkpoint", "{c_ema}"], "ema.safetensors"),
    ("raw cut resume", [*TRAIN, "--resume", "{c_raw}"], "raw.safetensors"),
    ("state damaged", [*TRAIN, "--resume", "{c_state}"], "the checkpoint is damaged: trainer_state.json has 2 bytes"),
    (
        "state list",
        [*TRAIN, "--resume", "{c_list}"],
        "trainer_state.json: expected a JSON object with an integer 'step'",
    ),
    (
        "state step text",
        [*TRAIN, "--resume", "{c_step}"],
        "trainer_state.json: expected a JSON object with an integer 'step'",
    ),
    ("optimizer damaged", [*TRAIN, "--resume", "{c_optim}"], "optimizer.pt"),
    # command-line arguments
    ("seed negative", [*ONE, "--seed", "-1"], "argument --seed: expected an integer in [0, 2**63), got '-1'"),
    ("seed 2**63", [*ONE, "--seed", str(2**63)], "argument --seed: expected an integer in [0, 2**63)"),
    ("w inf", [*ONE, "--w", "inf"], "argument --w: expected a finite number >= 0, got 'inf'"),
    ("gamma nan", [*ONE, "--gamma", "nan"], "argument --gamma: expected a finite number >= 0"),
    ("w huge", [*ONE, "--w", "1e308"], "sample.w=1e+308: expected at most 100.0"),
    ("steps zero", [*SAMPLE, "--num-samples", "1", "--steps", "0"], "argument --steps: expected an integer in [1"),
    ("steps bound", [*SAMPLE, "--num-samples", "1", "--steps", "200000"], "sample.steps=200000: expected at most"),
    ("samples zero", [*SAMPLE, "--num-samples", "0"], "argument --num-samples: expected an integer in [1"),
    ("samples bound", [*SAMPLE, "--num-samples", "99999999999"], "expected at most 10,000,000 samples"),
    ("samples × seeds", [*SAMPLE, "--num-samples", "9000000", "--seeds", "0,1"], "at most 10,000,000"),
    ("seeds repeated", [*ONE, "--seeds", "1,1"], "argument --seeds: expected comma-separated distinct"),
    ("gap huge", [*SAMPLE, "--infill", "a [MASK:99999999999999999999] b"], "--infill: gap [MASK:9999"),
    ("gap too long", [*SAMPLE, "--infill", "a [MASK:999] b"], "--infill: the template is 1003 tokens"),
    ("gap zero", [*SAMPLE, "--infill", "a [MASK:0] b"], "--infill: empty gap"),
    ("no gap", [*SAMPLE, "--infill", "no gaps here"], "--infill: the template has no gap"),
    ("length bound", [*ONE, "--length", "99999"], "length must be an integer in [1, 64], got 99999"),
    ("cfg unconditional", [*ONE, "--cfg-scale", "2"], "--cfg-scale (classifier-free guidance) applies to cond"),
    ("precision", [*ONE, "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    ("convert max_length", ["convert", "{model}", "-o", "{base}/conv", "--max-length", "-1"], "--max-length"),
    ("serve port", ["serve", "--checkpoint", "{model}", "--port", "70000"], "port number in [0, 65535]"),
    ("serve host", ["serve", "--checkpoint", "{model}", "--host", "999.1.1.1"], "--host '999.1.1.1' is not an address"),
    ("prepare workers", ["prepare", "{empty_jsonl}", "-o", "{base}/p", "--workers", "1000"], "expected at most 256"),
    (
        "convert encoder",
        ["convert", "{model}", "-o", "{base}/conv", "--encoder", "{list_yaml}"],
        "cannot load the encoder",
    ),
    ("serve max batch", ["serve", "--checkpoint", "{model}", "--max-batch", "0"], "argument --max-batch"),
    ("unknown option", [*ONE, "--bogus"], "unrecognized arguments: --bogus"),
    ("allow without resume", [*TRAIN, "--allow-config-change"], "--allow-config-change applies to a resumed run"),
    # resumed runs that drift from their checkpoint
    ("drift depth", [*RESUME, "model.depth=3"], "changes what the checkpoint was trained as: model.depth: 2 → 3"),
    ("drift objective", [*RESUME, "objective.decoder_prob=0.5"], "objective.decoder_prob: 0.2 → 0.5"),
    ("drift encoder", [*RESUME, "encoder.name_or_path={enc2}"], "trained as: encoder.name_or_path:"),
    ("drift data", [*RESUME, "data.train_path={data2}"], "trained as: data.train_path:"),
    ("drift lr", [*RESUME, "train.lr=0.001"], "changes the optimisation: train.lr: 0.002 → 0.001"),
    ("drift seed", [*RESUME, "train.seed=1"], "changes the optimisation: train.seed: 0 → 1"),
    ("drift batch", [*RESUME, "train.global_batch_size=4"], "train.global_batch_size: 8 → 4"),
    ("drift optimizer", [*RESUME, "train.optimizer=adamw"], "train.optimizer: 'muon' → 'adamw'. To train on"),
]


@pytest.mark.parametrize("args, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input(env, capsys, args, words):
    line = cli_error(capsys, fill(args, env))
    assert words in line, line


def test_a_folder_that_asks_to_run_its_own_code_is_refused_without_a_prompt(env, capsys, monkeypatch):
    """transformers asks "Do you wish to run the custom code? [y/N]" unless told
    trust_remote_code=False: here a user answers yes, and nothing runs."""
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    line = cli_error(capsys, fill([*ONE, "--checkpoint", "{m_remote}"], env))
    assert "which elflm never runs (trust_remote_code=False)" in line
    assert not (env["m_remote"] / "encoder" / "RAN").exists()
    assert "Do you wish to run the custom code" not in capsys.readouterr().out


def test_debug_shows_the_traceback(env, capsys, monkeypatch):
    args = fill([*ONE, "--checkpoint", "{m_depth}"], env)
    assert main([*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("elflm sample: error: ")
    monkeypatch.setenv("ELFLM_DEBUG", "1")
    assert main(args) == 2 and "Traceback" in capsys.readouterr().err


def test_training_stops_at_the_first_non_finite_step(env, capsys, tmp_path):
    args = [*TRAIN, "train.lr=1e30", "train.max_steps=4", f"train.output_dir={tmp_path}"]
    line = cli_error(capsys, fill(args, env))
    assert line.startswith("elflm train: error: step 3: the loss or the gradient norm is not finite (loss nan")
    assert f"the last good checkpoint is {tmp_path}/checkpoints/step_0000002" in line
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_skipped_steps_are_counted_in_the_log(env, tmp_path):
    over = {"train.lr": 1e30, "train.on_nonfinite": "skip", "train.max_steps": 4, "train.log_every": 2}
    t = train(tiny_run_config(tmp_path, env["data"], env["enc"], over), progress=False)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in recs] == [(2, 0), (4, 2)] and recs[1]["loss"] is None
    assert t.step == 4 and all(bool(torch.isfinite(v).all()) for v in t.ema.state_dict().values())


def test_allowed_changes_are_printed_and_taken(env, capsys, tmp_path):
    shutil.copytree(env["run"], tmp_path / "run")
    args = fill([*RESUME, "--allow-config-change", f"train.output_dir={tmp_path}/run"], env)
    assert main([*args, "train.adam_b1=0.8", "train.optimizer=adamw", "train.max_steps=3"]) == 0
    err = capsys.readouterr().err
    assert "with changed settings: train.optimizer: 'muon' → 'adamw'" in err and "its state starts afresh" in err
    opt = TrainingCheckpoint.latest(tmp_path / "run").optimizer()
    assert opt["param_groups"][0]["betas"] == (0.8, 0.95)  # the new run's hyper-parameters, not the saved ones


def test_a_busy_port_is_named_before_the_model_loads(env, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = cli_error(capsys, ["serve", "--checkpoint", str(env["base"] / "nomodel"), "--port", port])
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port" in line


API_CASES = [
    ("steps text", lambda m: SampleConfig(steps="8"), ConfigError, "sample.steps: expected an integer, got '8'"),
    ("steps bool", lambda m: SampleConfig(steps=True), ConfigError, "sample.steps: expected an integer, got True"),
    ("w nan", lambda m: SampleConfig(w=math.nan), ConfigError, "sample.w: expected a finite number, got nan"),
    ("gamma inf", lambda m: SampleConfig(gamma=math.inf), ConfigError, "sample.gamma: expected a finite number"),
    ("grid", lambda m: SampleConfig(grid="cosine"), ConfigError, "sample.grid: expected one of"),
    ("no samples", lambda m: generate(m, m.encoder, num_samples=0), ValueError, "num_samples must be an integer in"),
    ("seed -1", lambda m: generate(m, m.encoder, num_samples=1, seed=-1), ValueError, "seed must be an integer in"),
    ("seed float", lambda m: generate(m, m.encoder, num_samples=1, seed=1.5), ValueError, "seed must be an integer in"),
    ("count text", lambda m: generate(m, m.encoder, num_samples="3"), ValueError, "num_samples must be an integer"),
    ("batch bool", lambda m: generate(m, m.encoder, num_samples=1, batch_size=True), ValueError, "batch_size must"),
    ("length", lambda m: generate(m, m.encoder, num_samples=1, length=10**12), ValueError, "length must be an int"),
    ("sources str", lambda m: generate(m, m.encoder, sources="a b"), ValueError, "sources must be a list"),
    ("precision", lambda m: Sampler(m, SampleConfig(), precision="fp16"), ValueError, "unknown precision 'fp16'"),
    ("settings dict", lambda m: Sampler(m, {"steps": 2}), ConfigError, "expected a SampleConfig, got dict"),
    ("infill count", lambda m: infill(m, m.encoder, "a [MASK:2]", num_samples=0), ValueError, "num_samples must"),
    ("start length", lambda m: Sampler(m, SampleConfig()).start([0], 10**9), ValueError, "length must be an integer"),
    ("load name", lambda m: ELF.from_pretrained(12), ValueError, "name_or_path must be a folder, file or Hub id"),
    ("load length", lambda m: ELF.from_pretrained("x", max_length=0), ValueError, "max_length must be an integer"),
    ("load device", lambda m: ELF.from_pretrained("x", device="tpu"), ValueError, "device 'tpu': expected auto"),
    ("limits bool", lambda m: Limits(max_samples=True), ValueError, "server limit max_samples must be an integer"),
    ("limits nan", lambda m: Limits(batch_wait_ms=math.nan), ValueError, "server limit batch_wait_ms must be a"),
    ("cfg huge", lambda m: SampleConfig(cfg_scale=1e300), ConfigError, "sample.cfg_scale=1e+300: expected at most"),
]


@pytest.fixture(scope="module")
def loaded(env):
    return ELF.from_pretrained(env["model"])


@pytest.mark.parametrize("call, kind, words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_arguments(loaded, call, kind, words):
    with pytest.raises(kind) as e:
        call(loaded)
    assert words in str(e.value) and len(str(e.value)) < SHORT
    assert isinstance(e.value, ElflmError) or type(e.value) is ValueError


@pytest.fixture(scope="module")
def server(loaded):
    """A real uvicorn server on loopback with a 64 KiB body limit."""
    need_module("fastapi", "pip install 'elflm[serve]'")
    uvicorn = need_module("uvicorn", "pip install 'elflm[serve]'")
    limits = Limits(max_samples=4, max_steps=16, max_chars=200, max_batch=8, max_body_bytes=65536)
    app = create_app(loaded, loaded.encoder, loaded.pretrained, limits)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


def chunks(n: int):
    for _ in range(n):
        yield b"x" * 8192


HTTP_CASES = [
    ("steps true", {"steps": True}, 422, "steps: Input should be a valid integer"),
    ("steps text", {"steps": "2"}, 422, "steps: Input should be a valid integer"),
    ("w nan", b'{"w": NaN}', 422, "w: Input should be a finite number"),
    ("gamma inf", b'{"gamma": Infinity}', 422, "gamma: Input should be a finite number"),
    ("samples text", {"num_samples": "2"}, 422, "num_samples: Input should be a valid integer"),
    ("seed negative", {"seed": -1}, 422, "seed: Input should be greater than or equal to 0"),
    ("seed 2**63", {"seed": 2**63}, 422, "seed: Input should be less than"),
    ("huge gap", {"template": "a [MASK:200000000] b"}, 422, "is too long: a gap is at most 1000000 tokens"),
    ("gap over row", {"template": "a [MASK:999] b"}, 422, "more than the 64 available"),
    ("segment gap", {"segments": [{"gap": 100000}]}, 422, "segments.0.GapSegment.gap"),
    ("cfg unconditional", {"cfg_scale": 2.0}, 422, "cfg_scale (classifier-free guidance) needs a 'source'"),
    ("source unconditional", {"source": "x"}, 422, "this model is unconditional"),
    ("length", {"length": 0}, 422, "length: Input should be greater than or equal to 1"),
    ("w over", {"w": 101}, 422, "w: Input should be less than or equal to 100"),
    ("unknown field", {"x" * 5000: 1}, 422, "Extra inputs are not permitted"),
    ("not json", b"{not json", 422, "JSON"),
    ("not an object", b"[1, 2]", 422, "Input should be a valid dictionary"),
    ("long prompt", {"prompt": "y" * 5000}, 422, "prompt: String should have at most 200 characters"),
    ("body declared", {"prompt": "z" * 100_000}, 413, "larger than 65536 bytes"),
    ("body streamed", chunks(20), 413, "larger than 65536 bytes"),
]


@pytest.mark.parametrize("body, status, words", [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_http_bad_request(server, body, status, words):
    httpx = need_module("httpx", "pip install httpx")
    kw = {"json": body} if isinstance(body, dict) else {"content": body}
    r = httpx.post(f"{server}/generate", headers={"content-type": "application/json"}, timeout=60, **kw)
    detail = r.json()["detail"]
    assert r.status_code == status and words in detail, (r.status_code, detail)
    assert len(r.content) < SHORT and "x" * 40 not in detail and "y" * 40 not in detail
