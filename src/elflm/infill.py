"""Infilling and prompted continuation: text with gaps becomes a :class:`~elflm.generate.Template`
of known target tokens, sampled by the rows mechanism of :mod:`elflm.generate`.

A *template* is text with gaps, ``"The cat [MASK:12] on the mat. [MASK:40]"``, or the same as JSON
segments ``[{"text": "The cat"}, {"gap": 12}, {"text": " on the mat."}, {"gap": 40}]``. Each text
segment is tokenised on its own without special tokens and its ids are placed at their positions; a
gap of n is n positions to generate. A prompt is the template ``[prompt, gap]`` (a known prefix).

Known tokens are held at their clean latents at every step (the official conditional sampler's
mechanism, used at any position); their latents come from one encoder pass in which a known token
sees only the known tokens (and the source), never the gaps, so the gap content cannot shape them.
With a source (conditional checkpoints) the template is the target after ``source ++ EOS``,
followed by EOS and padding. After decoding the known ids are written back; an EOS in the last gap
ends the text, an EOS inside an interior gap is kept as an id. Each record says which positions
were generated (``generated``) and what each gap holds (``gaps``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import MAX_NUM_SAMPLES, SampleConfig
from .errors import check_int
from .flow import check_seed
from .generate import Row, Template, generate_rows, pad_id, source_ids
from .model import model_config

Segment = str | int
"""A template segment: a ``str`` is known text, an ``int`` n is a gap of n tokens."""

MAX_GAP = 1_000_000  # tokens in one gap (a row is far shorter; the row's budget is checked too)
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
        marker = m.group(0) if len(m.group(0)) <= 30 else m.group(0)[:27] + "..."
        where = f"{marker!r} at character {m.start()}"
        if not m.group(2):
            raise ValueError(f"unclosed gap marker {where}: expected [MASK:n] with a length n >= 1")
        g = _GAP.fullmatch(m.group(1))
        if g is None:
            raise ValueError(f"malformed gap marker {where}: expected [MASK:n] with an integer length n >= 1")
        digits = g.group(1).lstrip("0") or "0"
        if len(digits) > len(str(MAX_GAP)) or int(digits) > MAX_GAP:
            shown = digits if len(digits) <= 24 else digits[:20] + "…"
            raise ValueError(
                f"gap [MASK:{shown}] at character {m.start()} is too long: a gap is at most {MAX_GAP} tokens"
            )
        if int(digits) < 1:
            raise ValueError(f"empty gap {where}: a gap length must be >= 1")
        if m.start() > pos:
            out.append(text[pos : m.start()])
        out.append(int(digits))
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
            if item["gap"] > MAX_GAP:
                raise ValueError(f"segment {k}: a gap length must be at most {MAX_GAP}, got {item['gap']}")
            out.append(item["gap"])
        else:
            raise ValueError(f'segment {k}: expected {{"text": "<string>"}} or {{"gap": <integer >= 1>}}, got {item!r}')
    return out


def segment_ids(tokenizer, text: str, glued: bool) -> list[int]:
    """Ids of one text segment; after a gap, a segment that does not begin with whitespace drops a
    leading bare word-boundary piece (SentencePiece ``▁``), so ``[MASK:3].`` keeps the ``.`` glued."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if glued and ids and not text[:1].isspace() and tokenizer.convert_ids_to_tokens(ids[0]) in ("▁", "Ġ"):
        ids = ids[1:]
    return ids


def build_template(segments: list[Segment], tokenizer, pad: int, max_length: int | None = None) -> Template:
    """Tokenise ``segments`` (no special tokens) into a :class:`Template`; at least one gap is
    required and the total must fit in ``max_length`` tokens."""
    pieces: list[int | list[int]] = []  # a gap length or the ids of a text; sizes checked before any list is built
    for seg in segments:
        if isinstance(seg, bool) or not isinstance(seg, (str, int)):
            raise ValueError(f"a segment is a str (known text) or an int (gap length), got {seg!r}")
        if isinstance(seg, int):
            if seg < 1:
                raise ValueError(f"a gap length must be >= 1, got {seg}")
            if seg > MAX_GAP:
                raise ValueError(f"a gap length must be at most {MAX_GAP}, got {seg}")
            pieces.append(seg)
        else:
            last = next((p for p in reversed(pieces) if p), None)  # the last gap or non-empty text
            pieces.append(segment_ids(tokenizer, seg, glued=isinstance(last, int)))
    gaps = sum(p for p in pieces if isinstance(p, int))
    total = gaps + sum(len(p) for p in pieces if isinstance(p, list))
    if not gaps:
        raise ValueError('the template has no gap: add [MASK:n] (or {"gap": n}) where tokens should be generated')
    if max_length is not None and total > max_length:
        raise ValueError(
            f"the template is {total} tokens ({total - gaps} known + {gaps} in gaps), "
            f"more than the {max_length} available; shorten the text or the gaps"
        )
    ids: list[int] = []
    known: list[bool] = []
    for p in pieces:
        ids += [pad] * p if isinstance(p, int) else p
        known += [False] * p if isinstance(p, int) else [True] * len(p)
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
    return build_template(segments, _tokenizer(encoder), pad_id(encoder, pad_token), max_length)


def prompt_template(encoder, prompt: str, length: int, pad_token: str = "pad") -> Template:
    """The known prefix ``prompt`` followed by a gap up to ``length`` tokens in all."""
    n = len(segment_ids(_tokenizer(encoder), prompt, glued=False))
    if n == 0:
        raise ValueError("the prompt is empty after tokenisation")
    if n >= length:
        raise ValueError(f"the prompt is {n} tokens, which leaves nothing to generate in a row of {length}")
    return build_template([prompt, length - n], _tokenizer(encoder), pad_id(encoder, pad_token), length)


def _tokenizer(encoder):
    if getattr(encoder, "tokenizer", None) is None:
        raise ValueError("infilling needs an encoder with a tokenizer")
    return encoder.tokenizer


# ----------------------------------------------------------------------------- sampling


def source_length(encoder, source: str, max_input_length: int) -> int:
    """Tokens the condition ``source`` takes in a row: its ids and EOS, truncated to ``max_input_length``."""
    return min(len(source_ids(encoder, [source])[0]), max_input_length)


def _budget(model, encoder, length: int | None, source: str | None, max_input_length: int | None) -> int:
    """Tokens a template may take: the row (``length``, default ``max_length``) less the source."""
    mcfg = model_config(model)
    if length is not None and not 0 < length <= mcfg.max_length:
        raise ValueError(f"length must be in [1, {mcfg.max_length}] (the model's max_length), got {length}")
    total = length or mcfg.max_length
    if source is None:
        return total
    if max_input_length is None:
        raise ValueError(
            "a source needs a conditional checkpoint: pass max_input_length (the checkpoint's data.max_input_length)"
        )
    return total - source_length(encoder, source, max_input_length)


def template_for(
    model,
    encoder,
    template,
    length: int | None = None,
    source: str | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
) -> Template:
    """:func:`make_template` checked against what the row leaves for it (see :func:`infill`)."""
    return make_template(template, encoder, _budget(model, encoder, length, source, max_input_length), pad_token)


def prompt_for(
    model,
    encoder,
    prompt: str,
    length: int | None = None,
    source: str | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
) -> Template:
    """:func:`prompt_template` filling what the row leaves (see :func:`continue_prompt`)."""
    return prompt_template(encoder, prompt, _budget(model, encoder, length, source, max_input_length), pad_token)


def infill(
    model,
    encoder,
    template,
    cfg: SampleConfig | None = None,
    *,
    num_samples: int = 1,
    source: str | None = None,
    seed: int = 0,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    **kw,
) -> list[dict]:
    """Fill the gaps of ``template`` (string with ``[MASK:n]``, JSON segment list, segments or a
    :class:`~elflm.generate.Template`) ``num_samples`` times; sample k uses the noise stream
    ``(seed, k)``. Unconditional checkpoints: the row is the template. With ``source``
    (conditional checkpoints, ``max_input_length`` set) the row is ``length`` tokens (default
    ``max_length``) and the template is the target. Other keywords go to
    :func:`~elflm.generate.generate_rows` (``batch_size``, ``precision``, ``callback`` ...).

    Returns one dict per sample: ``text``, ``ids`` (the template's T ids, known ids exactly in
    place), ``generated`` (template positions that were sampled), ``gaps`` (``start``, ``end``,
    ``text`` of each gap), ``index``, ``seed``, the sampler settings and ``source``."""
    t = template_for(model, encoder, template, length, source, max_input_length, pad_token)
    return _sample(model, encoder, t, cfg, num_samples, source, seed, length, max_input_length, pad_token, kw)


def continue_prompt(
    model,
    encoder,
    prompt: str,
    cfg: SampleConfig | None = None,
    *,
    num_samples: int = 1,
    source: str | None = None,
    seed: int = 0,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    **kw,
) -> list[dict]:
    """Prompted continuation: :func:`infill` of ``prompt`` followed by a gap filling the row
    (``length`` tokens, default ``max_length``; with a ``source``, what the source leaves of it)."""
    t = prompt_for(model, encoder, prompt, length, source, max_input_length, pad_token)
    return _sample(model, encoder, t, cfg, num_samples, source, seed, length, max_input_length, pad_token, kw)


def _sample(model, encoder, t, cfg, num_samples, source, seed, length, max_input_length, pad_token, kw) -> list[dict]:
    num_samples = check_int("num_samples", num_samples, 1, MAX_NUM_SAMPLES)
    seed = check_seed(seed)
    rows = [Row(k, seed, source, t) for k in range(num_samples)]
    if source is not None:
        length = length or model_config(model).max_length
    return generate_rows(
        model, encoder, rows, cfg, length=length, max_input_length=max_input_length, pad_token=pad_token, **kw
    )


# ----------------------------------------------------------------------------- files


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
            raise ValueError(
                f"{path}:{i}: expected a template string, a segment list or an object, got {type(obj).__name__}"
            )
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
