"""Text in, text out: every kind of generation as rows for the sampling engine.

A :class:`Row` is one sample to draw: its noise stream ``(seed, index)``, an optional condition
(``source`` text, or ``source_ids`` as a prepared dataset holds them; conditional checkpoints) and
an optional :class:`Template` of known target tokens
(prompts and infilling; :mod:`elflm.infill` turns text into templates). Unconditional, conditional,
prompted and infilled rows are one mechanism: the row is laid out as a training row, the known
positions (the source and its EOS, the template's known tokens and the closing EOS) are encoded
by the frozen encoder and held at their clean latents during sampling
(:class:`elflm.sampling.Known`), the rest is sampled. Results do not depend on how rows are
batched: a row's draws come from its own stream (:mod:`elflm.sampling`).

Layout of a row of L tokens: with a source, ``source ids ++ EOS`` truncated to
``max_input_length`` (the condition, encoded on its own: it sees only itself), then the target:
the template (known ids, the pad id at the gaps), the closing EOS and the pad id up to L (held, as
padding is in training), or, without a template, every position generated. Known target tokens see
the source and the other known tokens, never the gaps (so the gap content cannot shape them).
Without a source the row is the template (L = its length), or L free positions.

Sharding: :func:`generate_rows` splits the rows into sampler calls of ``batch_size`` rows; with
a :class:`~elflm.distributed.Dist` of several processes (``torchrun``) rank r runs calls r, r + world,
… and every rank gets all records back in row order. A call holds the same rows however many
processes run, so the samples are those of one process, bit for bit.

Decoding: argmax of the decode head; the known ids are written back; an EOS after the last known
token ends the text (everything after it becomes the pad id), as the official decoding cuts at
the first EOS; a conditional row without template keeps ``L − max_input_length`` tokens, as the
official sampler does. Time: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import MAX_NUM_SAMPLES, SampleConfig
from .data.rows import encoder_attention_mask
from .distributed import Dist, gather_objects
from .errors import check_int
from .flow import check_seed
from .model import model_config
from .sampling import Known, Sampler, mask_after_eos, used_settings


@dataclass
class Template:
    """Known target tokens: ``ids`` (T,) int64 (the known ids, the pad id at gaps) and ``known``
    (T,) bool."""

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


@dataclass
class Row:
    """One sample to draw: the noise stream ``(seed, index)``, an optional condition ``source``
    and an optional ``template`` of known target tokens (None: every target position sampled).
    ``source_ids``: the condition as token ids, EOS included (e.g. a prepared dataset's
    ``ids[:cond_len]``), laid out as given instead of tokenising ``source``, which then only
    names the condition in the record (None: the ids decoded)."""

    index: int
    seed: int = 0
    source: str | None = None
    template: Template | None = None
    source_ids: Sequence[int] | None = None

    @property
    def conditional(self) -> bool:
        return self.source is not None or self.source_ids is not None


@dataclass
class Layout:
    """Rows laid out as one (B, L) batch: ``ids``, and (B, L) bool masks ``cond`` (the source),
    ``target`` (known target tokens and the closing EOS) and ``held`` (every position held: source,
    known target, pad tail); ``start`` (B,) where each row's output begins and ``size`` (B,) how
    many tokens it has."""

    ids: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor
    held: torch.Tensor
    start: list[int]
    size: list[int]


def pad_id(encoder, pad_token: str) -> int:
    """The id that pads rows: EOS for ``pad_token == "eos"`` (conditional configs), else the pad id."""
    return encoder.eos_id if pad_token == "eos" else encoder.pad_id


def source_ids(encoder, sources: Sequence[str]) -> list[list[int]]:
    """Token ids of each condition followed by EOS, as the training conditions are tokenised."""
    if encoder.tokenizer is None:
        raise ValueError("conditional generation needs an encoder with a tokenizer")
    return [ids + [encoder.eos_id] for ids in encoder.token_ids(list(sources))]


def truncated_sources(encoder, sources: Sequence[str], max_input_length: int) -> list[int]:
    """Indices of the conditions longer than ``max_input_length`` tokens (EOS included), which a
    row truncates."""
    return [i for i, ids in enumerate(source_ids(encoder, sources)) if len(ids) > max_input_length]


def dataset_rows(dataset, count: int, seed: int, tokenizer) -> tuple[list[Row], list[str]]:
    """The first ``count`` rows of a prepared conditional dataset (:class:`~elflm.data.PackedDataset`)
    as rows to sample, with noise streams ``(seed, k)``, and their references. A row keeps the
    condition ids exactly as training saw them (``ids[:cond_len]``, EOS included; no decode and
    re-tokenise round trip); its ``source`` and its reference are the condition and target ids
    decoded by ``tokenizer`` (special tokens skipped)."""
    if not dataset.conditional:
        raise ValueError(f"{dataset.path}: expected a conditional dataset (prepared with --max-input-length)")
    rows, refs = [], []
    for k in range(min(count, len(dataset))):
        item = dataset[k]
        ids = [int(i) for i in item["input_ids"][: item["total_len"]]]
        cond = ids[: item["cond_len"]]
        source = tokenizer.decode(cond, skip_special_tokens=True)
        rows.append(Row(k, seed, source=source, source_ids=cond))
        refs.append(tokenizer.decode(ids[item["cond_len"] :], skip_special_tokens=True))
    return rows, refs


def layout(encoder, rows: Sequence[Row], length: int | None, max_input_length: int | None, pad: int) -> Layout:
    """Lay ``rows`` out in one (B, L) batch (the rule in the module docstring). Rows must agree on
    having a source. Without sources L is the templates' length (they must all have it) or
    ``length``; with sources L = ``length``."""
    if not rows:
        raise ValueError("nothing to sample: no rows")
    conditional = rows[0].conditional
    if any(r.conditional != conditional for r in rows):
        raise ValueError("rows with and without a source cannot share a sampler call")
    sizes = {r.template.length if r.template is not None else length for r in rows}
    if conditional:
        if max_input_length is None or length is None:
            raise ValueError("a source needs a conditional checkpoint (max_input_length) and a row length")
        L = length
    elif len(sizes) != 1 or None in sizes:
        raise ValueError(f"rows of one sampler call must have the same length, got {sorted(map(str, sizes))}")
    else:
        L = sizes.pop()
    B = len(rows)
    ids = torch.full((B, L), pad, dtype=torch.long)
    cond, target = torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    held, start, size = torch.zeros(B, L, dtype=torch.bool), [], []
    srcs = [[] for _ in rows]
    if conditional:
        need = [r.source for r in rows if r.source_ids is None]
        texts = iter(source_ids(encoder, need) if need else [])
        srcs = [list(r.source_ids) if r.source_ids is not None else next(texts) for r in rows]
        empty = [r.index for r, src in zip(rows, srcs) if not src]
        if empty:
            raise ValueError(f"row {empty[0]}: source_ids is empty; a condition needs at least one token")
    for b, (r, src) in enumerate(zip(rows, srcs)):
        n = min(len(src), max_input_length or 0)
        ids[b, :n], cond[b, :n] = torch.tensor(src[:n], dtype=torch.long), True
        if r.template is None:
            start.append(n)
            size.append(L - max_input_length if conditional else L)
            continue
        T = r.template.length
        if n + T > L:
            raise ValueError(f"row {r.index}: the source ({n} tokens) and the template ({T}) do not fit in {L} tokens")
        ids[b, n : n + T] = r.template.ids
        target[b, n : n + T] = r.template.known
        if conditional and n + T < L:
            ids[b, n + T] = encoder.eos_id
            target[b, n + T] = True
            held[b, n + T :] = True
        start.append(n)
        size.append(T)
    held |= cond | target
    return Layout(ids, cond, target, held, start, size)


def known_mask(cond: torch.Tensor, target: torch.Tensor, drop: bool = False) -> torch.Tensor:
    """(B, L, L) encoder mask of held rows: the source sees only itself, every other position the
    known target tokens and (unless ``drop``, the label drop of classifier-free guidance) the
    source; a position left with nothing to see sees itself. This is SPEC §1's encoder mask with
    the known tokens as the visible columns."""
    m = encoder_attention_mask(target | (cond & (not drop)), cond).bool()
    eye = torch.eye(cond.shape[1], dtype=torch.bool, device=cond.device)
    return m | (eye & ~m.any(-1, keepdim=True))


def encode_known(encoder, lay: Layout, guidance: bool = False) -> Known | None:
    """The held positions' clean latents, or None when nothing is held; ``guidance`` adds, for
    rows with a source, the condition-dropped values of classifier-free guidance (the source
    zeroed, the known target encoded without it)."""
    if not lay.held.any():
        return None
    dev = encoder.device
    ids, cond, target = lay.ids.to(dev), lay.cond.to(dev), lay.target.to(dev)
    latents = encoder.encode(ids, known_mask(cond, target))
    dropped = None
    if guidance and cond.any():
        dropped = encoder.encode(ids, known_mask(cond, target, drop=True)).masked_fill(cond[..., None], 0.0)
    return Known(latents, lay.held.to(dev), dropped)


def finish(row: Row, ids: torch.Tensor, encoder, pad: int) -> dict:
    """The record of a row from its output ids (its ``size`` tokens from ``start``): the known ids
    written back, an EOS after the last known token ends the text."""
    t = row.template
    out = ids.clone()
    tail = 0
    if t is not None:
        out = torch.where(t.known, t.ids, out)
        known_at = t.known.nonzero()
        tail = int(known_at[-1]) + 1 if len(known_at) else 0
    out[tail:] = mask_after_eos(out[None, tail:], encoder.eos_id, pad)[0]
    ids_list = out.tolist()
    decode = lambda x: encoder.tokenizer.decode(x, skip_special_tokens=True)
    rec = {"index": row.index, "seed": row.seed, "text": decode(ids_list), "ids": ids_list}
    if row.conditional:
        rec["source"] = row.source if row.source is not None else decode(list(row.source_ids))
    if t is not None:
        rec["generated"] = (~t.known).nonzero().flatten().tolist()
        rec["gaps"] = [{"start": a, "end": b, "text": decode(ids_list[a:b])} for a, b in t.gaps()]
    return rec


@torch.no_grad()
def sample_rows(
    sampler: Sampler,
    encoder,
    rows: Sequence[Row],
    *,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    callback: Callable | None = None,
) -> list[dict]:
    """Sample ``rows`` in one sampler call and decode them; one record per row (:func:`finish`)
    with the sampler settings that were used and the row ``length``."""
    pad = pad_id(encoder, pad_token)
    lay = layout(encoder, rows, length, max_input_length, pad)
    conditional = bool(lay.cond.any())
    known = encode_known(encoder, lay, guidance=sampler.cfg.cfg_scale != 1)
    L = lay.ids.shape[1]
    state = sampler.start([r.index for r in rows], L, [r.seed for r in rows], known)
    ids = sampler.decode(sampler.sample(state, callback)).argmax(-1).cpu()
    settings = {**used_settings(sampler.cfg, conditional), "length": L}
    return [
        {**finish(r, ids[b, lay.start[b] : lay.start[b] + lay.size[b]], encoder, pad), **settings}
        for b, r in enumerate(rows)
    ]


def sampler_calls(rows: Sequence[Row], length: int, batch_size: int) -> list[list[int]]:
    """The positions in ``rows`` of each sampler call: rows that can share a call (same length,
    all with or all without a condition) in order, ``batch_size`` per call."""
    groups: dict[tuple, list[int]] = {}
    for k, r in enumerate(rows):
        size = r.template.length if r.template is not None and not r.conditional else length
        groups.setdefault((r.conditional, size), []).append(k)
    return [idx[i : i + batch_size] for idx in groups.values() for i in range(0, len(idx), batch_size)]


def generate_rows(
    model,
    encoder,
    rows: Sequence[Row],
    cfg: SampleConfig | None = None,
    *,
    batch_size: int = 32,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    precision: str = "fp32",
    compiled: bool = False,
    progress: bool = False,
    callback: Callable | None = None,
    dist: Dist | None = None,
) -> list[dict]:
    """Sample any ``rows`` with ``model`` and its frozen ``encoder`` in the sampler calls of
    :func:`sampler_calls` (``batch_size`` rows each); one record per row, in the order of ``rows``.
    ``length`` is the row length of conditional and template-free rows (default the model's
    ``max_length``); ``max_input_length`` the condition budget of a conditional checkpoint.
    ``precision``/``compiled``: :class:`~elflm.sampling.Sampler`. ``callback(i, t, t_next, z, x̂)``
    sees every step of this process's calls. ``dist``: under ``torchrun`` every rank calls this
    with the same rows, runs its share of the calls (the module docstring) and returns all records."""
    mcfg = model_config(model)
    length = mcfg.max_length if length is None else check_int("length", length, 1, mcfg.max_length)
    batch_size = check_int("batch_size", batch_size, 1)
    if max_input_length is not None:
        max_input_length = check_int("max_input_length", max_input_length, 1)
    if pad_token not in ("pad", "eos"):
        raise ValueError(f"pad_token must be 'pad' or 'eos', got {pad_token!r}")
    bad = next((r for r in rows if not isinstance(r, Row)), None)
    if bad is not None:
        raise ValueError(f"rows must be Row objects, got a {type(bad).__name__}")
    for r in rows:
        check_int("Row.index", r.index, 0)
        check_seed(r.seed, f"the seed of row {r.index}")
    if any(r.conditional for r in rows) and (max_input_length is None or not 0 < max_input_length < length):
        raise ValueError(
            f"conditional generation needs 0 < max_input_length < length ({length}), got {max_input_length}"
        )
    sampler = Sampler(model, cfg or SampleConfig(), precision=precision, compiled=compiled)
    calls = sampler_calls(rows, length, batch_size)
    if dist is not None:
        calls = calls[dist.rank :: dist.world]
    bar = None
    if progress and (dist is None or dist.main):
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, calls)), desc="sampling", unit="sample")
    done: list[tuple[int, dict]] = []
    for call in calls:
        recs = sample_rows(
            sampler,
            encoder,
            [rows[k] for k in call],
            length=length,
            max_input_length=max_input_length,
            pad_token=pad_token,
            callback=callback,
        )
        done += zip(call, recs)
        if bar is not None:
            bar.update(len(call))
    if bar is not None:
        bar.close()
    out: list[dict | None] = [None] * len(rows)
    for part in gather_objects(done, dist) if dist is not None else [done]:
        for k, rec in part:
            out[k] = rec
    return out


def generate(
    model,
    encoder,
    cfg: SampleConfig | None = None,
    num_samples: int | None = None,
    sources: Sequence[str] | None = None,
    *,
    seed: int | Sequence[int] = 0,
    batch_size: int = 32,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    precision: str = "fp32",
    compiled: bool = False,
    progress: bool = False,
    callback: Callable | None = None,
    dist: Dist | None = None,
) -> list[dict]:
    """Sample texts: ``num_samples`` unconditional rows of ``length`` tokens (default the model's
    ``max_length``), or one conditional sample per entry of ``sources`` (each condition truncated
    to ``max_input_length`` tokens; ``length − max_input_length`` tokens generated). Row k uses the
    noise stream ``(seed, k)``, so a sample does not depend on ``batch_size``; a list of seeds
    repeats the rows for each seed (records seed by seed). Returns one record per sample:
    ``index``, ``seed``, ``text``, ``ids``, ``source`` (conditional), the sampler settings used and
    ``length`` (see :func:`generate_rows` for the other arguments)."""
    seeds = [check_seed(s) for s in (list(seed) if isinstance(seed, (list, tuple, range)) else [seed])]
    if num_samples is not None:
        num_samples = check_int("num_samples", num_samples, 1, MAX_NUM_SAMPLES)
    if sources is not None:
        sources = _sequence("sources", sources)
        bad = next((s for s in sources if not isinstance(s, str)), None)
        if bad is not None:
            raise ValueError(f"sources must be strings (one condition each), got a {type(bad).__name__}")
    count = len(seeds) * (len(sources) if sources is not None else num_samples or 0)
    if count > MAX_NUM_SAMPLES:
        raise ValueError(f"{count:,} samples asked for ({len(seeds)} seeds): at most {MAX_NUM_SAMPLES:,} per call")
    if sources is not None:
        rows = [Row(k, s, source=src) for s in seeds for k, src in enumerate(sources)]
    else:
        rows = [Row(k, s) for s in seeds for k in range(num_samples or 0)]
    if not rows:
        raise ValueError("nothing to generate: give num_samples >= 1, a non-empty list of sources and of seeds")
    return generate_rows(
        model,
        encoder,
        rows,
        cfg,
        batch_size=batch_size,
        length=length,
        max_input_length=max_input_length,
        pad_token=pad_token,
        precision=precision,
        compiled=compiled,
        progress=progress,
        callback=callback,
        dist=dist,
    )


def _sequence(name: str, value) -> list:
    """``value`` as a list when it is a list, tuple or range (not a string), else a ``ValueError``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, range)):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)
