"""Infilling and arbitrary-position conditioning: known tokens anywhere in the row, only the gaps sampled.

A *template* is text with gaps, ``"The cat [MASK:12] on the mat. [MASK:40]"``, or the same as JSON
segments ``[{"text": "The cat"}, {"gap": 12}, {"text": " on the mat."}, {"gap": 40}]``. Each text
segment is tokenised on its own without special tokens and its ids are placed at their positions; a
gap of n is n positions to generate. A prompt is the template ``[prompt, gap]`` (a known prefix).

Known positions are held at their clean latents during sampling by :class:`elflm.sampling.Condition`
(restored at every step, ``v = 0`` there: the official conditional sampler's mechanism, used at
arbitrary positions). The known latents come from one encoder pass over the whole row with the
known ids in place and the pad id at the gaps, under the encoder mask of SPEC §1 with the known
tokens as the visible columns: a known token attends only to the known tokens (at their true
relative positions), never to the unknown gaps. So the known latents are those of the known text
in context of itself; the gap content cannot influence them because it does not exist yet.

Conditional checkpoints (``max_input_length`` set) get their own mechanism: the row is laid out
as a training row, ``source ++ EOS`` (truncated to ``max_input_length``), the template as the
target, EOS, then the checkpoint's pad token up to ``length`` (EOS for EOS-padded configs), so the
target is exactly the template. The source attends only to itself; known target tokens and the
closing EOS attend to the source and the known target tokens; the padding is held too and encoded
as padding is in training (it attends to those columns, nobody attends to it). With
classifier-free guidance the condition-dropped branch zeroes the source latents and holds the
known target tokens encoded without the source (the label drop of training).

After decoding, the known ids are written back at their positions (they are known; the decode of
a held latent is its token only up to the decode head's accuracy). EOS in the last gap (after the
last known token) ends the text: everything after it becomes the pad id, as in unconditional
decoding; EOS inside an interior gap is kept as an id and dropped from the text. Each record says
which positions were generated. Time: t = 0 noise, t = 1 data.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Union

import torch

from . import sampling
from .config import SampleConfig
from .objective import model_config

Segment = Union[str, int]
"""A template segment: a ``str`` is known text, an ``int`` n is a gap of n tokens."""

_MARKER = re.compile(r"\[MASK([^\[\]]*)(\]?)")
_GAP = re.compile(r":\s*(\d+)\s*")


def parse_template(text: str) -> list[Segment]:
    """``"The cat [MASK:12] on the mat."`` → ``["The cat ", 12, " on the mat."]``. Every
    ``[MASK...`` must read ``[MASK:n]`` with an integer n ≥ 1; empty text segments are dropped."""
    if not isinstance(text, str):
        raise ValueError(f"expected a template string with [MASK:n] gaps, got {type(text).__name__}")
    out: list[Segment] = []
    pos = 0
    for m in _MARKER.finditer(text):
        where = f"{m.group(0)!r} at character {m.start()}"
        if not m.group(2):
            raise ValueError(f"unclosed gap marker {where}: expected [MASK:n] with a length n >= 1")
        g = _GAP.fullmatch(m.group(1))
        if g is None:
            raise ValueError(f"malformed gap marker {where}: expected [MASK:n] with an integer length n >= 1")
        if int(g.group(1)) < 1:
            raise ValueError(f"empty gap {where}: a gap length must be >= 1")
        if m.start() > pos:
            out.append(text[pos : m.start()])
        out.append(int(g.group(1)))
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def segments_from_json(obj) -> list[Segment]:
    """``[{"text": str} | {"gap": int >= 1}, ...]`` → segments; anything else is an error naming the item."""
    if not isinstance(obj, list) or not obj:
        raise ValueError('expected a non-empty JSON list of segments {"text": "..."} or {"gap": n}')
    out: list[Segment] = []
    for k, item in enumerate(obj):
        if isinstance(item, dict) and set(item) == {"text"} and isinstance(item["text"], str):
            out.append(item["text"])
        elif isinstance(item, dict) and set(item) == {"gap"} and type(item["gap"]) is int:
            if item["gap"] < 1:
                raise ValueError(f"segment {k}: a gap length must be >= 1, got {item['gap']}")
            out.append(item["gap"])
        else:
            raise ValueError(f'segment {k}: expected {{"text": "<string>"}} or {{"gap": <integer >= 1>}}, got {item!r}')
    return out


@dataclass
class Template:
    """A target row: ``ids`` (T,) int64 (the known ids, ``pad_id`` at gaps) and ``known`` (T,) bool."""

    ids: torch.Tensor
    known: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    def gaps(self) -> list[tuple[int, int]]:
        """The ``[start, end)`` spans of the gaps."""
        spans, start = [], None
        for i, k in enumerate(self.known.tolist() + [True]):
            if not k and start is None:
                start = i
            elif k and start is not None:
                spans.append((start, i))
                start = None
        return spans


def _segment_ids(tokenizer, text: str, glued: bool) -> list[int]:
    """Ids of one text segment; after a gap, a segment that does not begin with whitespace drops a
    leading bare word-boundary piece (SentencePiece ``▁``), so ``[MASK:3].`` keeps the ``.`` glued."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if glued and ids and not text[:1].isspace() and tokenizer.convert_ids_to_tokens(ids[0]) in ("▁", "Ġ"):
        ids = ids[1:]
    return ids


def build_template(segments: list[Segment], tokenizer, pad_id: int, max_length: int | None = None) -> Template:
    """Tokenise ``segments`` (no special tokens) into a :class:`Template`; at least one gap is
    required and the total must fit in ``max_length`` tokens."""
    ids: list[int] = []
    known: list[bool] = []
    for seg in segments:
        if isinstance(seg, bool) or not isinstance(seg, (str, int)):
            raise ValueError(f"a segment is a str (known text) or an int (gap length), got {seg!r}")
        if isinstance(seg, int):
            if seg < 1:
                raise ValueError(f"a gap length must be >= 1, got {seg}")
            ids += [pad_id] * seg
            known += [False] * seg
        else:
            piece = _segment_ids(tokenizer, seg, glued=bool(known) and not known[-1])
            ids += piece
            known += [True] * len(piece)
    if all(known):
        raise ValueError("the template has no gap: add [MASK:n] (or {\"gap\": n}) where tokens should be generated")
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"the template is {len(ids)} tokens ({sum(known)} known + {len(ids) - sum(known)} in gaps), "
            f"more than the {max_length} available; shorten the text or the gaps"
        )
    return Template(torch.tensor(ids, dtype=torch.long), torch.tensor(known, dtype=torch.bool))


def make_template(template, encoder, max_length: int | None = None, pad_token: str = "pad") -> Template:
    """A :class:`Template` from a template string, a JSON segment list (dicts), a list of
    :data:`Segment` or a ready :class:`Template` (checked against ``max_length``)."""
    if isinstance(template, Template):
        if max_length is not None and template.length > max_length:
            raise ValueError(f"the template is {template.length} tokens, more than the {max_length} available")
        return template
    if isinstance(template, str):
        segments = parse_template(template)
    elif isinstance(template, list) and template and all(isinstance(s, dict) for s in template):
        segments = segments_from_json(template)
    elif isinstance(template, list):
        segments = template
    else:
        raise ValueError(f"expected a template string, a list of segments or a Template, got {type(template).__name__}")
    return build_template(segments, _tokenizer(encoder), _pad_id(encoder, pad_token), max_length)


def prompt_template(encoder, prompt: str, length: int, pad_token: str = "pad") -> Template:
    """The known prefix ``prompt`` followed by a gap up to ``length`` tokens in all."""
    n = len(_segment_ids(_tokenizer(encoder), prompt, glued=False))
    if n == 0:
        raise ValueError("the prompt is empty after tokenisation")
    if n >= length:
        raise ValueError(f"the prompt is {n} tokens, which leaves nothing to generate in a row of {length}")
    return build_template([prompt, length - n], _tokenizer(encoder), _pad_id(encoder, pad_token), length)


def _tokenizer(encoder):
    if getattr(encoder, "tokenizer", None) is None:
        raise ValueError("infilling needs an encoder with a tokenizer")
    return encoder.tokenizer


def _pad_id(encoder, pad_token: str) -> int:
    return encoder.eos_id if pad_token == "eos" else encoder.pad_id


# ----------------------------------------------------------------------------- sampling


@dataclass
class Row:
    """One sample to draw: its ``template``, an optional ``source`` (conditional checkpoints) and
    the noise stream ``(seed, index)`` (:func:`elflm.generate.batch_generator`), so a row's
    result does not depend on the rows it is batched with."""

    template: Template
    source: str | None = None
    seed: int = 0
    index: int = 0


@dataclass
class Layout:
    """A batch laid out for sampling: ``ids`` (B, L), and (B, L) bool masks ``cond`` (source),
    ``target`` (known template tokens), ``held`` (every position held fixed: source, known
    template, pad tail); ``start`` (B,) where each template begins."""

    ids: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor
    held: torch.Tensor
    start: list[int]


def source_length(encoder, source: str, max_input_length: int) -> int:
    """Tokens the condition ``source`` takes in a row (:func:`elflm.generate.condition_rows`:
    its ids and EOS, truncated to ``max_input_length``)."""
    from .generate import condition_rows

    return int(condition_rows(encoder, [source], max_input_length, max_input_length, 0)[1].sum())


def layout(encoder, rows: list[Row], length: int | None, max_input_length: int | None, pad_id: int) -> Layout:
    """Lay ``rows`` out in one (B, L) batch. Without sources every template must have the same
    length T and L = T. With sources (all rows) L = ``length`` and each row is laid out as in
    training: ``source ++ EOS`` (:func:`elflm.generate.condition_rows`), the template, EOS, and
    ``pad_id`` up to L; the closing EOS is a known target token, the padding is held but hidden."""
    from .generate import condition_rows

    if not rows:
        raise ValueError("nothing to sample: no rows")
    conditional = rows[0].source is not None
    if any((r.source is not None) != conditional for r in rows):
        raise ValueError("rows with and without a source cannot share a sampler call")
    B = len(rows)
    if conditional:
        if max_input_length is None or length is None:
            raise ValueError("a source needs a conditional checkpoint (max_input_length) and a row length")
        L = length
        ids, cond, _ = condition_rows(encoder, [r.source for r in rows], L, max_input_length, pad_id)
    else:
        L = rows[0].template.length
        if any(r.template.length != L for r in rows):
            raise ValueError(f"templates of one sampler call must have the same length, got {sorted({r.template.length for r in rows})}")
        ids, cond = torch.full((B, L), pad_id, dtype=torch.long), torch.zeros(B, L, dtype=torch.bool)
    target = torch.zeros(B, L, dtype=torch.bool)
    held = cond.clone()
    start = []
    for b, r in enumerate(rows):
        n, T = int(cond[b].sum()), r.template.length
        if n + T > L:
            raise ValueError(f"row {r.index}: the source ({n} tokens) and the template ({T}) do not fit in {L} tokens")
        ids[b, n : n + T] = r.template.ids
        target[b, n : n + T] = r.template.known
        held[b, n : n + T] = r.template.known
        if conditional and n + T < L:
            ids[b, n + T] = encoder.eos_id
            target[b, n + T] = True
            held[b, n + T :] = True
        start.append(n)
    return Layout(ids, cond, target, held, start)


def known_mask(cond: torch.Tensor, target: torch.Tensor, drop: bool = False) -> torch.Tensor:
    """(B, L, L) encoder mask: source rows see source columns; every other row sees the known
    target columns and (unless ``drop``, the label drop of CFG) the source columns; a row left
    with no column sees itself."""
    cols = target | (cond & (not drop))
    m = (cond[:, :, None] & cond[:, None, :]) | (~cond[:, :, None] & cols[:, None, :])
    eye = torch.eye(cond.shape[1], dtype=torch.bool, device=cond.device)
    return m | (eye & ~m.any(-1, keepdim=True))


def encode_known(encoder, lay: Layout, guidance: bool = False) -> sampling.Condition | None:
    """Clean latents of the held positions (a :class:`~elflm.sampling.Condition`), or None when
    nothing is held; ``guidance`` adds the condition-dropped values for classifier-free guidance."""
    if not lay.held.any():
        return None
    dev = encoder.device
    ids, cond, target = lay.ids.to(dev), lay.cond.to(dev), lay.target.to(dev)
    latents = encoder.encode(ids, known_mask(cond, target))
    unc = None
    if guidance and cond.any():
        unc = encoder.encode(ids, known_mask(cond, target, drop=True)).masked_fill(cond[..., None], 0.0)
    return sampling.Condition(latents, lay.held.to(dev), unc)


def _finish(row: Row, ids: torch.Tensor, start: int, eos: int, pad: int, tokenizer) -> dict:
    """Template-region ids with the known ids written back and EOS handling in the last gap."""
    t = row.template
    out = torch.where(t.known, t.ids, ids[start : start + t.length].cpu())
    known_pos = t.known.nonzero()
    tail = int(known_pos[-1]) + 1 if len(known_pos) else 0
    eos_at = (out[tail:] == eos).nonzero()
    if len(eos_at):
        out[tail + int(eos_at[0]) :] = pad
    ids_list = out.tolist()
    gaps = [{"start": a, "end": b, "text": tokenizer.decode(ids_list[a:b], skip_special_tokens=True)} for a, b in t.gaps()]
    return {
        "index": row.index,
        "text": tokenizer.decode(ids_list, skip_special_tokens=True),
        "ids": ids_list,
        "generated": (~t.known).nonzero().flatten().tolist(),
        "gaps": gaps,
        "seed": row.seed,
    }


@torch.no_grad()
def fill(
    model,
    encoder,
    rows: list[Row],
    cfg: SampleConfig,
    grid: torch.Tensor,
    *,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    callback: Callable | None = None,
) -> list[dict]:
    """Sample ``rows`` (see :func:`layout`) in one sampler call along ``grid`` (N + 1,) and decode.
    Row b starts from ``σ·randn`` of its own generator, which also draws its SDE noise.
    ``callback(i, t, t_next, z, x̂)`` as in :func:`elflm.sampling.sample_latents`.
    Returns one record per row (see :func:`infill`)."""
    from .generate import batch_generator

    mcfg = model_config(model)
    device = next(model.parameters()).device
    eos, pad = encoder.eos_id, _pad_id(encoder, pad_token)
    lay = layout(encoder, rows, length, max_input_length, pad)
    if not lay.cond.any():
        cfg = replace(cfg, cfg_scale=1.0)  # nothing to guide by: CFG would only drop the known tokens
    cond = encode_known(encoder, lay, guidance=cfg.cfg_scale != 1)
    gens = [batch_generator(r.seed, r.index, device) for r in rows]
    shape = (lay.ids.shape[1], mcfg.encoder_dim)

    def draw() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])

    z = draw() * cfg.noise_scale
    final = sampling.sample_latents(
        model, cfg, z, grid.to(device), cond=cond, noise=lambda i: draw(), callback=callback,
        state_dtype=torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32,
    )
    ids = sampling.decode_logits(model, final, cfg).argmax(-1).cpu()
    settings = {k: v for k, v in asdict(cfg).items() if k != "num_samples"}
    out = []
    for b, r in enumerate(rows):
        rec = {**_finish(r, ids[b], lay.start[b], eos, pad, encoder.tokenizer), **settings}
        if r.source is not None:
            rec["source"] = r.source
        out.append(rec)
    return out


@torch.no_grad()
def infill(
    model,
    encoder,
    template,
    cfg: SampleConfig | None = None,
    *,
    num_samples: int = 1,
    source: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    callback: Callable | None = None,
) -> list[dict]:
    """Fill the gaps of ``template`` (string with ``[MASK:n]``, JSON segment list, segments or a
    :class:`Template`) ``num_samples`` times. Unconditional checkpoints: the row is the template.
    With ``source`` (conditional checkpoints, ``max_input_length`` set): the row is ``length``
    tokens (default ``max_length``), the template is the target. Sample k uses the noise stream
    ``(seed, k)`` and the time grid is drawn from ``seed``, so results are reproducible.

    Returns one dict per sample: ``text``, ``ids`` (the template's T ids, known ids exactly in
    place), ``generated`` (template positions that were sampled), ``gaps`` (``start``, ``end``,
    ``text`` of each gap), ``index``, ``seed``, the sampler settings and ``source``."""
    cfg = cfg or SampleConfig()
    mcfg = model_config(model)
    if length is not None and not 0 < length <= mcfg.max_length:
        raise ValueError(f"length must be in [1, {mcfg.max_length}] (the model's max_length), got {length}")
    if source is not None:
        if max_input_length is None:
            raise ValueError("a source needs a conditional checkpoint: pass max_input_length (the checkpoint's data.max_input_length)")
        length = length or mcfg.max_length
        budget = length - source_length(encoder, source, max_input_length)
    else:
        budget = length or mcfg.max_length
    t = make_template(template, encoder, budget, pad_token)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    grid = sampling.time_grid(cfg, generator=torch.Generator().manual_seed(seed))
    out: list[dict] = []
    for start in range(0, num_samples, batch_size):
        rows = [Row(t, source, seed, k) for k in range(start, min(start + batch_size, num_samples))]
        out += fill(model, encoder, rows, cfg, grid, length=length, max_input_length=max_input_length,
                    pad_token=pad_token, callback=callback)
    return [{**r, "num_samples": num_samples} for r in out]


def continue_prompt(model, encoder, prompt: str, cfg: SampleConfig | None = None, *, length: int | None = None,
                    source: str | None = None, max_input_length: int | None = None, pad_token: str = "pad", **kw) -> list[dict]:
    """Prompted continuation: :func:`infill` of ``prompt`` followed by a gap filling the row
    (``length`` tokens, default ``max_length``; with a ``source``, what the source leaves of it)."""
    total = length or model_config(model).max_length
    budget = total - source_length(encoder, source, max_input_length) if source is not None and max_input_length else total
    t = prompt_template(encoder, prompt, budget, pad_token)
    return infill(model, encoder, t, cfg, length=length, source=source, max_input_length=max_input_length, pad_token=pad_token, **kw)


# ----------------------------------------------------------------------------- files and CLI


def read_templates(path: str | Path) -> list[dict]:
    """Templates from a JSONL file: each line a template string, a segment list, or an object
    ``{"template": <string or segment list>, "source": <optional condition>}``. Returns
    ``[{"template": ..., "source": ...}]``; errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"template file {path} does not exist")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict):
            unknown = set(obj) - {"template", "source"}
            if "template" not in obj or unknown:
                raise ValueError(f'{path}:{i}: expected {{"template": ..., "source": ...}}, got keys {sorted(obj)}')
            item = {"template": obj["template"], "source": obj.get("source")}
        elif isinstance(obj, (str, list)):
            item = {"template": obj, "source": None}
        else:
            raise ValueError(f"{path}:{i}: expected a template string, a segment list or an object, got {type(obj).__name__}")
        try:
            if isinstance(item["template"], str):
                parse_template(item["template"])
            else:
                segments_from_json(item["template"])
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
        out.append(item)
    if not out:
        raise ValueError(f"{path}: no templates found")
    return out


def add_infill_args(p) -> None:
    """``elflm sample`` options of this module: ``--prompt``, ``--infill``, ``--infill-file``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="known prefix; the rest of the row (--length) is generated")
    g.add_argument("--infill", default=None, metavar="TEMPLATE",
                   help='text with gaps, e.g. "The cat [MASK:12] on the mat. [MASK:40]"')
    g.add_argument("--infill-file", default=None, metavar="JSONL",
                   help='one template per line: a string, a segment list [{"text": ...}, {"gap": n}], '
                        'or {"template": ..., "source": ...}')


def wants_infill(a) -> bool:
    """Whether ``elflm sample`` got ``--prompt``, ``--infill`` or ``--infill-file``."""
    return any(getattr(a, k, None) is not None for k in ("prompt", "infill", "infill_file"))


def run_sample_cli(a) -> int:
    """``elflm sample --prompt / --infill / --infill-file``: ``--num-samples`` (default 1) per
    template, JSONL out (one record per sample, with ``template`` or ``prompt``)."""
    import time

    from .generate import PRECISIONS, check_output, cli_device, cli_sample_config, write_records
    from .model import ELF
    from .trajectory import recorder_from_args, save_from_args

    if a.input:
        raise ValueError('--input cannot be combined with --prompt/--infill; give conditions as "source" in --infill-file')
    items = read_templates(a.infill_file) if a.infill_file else [{"template": a.infill, "source": None}]
    check_output(a.output)
    model = ELF.from_pretrained(a.checkpoint, raw=a.raw, device=cli_device(a.device), dtype=PRECISIONS[a.precision])
    encoder, settings = model.encoder, model.pretrained
    cfg = cli_sample_config(settings.sample, a)
    data = settings.data
    max_in = a.max_input_length or data.max_input_length
    if any(item["source"] is not None for item in items) and max_in is None:
        raise ValueError(f'{a.checkpoint} is an unconditional model: remove "source" from {a.infill_file}, or pass --max-input-length')
    recorder = recorder_from_args(a, model, encoder, cfg)
    kw = dict(num_samples=a.num_samples or 1, seed=a.seed, batch_size=a.batch_size, length=a.length,
              max_input_length=max_in, pad_token=data.pad_token, callback=recorder)
    t0 = time.perf_counter()
    records = []
    for k, item in enumerate(items):
        if a.prompt is not None:
            recs, extra = continue_prompt(model, encoder, a.prompt, cfg, **kw), {"prompt": a.prompt}
        else:
            recs = infill(model, encoder, item["template"], cfg, source=item["source"], **kw)
            extra = {"template": item["template"], "template_index": k}
        for r in recs:
            records.append({**r, **extra, "sample": r["index"], "index": len(records)})
    write_records(a, records, time.perf_counter() - t0)
    save_from_args(a, recorder)
    return 0
