"""``elflm sweep``: sample and evaluate one checkpoint over a grid of sampler settings.

The grid is the product steps × method × γ × w (× cfg scale for conditional models); γ (the SDE
churn) only varies for ``sde`` rows, ``ode`` rows are listed once with γ = 0. Each setting's
samples go to ``samples/<name>.jsonl`` (the ``elflm sample`` format); a file that already holds
the same settings, seed and count is reused, so an interrupted sweep resumes where it stopped.
Metrics per setting: Gen PPL and entropy under a judge LM (:mod:`elflm.evaluate`), and BLEU /
ROUGE against references for conditional sweeps. Results: ``sweep.csv``, ``sweep.md`` and PNG
plots (Gen PPL vs entropy, Gen PPL vs steps, BLEU vs steps) drawn with matplotlib
(``pip install 'elflm[plots]'``). Under ``torchrun`` every rank runs the sweep: sampling and the
judge are shared over the ranks (:mod:`elflm.generate`, :mod:`elflm.evaluate`) and rank 0 writes
the files, the same as one process writes.

Every file is written all-or-nothing (:mod:`elflm.files`). ``sweep.json`` records what makes the
folder one sweep (checkpoint, seed, samples or conditions, length, precision, references, judge):
a folder holding the same sweep resumes (the grid may grow); one holding another sweep or other
files is replaced only with ``overwrite`` (the new sweep is written beside it and moved into place
once complete), and refused otherwise.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

from . import evaluate as ev
from .config import SampleConfig
from .distributed import Dist, gather_objects
from .files import OutputExistsError, write_atomic, write_jsonl, write_text
from .generate import generate
from .model import model_config
from .sampling import used_settings

PLOTS_EXTRA = "pip install 'elflm[plots]'"
IDENTITY = "sweep.json"  # what makes a sweep folder the same sweep (resumable)
AXES = ("method", "steps", "gamma", "w", "cfg_scale")
METRICS = ("gen_ppl", "entropy", "num_empty", "bleu", "rouge1", "rouge2", "rougeL")


# ----------------------------------------------------------------------------- the grid


def grid_settings(
    base: SampleConfig,
    steps=None,
    methods=None,
    gammas=None,
    ws=None,
    cfg_scales=None,
) -> list[SampleConfig]:
    """The settings of the grid steps × method × γ × w × cfg scale, each axis defaulting to
    ``base``'s single value. ``ode`` takes no churn: its rows get γ = 0, once. Order: method,
    then γ, w, cfg scale, steps (so consecutive rows differ in steps)."""
    axes = {"steps": steps, "method": methods, "gamma": gammas, "w": ws, "cfg_scale": cfg_scales}
    values = {k: list(dict.fromkeys(v)) if v else [getattr(base, k)] for k, v in axes.items()}
    out: list[SampleConfig] = []
    for method, gamma, w, c, n in itertools.product(
        values["method"], values["gamma"], values["w"], values["cfg_scale"], values["steps"]
    ):
        cfg = replace(
            base,
            method=method,
            gamma=0.0 if method == "ode" else float(gamma),
            w=float(w),
            cfg_scale=float(c),
            steps=int(n),
        )
        if cfg not in out:
            out.append(cfg)
    return out


def setting_name(cfg: SampleConfig) -> str:
    """File-name tag of a setting, e.g. ``sde-steps32-gamma1.5-w3-cfg1``."""
    num = lambda x: f"{x:g}"
    gamma = f"-gamma{num(cfg.gamma)}" if cfg.method != "ode" else ""
    return f"{cfg.method}-steps{cfg.steps}{gamma}-w{num(cfg.w)}-cfg{num(cfg.cfg_scale)}-{cfg.grid}"


# ----------------------------------------------------------------------------- the folder


def _digest(texts: list[str] | None) -> str | None:
    return None if texts is None else hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def sweep_identity(
    *,
    checkpoint: str,
    raw: bool,
    precision: str,
    seed: int,
    length: int | None,
    max_input_length: int | None,
    num_samples: int | None,
    sources: list[str] | None,
    references: list[str] | None,
    judge: str | None,
) -> dict:
    """What makes a sweep folder one sweep (``sweep.json``): everything but the grid of settings."""
    return {
        "checkpoint": checkpoint,
        "raw": raw,
        "precision": precision,
        "seed": seed,
        "length": length,
        "max_input_length": max_input_length,
        "num_samples": num_samples,
        "sources_sha256": _digest(sources),
        "references_sha256": _digest(references),
        "judge": judge,
    }


def folder_mode(output_dir: str | Path, identity: dict, overwrite: bool) -> str:
    """How to write the sweep ``identity`` into ``output_dir``: ``new`` (absent or empty),
    ``resume`` (it holds the same sweep) or ``replace`` (another sweep or other files, with
    ``overwrite``); without ``overwrite`` the last case raises :class:`~elflm.files.OutputExistsError`."""
    out = Path(output_dir)
    if not out.is_dir() or not any(p for p in out.iterdir() if not p.name.startswith(".")):
        return "new"
    try:
        recorded = json.loads((out / IDENTITY).read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == identity:
        return "resume"
    if overwrite:
        return "replace"
    if isinstance(recorded, dict):
        diff = ", ".join(f"{k} {recorded.get(k)!r} → {v!r}" for k, v in identity.items() if recorded.get(k) != v)
        what = f"another sweep ({diff})"
    else:
        what = f"files that are not a sweep of this version (no {IDENTITY})"
    raise OutputExistsError(
        f"--output-dir {out} holds {what}; pass --overwrite to replace it (once the new sweep is complete), "
        "or choose another folder"
    )


# ----------------------------------------------------------------------------- running


def _cached(path: Path, expect: dict, count: int, sources: list[str] | None) -> list[dict] | None:
    """The records of a samples file written for exactly ``expect`` (settings, seed …) and
    ``sources``, else None."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError):
        return None
    if len(rows) != count or not all(
        isinstance(r, dict) and all(r.get(k) == v for k, v in expect.items()) for r in rows
    ):
        return None
    if sources is not None and [r.get("source") for r in rows] != list(sources):
        return None
    return rows


def run_sweep(
    model,
    encoder,
    configs: list[SampleConfig],
    output_dir: str | Path,
    *,
    judge=None,
    num_samples: int | None = None,
    sources: list[str] | None = None,
    references: list[str] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    judge_batch_size: int = 8,
    precision: str = "fp32",
    compiled: bool = False,
    extra: dict | None = None,
    log=None,
    dist: Dist | None = None,
) -> list[dict]:
    """Sample every setting of ``configs`` (unconditional ``num_samples``, or one per entry of
    ``sources``) with :func:`elflm.generate.generate`, store the samples under
    ``output_dir/samples/`` and measure them: ``judge`` = ``(model, tokenizer)`` of a causal LM
    gives ``gen_ppl``, ``entropy``, ``num_empty``; ``references`` (one per source) give ``bleu``,
    ``rouge1/2/L``. ``extra`` is added to every sample record (e.g. precision, checkpoint).
    ``log(message)`` gets one line per setting. ``precision``/``compiled``: the
    :class:`~elflm.sampling.Sampler`'s. ``dist``: under ``torchrun`` every rank calls this with the
    same arguments; rank 0 writes and logs. Returns one row per setting: its settings, ``seconds``
    and ``samples_per_s`` of sampling (None when reused), the metrics and ``samples`` (the file);
    ``sweep.csv`` and ``sweep.md`` are rewritten after each setting."""
    if judge is None and references is None:
        raise ValueError("nothing to measure: give a judge LM (Gen PPL, entropy) or references (BLEU, ROUGE)")
    if references is not None and (sources is None or len(references) != len(sources)):
        raise ValueError(
            f"references need one entry per condition: {len(references)} references, "
            f"{0 if sources is None else len(sources)} conditions"
        )
    main = dist is None or dist.main
    out_dir = Path(output_dir)
    if main:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    count = len(sources) if sources is not None else num_samples
    length = length or model_config(model).max_length
    fixed = {**(extra or {}), "seed": seed, "length": length}
    if sources is not None:
        fixed["max_input_length"] = max_input_length
    rows: list[dict] = []
    for k, cfg in enumerate(configs, 1):
        name = setting_name(cfg)
        path = out_dir / "samples" / f"{name}.jsonl"
        records = _cached(path, {**used_settings(cfg, sources is not None), **fixed}, count, sources) if main else None
        if dist is not None:  # rank 0's decision
            records = gather_objects(records, dist)[0]
        seconds = None
        if records is None:
            t0 = time.perf_counter()
            records = generate(
                model,
                encoder,
                cfg,
                num_samples=num_samples,
                sources=sources,
                batch_size=batch_size,
                seed=seed,
                length=length,
                max_input_length=max_input_length,
                pad_token=pad_token,
                precision=precision,
                compiled=compiled,
                dist=dist,
            )
            seconds = time.perf_counter() - t0
            records = [{**r, **fixed} for r in records]
            if main:
                write_jsonl(path, records)
        texts = [r["text"] for r in records]
        used = used_settings(cfg, sources is not None)
        row = {
            "name": name,
            **{a: used.get(a) for a in AXES},
            "grid": cfg.grid,
            "num_samples": len(texts),
            "seconds": seconds,
            "samples_per_s": None if not seconds else len(texts) / seconds,
        }
        if judge is not None:
            lm = ev.generative_perplexity(texts, *judge, batch_size=judge_batch_size, dist=dist)
            row.update(gen_ppl=lm["gen_ppl"], entropy=lm["entropy"], num_empty=lm["num_empty"])
        if references is not None:
            row["bleu"] = ev.bleu(texts, references)
            row.update(ev.rouge(texts, references))
        row["samples"] = str(path.relative_to(out_dir))
        rows.append(row)
        if not main:
            continue
        write_table(rows, out_dir)
        if log is not None:
            done = "reused" if seconds is None else f"{seconds:.1f} s"
            scores = ", ".join(f"{m} {row[m]:.4g}" for m in METRICS if row.get(m) is not None)
            log(f"[{k}/{len(configs)}] {name}: {scores} ({done})")
    return rows


# ----------------------------------------------------------------------------- tables and plots


def _columns(rows: list[dict]) -> list[str]:
    keys = ["name", *AXES, "grid", "num_samples", *METRICS, "seconds", "samples_per_s", "samples"]
    return [k for k in keys if any(k in r for r in rows)]


def format_markdown(rows: list[dict]) -> str:
    """A Markdown table of sweep rows: the settings and the metrics that were measured."""
    cols = [c for c in _columns(rows) if c not in ("name", "grid", "samples", "seconds")]
    if all(r["cfg_scale"] in (None, 1) for r in rows):
        cols.remove("cfg_scale")
    fmt = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_table(rows: list[dict], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``sweep.csv`` (all columns) and ``sweep.md`` into ``output_dir``; returns both paths."""
    out = Path(output_dir)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=_columns(rows))
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return write_text(out / "sweep.csv", table.getvalue()), write_text(out / "sweep.md", format_markdown(rows) + "\n")


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"sweep plots need matplotlib: {PLOTS_EXTRA} (or pass --no-plots)") from e
    return Figure(figsize=(6.4, 4.8), layout="constrained")


def _label(key: tuple, names: tuple) -> str:
    sym = {"gamma": "γ", "w": "w", "cfg_scale": "cfg", "steps": "steps"}
    ode = dict(zip(names, key)).get("method") == "ode"
    return " ".join(
        str(v) if n == "method" else f"{sym[n]}={v:g}" for n, v in zip(names, key) if not (ode and n == "gamma")
    )


def _series(rows: list[dict], along: str, metric: str) -> dict[tuple, list[dict]]:
    """Rows with ``metric`` grouped by every varying axis except ``along``, each sorted by it."""
    varying = tuple(a for a in AXES if a != along and (a == "method" or len({r[a] for r in rows}) > 1))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get(metric) is not None:
            groups.setdefault(tuple(r[a] for a in varying), []).append(r)
    return {(varying, k): sorted(v, key=lambda r: r[along]) for k, v in groups.items()}


def plot_sweep(rows: list[dict], output_dir: str | Path) -> list[Path]:
    """Draw the figures the rows allow into ``output_dir``: ``ppl_vs_entropy.png`` (one curve
    along w when several w were swept, else along steps), ``ppl_vs_steps.png`` and
    ``bleu_vs_steps.png``. Returns the files written."""
    out, written = Path(output_dir), []
    if any(r.get("gen_ppl") is not None for r in rows):
        along = "w" if len({r["w"] for r in rows}) > 1 else "steps"
        fig = _figure()
        ax = fig.add_subplot()
        for (names, key), rs in _series(rows, along, "gen_ppl").items():
            pts = [r for r in rs if r.get("entropy") is not None]
            (line,) = ax.plot([r["entropy"] for r in pts], [r["gen_ppl"] for r in pts], "o-", label=_label(key, names))
            for r in pts:
                ax.annotate(
                    f"{along}={r[along]:g}",
                    (r["entropy"], r["gen_ppl"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set(xlabel="entropy (nats)", ylabel="Gen PPL", yscale="log", title=f"Gen PPL vs entropy (along {along})")
        ax.legend(fontsize=8)
        written.append(write_atomic(out / "ppl_vs_entropy.png", lambda f: fig.savefig(f, dpi=120, format="png"), True))
    for metric, title in (("gen_ppl", "Gen PPL"), ("bleu", "BLEU")):
        if not any(r.get(metric) is not None for r in rows):
            continue
        from matplotlib.ticker import NullLocator

        fig = _figure()
        ax = fig.add_subplot()
        for (names, key), rs in _series(rows, "steps", metric).items():
            ax.plot([r["steps"] for r in rs], [r[metric] for r in rs], "o-", label=_label(key, names))
        ax.set(xlabel="sampling steps", ylabel=title, xscale="log", title=f"{title} vs steps")
        if metric == "gen_ppl":
            ax.set_yscale("log")
        steps = sorted({r["steps"] for r in rows})
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=8)
        name = f"{'ppl' if metric == 'gen_ppl' else metric}_vs_steps.png"
        written.append(write_atomic(out / name, lambda f, fig=fig: fig.savefig(f, dpi=120, format="png"), True))
    return written
