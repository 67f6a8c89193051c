"""Trajectory view: the text of x̂ at every sampling step, as a self-contained HTML page and a PNG strip.

:class:`Trajectory` is a ``callback`` for :meth:`elflm.sampling.Sampler.sample` (or
:func:`elflm.generate.generate`, :func:`elflm.infill.infill`): at step i it decodes the current clean
estimate x̂ (B, L, C) with the decode head exactly like the final decode (t = ``cfg.t_final``, zero
self-conditioning input, argmax) and keeps the ids and times of the first ``max_samples`` rows (every
row has its own time grid). Only the first sampler call is recorded (a call starts when step 0 comes
again). Time: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import sampling
from .config import SampleConfig
from .files import write_atomic, write_text


@dataclass
class Step:
    """One sampler step: the recorded rows' times ``t → t_next`` (S,) and the decoded ids (S, L)
    of x̂ after it."""

    index: int
    t: torch.Tensor
    t_next: torch.Tensor
    ids: torch.Tensor


@dataclass
class Trajectory:
    """Callback ``(i, t, t_next, z, x̂)`` recording decoded x̂ of up to ``max_samples`` rows per step."""

    model: object
    tokenizer: object
    cfg: SampleConfig
    max_samples: int = 4
    steps: list[Step] = field(default_factory=list)
    done: bool = False

    @torch.no_grad()
    def __call__(self, i: int, t: torch.Tensor, t_next: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> None:
        if self.done or (i == 0 and self.steps):
            self.done = True
            return
        S = self.max_samples
        logits = sampling.decode_logits(self.model, x[:S], self.cfg)
        self.steps.append(Step(i, t[:S].float().cpu(), t_next[:S].float().cpu(), logits.argmax(-1).cpu()))

    @property
    def num_samples(self) -> int:
        return int(self.steps[0].ids.shape[0]) if self.steps else 0

    def texts(self, sample: int = 0) -> list[str]:
        """Decoded text of ``sample`` at every step (up to its first EOS, special tokens dropped)."""
        return [
            self.tokenizer.decode(_until_eos(s.ids[sample], self.tokenizer), skip_special_tokens=True)
            for s in self.steps
        ]


def _until_eos(ids: torch.Tensor, tokenizer) -> list[int]:
    ids = ids.tolist()
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


def _pieces(tokenizer, ids: list[int], cache: dict) -> list[str]:
    """Display text of each token: its decode, with the word-boundary space of SentencePiece /
    byte-level BPE pieces put back."""
    out = []
    for i in ids:
        if i not in cache:
            piece = tokenizer.convert_ids_to_tokens(i) or ""
            text = tokenizer.decode([i])
            if piece[:1] in ("▁", "Ġ") and not text.startswith(" "):
                text = " " + text
            cache[i] = text
        out.append(cache[i])
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f4f4f4;position:sticky;top:0}
td.num{font-family:ui-monospace,monospace;white-space:nowrap;text-align:right}
td.txt{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
span.chg{background:#ffe08a}
span.sp{color:#aaa}
span.t{display:block;color:#777;font-size:85%}
.bar{display:inline-block;height:8px;background:#4a7bd0}
"""


def render_html(traj: Trajectory, title: str = "ELF sampling trajectory") -> str:
    """A self-contained page (inline CSS, no scripts or external assets): one table row per step
    with its index, the number of tokens that changed since the previous step and, per recorded
    sample, its ``t → t_next`` and the decoded x̂ with changed tokens highlighted."""
    if not traj.steps:
        raise ValueError("the trajectory is empty: was it passed as callback to a sampler?")
    tok, cache = traj.tokenizer, {}
    special = set(tok.all_special_ids)
    S = traj.num_samples
    head = "".join(f"<th>sample {s}</th>" for s in range(S))
    rows, prev = [], None
    for step in traj.steps:
        cells, changed = [], 0
        for s in range(S):
            ids = step.ids[s].tolist()
            diff = [True] * len(ids) if prev is None else [a != b for a, b in zip(ids, prev[s].tolist())]
            changed += sum(diff)
            end = max((k + 1 for k, i in enumerate(ids) if i not in special), default=0)
            spans = []
            for k, (i, text) in enumerate(zip(ids[:end], _pieces(tok, ids[:end], cache))):
                cls = "sp" if i in special else ("chg" if diff[k] and prev is not None else "")
                text = "·" if i in special else text
                spans.append(f'<span class="{cls}">{html.escape(text)}</span>' if cls else html.escape(text))
            if end < len(ids):
                spans.append(f'<span class="sp"> ·×{len(ids) - end}</span>')
            when = f'<span class="t">t {float(step.t[s]):.4f} → {float(step.t_next[s]):.4f}</span>'
            cells.append(f'<td class="txt">{when}{"".join(spans)}</td>')
        width = max(1, round(100 * changed / max(1, step.ids.numel())))
        rows.append(
            f'<tr><td class="num">{step.index}</td>'
            f'<td class="num">{changed} <span class="bar" style="width:{width}px"></span></td>{"".join(cells)}</tr>'
        )
        prev = step.ids
    c = traj.cfg
    info = (
        f"{len(traj.steps)} steps, method {c.method}, grid {c.grid}, w {c.w}, γ {c.gamma}, "
        f"t_final {c.t_final}; x̂ decoded with the decode head at every step; "
        "highlighted tokens changed since the previous step, · marks special tokens (padding, EOS)"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(info)}</p>\n"
        f"<table>\n<thead><tr><th>step</th><th>changed</th>{head}</tr></thead>\n"
        f"<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>\n</body>\n</html>\n"
    )


def write_html(traj: Trajectory, path: str | Path, title: str = "ELF sampling trajectory") -> Path:
    """Write :func:`render_html` to ``path`` (UTF-8, atomically)."""
    return write_text(path, render_html(traj, title))


def require_matplotlib(hint: str = "pip install 'elflm[plots]'") -> None:
    """Fail early, naming the install command, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(f"this needs matplotlib: {hint}") from e


def write_png(traj: Trajectory, path: str | Path, sample: int = 0, width: int = 110) -> Path:
    """PNG strip of one sample: left, which positions already hold their final token at each step
    (steps × L); right, the decoded text of each step (cut to ``width`` characters) with its t.
    Needs matplotlib (``pip install 'elflm[plots]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the trajectory PNG needs matplotlib: pip install 'elflm[plots]'") from e
    if not traj.steps:
        raise ValueError("the trajectory is empty: was it passed as callback to a sampler?")
    ids = torch.stack([s.ids[sample] for s in traj.steps])  # (N, L)
    settled = (ids == ids[-1:]).float().numpy()
    texts = traj.texts(sample)
    N = len(texts)
    fig, (ax_map, ax_txt) = plt.subplots(
        1, 2, figsize=(14, 1.2 + 0.28 * N), gridspec_kw={"width_ratios": [1, 4]}, squeeze=True
    )
    ax_map.imshow(settled, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax_map.set_yticks(range(N), [f"{float(s.t_next[sample]):.3f}" for s in traj.steps], fontsize=7)
    ax_map.set_ylabel("t after step")
    ax_map.set_xlabel("position (dark: final token)")
    ax_txt.set_xlim(0, 1)
    ax_txt.set_ylim(N - 0.5, -0.5)
    ax_txt.axis("off")
    for k, text in enumerate(texts):
        line = " ".join(text.split())
        line = line if len(line) <= width else line[: width - 1] + "…"
        ax_txt.text(0, k, line, fontsize=7, family="monospace", va="center")
    fig.suptitle(f"x̂ decoded at each of {N} steps (t = 0 noise → t = 1 data)", fontsize=10)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    finally:
        plt.close(fig)
