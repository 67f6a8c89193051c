"""Experiment tracking: the records the trainer logs every ``train.log_every`` steps (``step``,
``loss``, ``l2_loss``, ``ce_loss``, ``grad_norm``, ``lr``, ``tokens_per_s``, ``mfu``,
``max_memory_gb``) and its sample previews go to every tracker of the run through one small
interface, :class:`Tracker`:

* :class:`Console` – one line per record (through tqdm, so progress bars stay intact);
* :class:`JsonLines` – ``<output_dir>/metrics.jsonl``, one JSON object per record;
* :class:`TensorBoard` – ``<output_dir>/tb`` (``train.logger: tensorboard``; needs ``tensorboard``);
* :class:`WandB` – a Weights & Biases run (``train.logger: wandb``; needs ``wandb``), in
  ``<output_dir>/wandb``; a resumed run continues the same W&B run. ``WANDB_MODE=offline`` writes
  the run to disk for ``wandb sync``.

The console and ``metrics.jsonl`` are always on; ``train.logger`` adds the others
(``tensorboard,wandb`` for both). :func:`open_trackers` builds them from the config.
"""

from __future__ import annotations

import json
import math
import secrets
from abc import ABC, abstractmethod
from pathlib import Path

from tqdm.auto import tqdm

from . import files
from .config import Config, to_dict

INSTALL = "pip install 'elflm[track]'"


class Tracker(ABC):
    """Receives the training records (dicts with an int ``step``) and preview texts."""

    @abstractmethod
    def log(self, record: dict) -> None:
        """One training record."""

    def text(self, name: str, text: str, step: int) -> None:
        """A text (e.g. the preview samples) at ``step``; trackers without text views ignore it."""
        return None

    def close(self) -> None:
        """Flush and release files or runs (nothing to do by default)."""
        return None


def format_record(rec: dict) -> str:
    """The console line of a record: the losses of a training window, or ``eval/...`` metrics."""
    if "loss" not in rec:
        fmt = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
        return f"step {rec['step']} " + " ".join(f"{k} {fmt(v)}" for k, v in rec.items() if k != "step")
    mfu = f" mfu {rec['mfu']:.1%}" if rec.get("mfu") is not None else ""
    mem = f" mem {rec['max_memory_gb']:.1f}GB" if "max_memory_gb" in rec else ""
    skipped = f" skipped {rec['skipped']}" if rec.get("skipped") else ""
    if rec["loss"] is None:  # every step of the window skipped (train.on_nonfinite: skip)
        return f"step {rec['step']} every step skipped (non-finite){skipped} lr {rec['lr']:.2e}"
    return (
        f"step {rec['step']} loss {rec['loss']:.4f} (l2 {rec['l2_loss']:.4f} ce {rec['ce_loss']:.4f}) "
        f"gnorm {rec['grad_norm']:.3f} lr {rec['lr']:.2e} tok/s {rec['tokens_per_s']:.0f}{mfu}{mem}{skipped}"
    )


class Console(Tracker):
    """One line per record on stdout."""

    def log(self, record: dict) -> None:
        tqdm.write(format_record(record))


class JsonLines(Tracker):
    """Appends each record to a JSONL file (``metrics.jsonl``). ``start``: the step the run starts
    from; the records of later steps a killed run left behind (and a half-written last line) are
    cut first, so that a resumed run's file reads as an uninterrupted run's."""

    def __init__(self, path: str | Path, start: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= start]
            files.write_text(self.path, "".join(line + "\n" for line in kept))
        else:
            files.drop_partial_line(self.path)

    def log(self, record: dict) -> None:
        files.append_line(self.path, json.dumps(record))


def _step_of(line: str) -> float:
    """The ``step`` of a ``metrics.jsonl`` line; infinity for a line that is not a record."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def _scalars(record: dict) -> dict[str, float]:
    """The numbers of a record by tag: ``train/<key>``, or the key itself when it names its section
    (``eval/gen_ppl``)."""
    return {
        k if "/" in k else f"train/{k}": float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoard(Tracker):
    """Scalars ``train/<name>`` and texts in a TensorBoard event folder."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"train.logger=tensorboard needs the tensorboard package: {INSTALL}") from e
        self.writer = SummaryWriter(str(folder))

    def log(self, record: dict) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])
        self.writer.flush()

    def text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, text, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """A Weights & Biases run: ``project``, ``entity``, ``name``, ``tags``, the run's config, files
    in ``folder/wandb``. The run id is kept in ``folder/wandb-run-id`` so that resuming the
    training continues the same run."""

    ID_FILE = "wandb-run-id"

    def __init__(
        self,
        folder: str | Path,
        *,
        project: str,
        entity: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        config: dict | None = None,
    ):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"train.logger=wandb needs the wandb package: {INSTALL}") from e
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name or folder.absolute().name,
            tags=tags,
            config=config,
            dir=str(folder),
            id=run_id,
            resume="allow",
        )

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def text(self, name: str, text: str, step: int) -> None:
        self.run.log({name: self.wandb.Html("<pre>" + text.replace("<", "&lt;") + "</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers(Tracker):
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        for t in self.trackers:
            t.log(record)

    def text(self, name: str, text: str, step: int) -> None:
        for t in self.trackers:
            t.text(name, text, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_trackers(cfg: Config, output_dir: str | Path, start: int | None = None) -> Trackers:
    """The trackers of a run: the console, ``output_dir/metrics.jsonl`` (cut back to the records
    up to step ``start``, the step the run starts from, when given) and those ``cfg.train.logger``
    names (``tensorboard`` → ``output_dir/tb``, ``wandb``)."""
    out, t = Path(output_dir), cfg.train
    names = [] if t.logger is None else [n.strip() for n in t.logger.split(",")]
    trackers: list[Tracker] = [Console(), JsonLines(out / "metrics.jsonl", start)]
    if "tensorboard" in names:
        trackers.append(TensorBoard(out / "tb"))
    if "wandb" in names:
        tags = [x.strip() for x in t.wandb_tags.split(",") if x.strip()] if t.wandb_tags else None
        trackers.append(
            WandB(out, project=t.wandb_project, entity=t.wandb_entity, name=t.run_name, tags=tags, config=to_dict(cfg))
        )
    return Trackers(trackers)
