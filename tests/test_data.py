"""Prepared data: `elflm prepare` on text / JSONL / TSV / parallel files and Hugging Face datasets
(the authors' pre-tokenised layouts included), determinism across workers, resuming, bad input,
the memory-mapped dataset in a DataLoader. Row and mask math: test_rows.py."""

import gzip
import json
import pickle
import sys

import numpy as np
import pytest
import torch

from elflm.data import PackedDataset, build_rows, collate, load_hf_dataset, prepare
from elflm.data.readers import _looks_like_saved_metadata

from conftest import load_npz, need_module, read_gzip_text
from golden_utils import EOS, PAD, assert_batch, golden_id_lists


@pytest.fixture(scope="module")
def g(golden_dir):
    return load_npz("t5_encoder.npz")


@pytest.fixture(scope="module")
def tok(t5_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(t5_tokenizer_dir)


def ids(tok, texts):
    return tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def shard_bytes(path):
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.bin"))}


# ----------------------------------------------------------------------------- text corpora


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, assets_dir):
    """A gutenberg slice (3 documents, .txt.gz) and a small file with invalid UTF-8 and empty
    documents; returns the folder and the documents as the reader sees them."""
    books = read_gzip_text(assets_dir / "text/gutenberg/val-00.txt.gz").split("\n<|endoftext|>\n")
    docs = [books[0][:40000], books[1][:25000], books[3][:15000]]
    d = tmp_path_factory.mktemp("corpus")
    with gzip.open(d / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n<|endoftext|>\n".join(docs) + "\n")
    (d / "b.txt").write_bytes(
        b"caf\xe9 au lait\nsecond line\n<|endoftext|>\n  \n<|endoftext|>\n<|endoftext|>\nlast document\n"
    )
    return d, docs + ["caf\ufffd au lait\nsecond line", "  ", "last document"]


def test_pack_text_corpus(corpus, tok, tmp_path):
    d, docs = corpus
    for sep in ("none", "eos"):
        out = tmp_path / sep
        meta = prepare(
            [d],
            out,
            tokenizer=tok.name_or_path,
            max_length=128,
            separator=sep,
            workers=1,
            chunk_size=9000,
            shard_rows=100,
            progress=False,
        )
        stream = [t for doc in ids(tok, docs) if doc for t in doc + ([EOS] if sep == "eos" else [])]
        ds = PackedDataset(out)
        assert len(ds) == meta["rows"] == -(-len(stream) // 128) and len(meta["shards"]) > 1
        got = np.concatenate([ds[i]["input_ids"][: ds[i]["total_len"]] for i in range(len(ds))])
        assert got.tolist() == stream
        assert all(ds[i]["total_len"] == 128 and ds[i]["cond_len"] == 0 for i in range(len(ds) - 1))
        assert (ds[-1]["input_ids"][ds[-1]["total_len"] :] == PAD).all()
        c = meta["counts"]
        assert (c["documents"], c["empty_documents"], c["decode_errors"], c["padded_rows"]) == (6, 1, 1, 1)
        assert c["tokens"] == meta["tokens"] == len(stream)
        assert (
            meta["dtype"] == "uint16" and meta["options"]["separator"] == sep and meta["tokenizer"]["size"] == len(tok)
        )


def test_documents_split_across_chunks(tok, tmp_path):
    # chunk_size 1: every line is its own piece and chunk, so documents span chunks and the last
    # piece of the first document has no tokens
    docs = ["hello there\nworld\n   ", "  \n", "x y"]
    (tmp_path / "c.txt").write_text("\n<|endoftext|>\n".join(docs) + "\n")
    kw = dict(tokenizer=tok.name_or_path, max_length=4, separator="eos", workers=1, progress=False)
    meta = prepare(tmp_path / "c.txt", tmp_path / "one", chunk_size=1, **kw)
    assert prepare(tmp_path / "c.txt", tmp_path / "big", **kw)["counts"] == meta["counts"]
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "big")
    ds = PackedDataset(tmp_path / "one")
    got = np.concatenate([ds[i]["input_ids"][: ds[i]["total_len"]] for i in range(len(ds))]).tolist()
    assert got == [t for doc in ids(tok, docs) if doc for t in doc + [EOS]]
    assert (meta["counts"]["documents"], meta["counts"]["empty_documents"]) == (3, 1)


def test_workers_give_identical_shards_and_resume(corpus, tok, tmp_path):
    d, _ = corpus
    kw = dict(tokenizer=tok.name_or_path, max_length=64, chunk_size=6000, shard_rows=200, progress=False)
    prepare([d], tmp_path / "w1", workers=1, **kw)
    meta2 = prepare([d], tmp_path / "w2", workers=2, keep_work=True, **kw)
    want = shard_bytes(tmp_path / "w1")
    assert len(want) >= 4 and shard_bytes(tmp_path / "w2") == want
    assert json.loads((tmp_path / "w1/meta.json").read_text()) == meta2
    # a run killed while tokenising: no meta.json or shards, some chunks missing, a half-written one
    out, work = tmp_path / "w2", tmp_path / "w2/.prepare-work"
    for f in [out / "meta.json", *out.glob("*.bin")]:
        f.unlink()
    chunks = sorted(work.glob("chunk-*.npz"))
    assert len(chunks) >= 8
    for f in chunks[2:4]:
        f.unlink()
    (work / chunks[3].name).with_suffix(".npz.tmp").write_bytes(b"partial")
    kept = {f.name: f.stat().st_mtime_ns for f in chunks if f.exists()}
    with pytest.raises(FileNotFoundError, match="resume"):
        PackedDataset(out)
    prepare([d], out, workers=2, keep_work=True, **kw)
    assert {f.name: f.stat().st_mtime_ns for f in chunks if f.name in kept} == kept  # done chunks were not redone
    assert all(f.exists() for f in chunks) and not list(work.glob("*.tmp")) and shard_bytes(out) == want
    # an unchanged rerun is a no-op (that clears the chunks); other options need overwrite
    assert prepare([d], out, workers=1, **kw) == meta2 and not work.exists()
    with pytest.raises(ValueError, match="overwrite"):
        prepare([d], out, workers=1, **{**kw, "max_length": 32})
    assert prepare([d], out, workers=1, overwrite=True, **{**kw, "max_length": 32})["max_length"] == 32


# ----------------------------------------------------------------------------- conditional pairs


@pytest.fixture(scope="module")
def pairs(assets_dir):
    rd = lambda p: read_gzip_text(assets_dir / p).splitlines()
    return (
        assets_dir / "text/multi30k/val.de.gz",
        assets_dir / "text/multi30k/val.en.gz",
        list(zip(rd("text/multi30k/val.de.gz"), rd("text/multi30k/val.en.gz"))),
    )


def test_conditional_formats_agree(pairs, tok, tmp_path):
    de, en, rows = pairs
    kw = dict(tokenizer=tok.name_or_path, max_length=40, max_input_length=24, workers=1, progress=False)
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"de": s, "en": t}) + "\n" + ("\n" if i == 3 else "") for i, (s, t) in enumerate(rows))
    )
    (tmp_path / "p.tsv").write_text("id\ten\tde\n" + "".join(f"{i}\t{t}\t{s}\n" for i, (s, t) in enumerate(rows)))
    metas = {
        "parallel": prepare([de, en], tmp_path / "parallel", format="parallel", **kw),
        "jsonl": prepare(tmp_path / "p.jsonl", tmp_path / "jsonl", source_field="de", target_field="en", **kw),
        "tsv": prepare(tmp_path / "p.tsv", tmp_path / "tsv", source_field="de", target_field="en", **kw),
    }
    assert shard_bytes(tmp_path / "jsonl") == shard_bytes(tmp_path / "parallel") == shard_bytes(tmp_path / "tsv")
    assert metas["jsonl"]["counts"]["empty_lines"] == 1
    src = [x + [EOS] for x in ids(tok, [s for s, _ in rows])]
    tgt = [x + [EOS] for x in ids(tok, [t for _, t in rows])]
    want_rows, want_lengths = build_rows(tgt, 40, EOS, conditions=src, max_input_length=24)
    ds = PackedDataset(tmp_path / "parallel")
    assert ds.conditional and ds.pad_id == EOS and ds.max_input_length == 24 and len(ds) == len(rows)
    got = np.stack([ds[i]["input_ids"] for i in range(len(ds))])
    assert np.array_equal(got, want_rows) and np.array_equal(
        np.stack([[ds[i]["cond_len"], ds[i]["total_len"]] for i in range(len(ds))]), want_lengths
    )
    c = metas["parallel"]["counts"]
    assert c["pairs"] == len(rows)
    assert c["truncated_conditions"] == sum(len(s) > 24 for s in src)
    assert c["truncated_rows"] == sum(min(len(s), 24) + len(t) > 40 for s, t in zip(src, tgt))


# the first two rows of the authors' wmt14_de-en_validation_t5 (columns input, target,
# condition_input_ids, input_ids): both sides end with EOS
WMT = [
    (
        "Eine republikanische Strategie, um der Wiederwahl von Obama entgegenzutreten",
        "A Republican strategy to counter the re-election of Obama",
        [2820, 3, 60, 9188, 8654, 152, 2014, 22946, 15, 6, 561, 74, 15158, 13963, 193, 4534, 20060, 1000, 8112, 1],
        [71, 8994, 1998, 12, 3485, 8, 3, 60, 18, 15, 12252, 13, 4534, 1],
    ),
    (
        "Die Führungskräfte der Republikaner rechtfertigen ihre Politik mit der Notwendigkeit, "
        "den Wahlbetrug zu bekämpfen.",
        "Republican leaders justified their policy by the need to combat electoral fraud.",
        [
            316,
            13775,
            7,
            16657,
            74,
            419,
            9188,
            8654,
            9,
            687,
            3,
            2819,
            8741,
            35,
            1159,
            6907,
            4414,
            181,
            74,
            933,
            210,
            989,
            5335,
            6,
            177,
            8403,
            346,
            18764,
            170,
            36,
            20854,
            29,
            5,
            1,
        ],
        [8994, 2440, 24125, 70, 1291, 57, 8, 174, 12, 4719, 16289, 7712, 5, 1],
    ),
]


def test_conditional_text_is_tokenised_like_the_authors_sets(tok, tmp_path):
    (tmp_path / "wmt.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t, _, _ in WMT))
    prepare(
        tmp_path / "wmt.jsonl",
        tmp_path / "o",
        tokenizer=tok.name_or_path,
        max_length=48,
        max_input_length=24,
        workers=1,
        progress=False,
    )
    ds = PackedDataset(tmp_path / "o")
    rows, lengths = build_rows([w[3] for w in WMT], 48, EOS, conditions=[w[2] for w in WMT], max_input_length=24)
    assert np.array_equal(np.stack([ds[i]["input_ids"] for i in range(2)]), rows)
    assert [[ds[i]["cond_len"], ds[i]["total_len"]] for i in range(2)] == lengths.tolist() == [[20, 34], [24, 38]]


def test_summaries_truncation_counts(assets_dir, tok, tmp_path):
    path = assets_dir / "text/summaries/scitldr_a_dev.jsonl.gz"
    meta = prepare(
        path,
        tmp_path / "s",
        tokenizer=tok.name_or_path,
        max_length=96,
        max_input_length=64,
        source_field="document",
        target_field="summary",
        workers=2,
        chunk_size=50000,
        progress=False,
    )
    recs = [json.loads(line) for line in read_gzip_text(path).splitlines()]
    src = [len(x) + 1 for x in ids(tok, [r["document"] for r in recs])]
    tgt = [len(x) + 1 for x in ids(tok, [r["summary"] for r in recs])]
    c = meta["counts"]
    assert c["pairs"] == meta["rows"] == len(recs)
    assert c["truncated_conditions"] == sum(s > 64 for s in src) > 0
    assert meta["tokens"] == sum(min(min(s, 64) + t, 96) for s, t in zip(src, tgt))


# ----------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture(scope="module")
def hf():
    return need_module("datasets", "pip install 'elflm[data]'")


def test_authors_pretokenised_layouts_reproduce_golden(hf, g, tok, tmp_path):
    uncond, conds, targets = golden_id_lists(g)
    features = hf.Features(
        {
            "input": hf.Value("string"),
            "target": hf.Value("string"),
            "index": hf.Value("int64"),
            "condition_input_ids": hf.List(hf.Value("int64")),
            "condition_sequence_length": hf.Value("int64"),
            "input_ids": hf.List(hf.Value("int32")),
            "sequence_length": hf.Value("int64"),
        }
    )
    hf.Dataset.from_dict(
        {
            "input": ["-"] * 3,
            "target": ["-"] * 3,
            "index": [0, 1, 2],
            "condition_input_ids": conds,
            "condition_sequence_length": [len(c) for c in conds],
            "input_ids": targets,
            "sequence_length": [len(t) for t in targets],
        },
        features=features,
    ).save_to_disk(tmp_path / "wmt14_de-en_validation_t5")
    hf.Dataset.from_dict({"input_ids": uncond}).save_to_disk(tmp_path / "openwebtext-t5")
    kw = dict(tokenizer=tok.name_or_path, max_length=16, workers=1, progress=False)
    cond = prepare(tmp_path / "wmt14_de-en_validation_t5", tmp_path / "cond", max_input_length=8, **kw)
    unc = prepare(tmp_path / "openwebtext-t5", tmp_path / "uncond", **kw)
    assert unc["options"]["packing"] == "rows" and unc["counts"]["truncated_rows"] == 1
    assert cond["counts"]["truncated_conditions"] == cond["counts"]["truncated_rows"] == 1
    for name in ("uncond", "cond"):
        ds = PackedDataset(tmp_path / name)
        assert_batch(collate([ds[i] for i in range(3)]), g, name)
    hf.Dataset.from_dict({"input_ids": [[5, 40000]]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(ValueError, match="40000 is outside"):
        prepare(tmp_path / "bad", tmp_path / "bad_out", **kw)


def test_hf_text_dataset_matches_jsonl(hf, corpus, tok, tmp_path):
    _, docs = corpus
    hf.DatasetDict(
        {"train": hf.Dataset.from_dict({"body": docs}), "test": hf.Dataset.from_dict({"body": docs[:1]})}
    ).save_to_disk(tmp_path / "dd")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": x}) + "\n" for x in docs))
    kw = dict(tokenizer=tok.name_or_path, max_length=64, text_field="body", workers=1, chunk_size=7000, progress=False)
    with pytest.raises(ValueError, match="choose one with --split"):
        prepare(tmp_path / "dd", tmp_path / "x", **kw)
    a = prepare(tmp_path / "dd", tmp_path / "hf", split="train", **kw)
    b = prepare(tmp_path / "d.jsonl", tmp_path / "jsonl", **kw)
    assert shard_bytes(tmp_path / "hf") == shard_bytes(tmp_path / "jsonl") and a["counts"]["documents"] == len(docs)
    assert len(load_hf_dataset(str(tmp_path / "dd"), "test")) == 1
    assert _looks_like_saved_metadata(
        hf.Dataset.from_dict({"_data_files": [[{"filename": "x"}]], "_fingerprint": ["f"]})
    )
    assert not _looks_like_saved_metadata(hf.Dataset.from_dict({"input_ids": [[1]]}))
    assert b["sources"][0]["format"] == "jsonl"


def test_missing_datasets_extra(tmp_path, monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"elflm\[data\]"):
        prepare("some/dataset", tmp_path / "o", format="hf", tokenizer=tok.name_or_path, progress=False)


# ----------------------------------------------------------------------------- errors, CLI


def test_bad_inputs(tmp_path, tok):
    kw = dict(tokenizer=tok.name_or_path, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="input not found"):
        prepare(tmp_path / "nope.txt", tmp_path / "o", **kw)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown input format"):
        prepare(tmp_path / "x.csv", tmp_path / "o", **kw)
    (tmp_path / "empty.txt").write_text("\n  \n<|endoftext|>\n\n")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(tmp_path / "empty.txt", tmp_path / "o", **kw)
    (tmp_path / "void.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(tmp_path / "void.txt", tmp_path / "o", **kw)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        prepare(tmp_path / "bad.jsonl", tmp_path / "o", **kw)
    (tmp_path / "f.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(ValueError, match=r"f.jsonl:1: no field 'text'"):
        prepare(tmp_path / "f.jsonl", tmp_path / "o", **kw)
    (tmp_path / "s.txt").write_text("a\nb\n")
    (tmp_path / "t.txt").write_text("a\n")
    with pytest.raises(ValueError, match="not line-aligned"):
        prepare([tmp_path / "s.txt", tmp_path / "t.txt"], tmp_path / "o", format="parallel", max_input_length=4, **kw)
    with pytest.raises(ValueError, match="plain text holds no"):
        prepare(tmp_path / "s.txt", tmp_path / "o", max_input_length=4, **kw)
    with pytest.raises(ValueError, match="max_input_length < max_length"):
        prepare(tmp_path / "f.jsonl", tmp_path / "o", max_length=8, max_input_length=8, **kw)
    with pytest.raises(FileNotFoundError, match="not found"):
        PackedDataset(tmp_path / "missing")


def test_cli_prepare(corpus, tok, tmp_path, capsys):
    from elflm.cli import main

    d, _ = corpus
    out = tmp_path / "cli"
    assert (
        main(
            [
                "prepare",
                str(d / "b.txt"),
                "-o",
                str(out),
                "--tokenizer",
                tok.name_or_path,
                "--max-length",
                "8",
                "--separator",
                "eos",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "decode errors 1" in printed and "empty documents 1" in printed and "tokens/s" in printed
    assert PackedDataset(out).meta["options"]["separator"] == "eos"
    assert main(["prepare", str(tmp_path / "nope.txt"), "-o", str(out)]) == 2
    assert "input not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- dataset


def test_dataset_in_a_dataloader(corpus, tok, tmp_path):
    d, _ = corpus
    prepare([d], tmp_path / "p", tokenizer=tok.name_or_path, max_length=32, shard_rows=64, workers=1, progress=False)
    ds = PackedDataset(tmp_path / "p")
    assert len(pickle.dumps(ds)) < 10_000  # the shards are reopened, not copied
    assert np.array_equal(pickle.loads(pickle.dumps(ds))[100]["input_ids"], ds[100]["input_ids"])
    assert isinstance(ds[5]["input_ids"], np.memmap)
    sampler = list(range(1, len(ds), 2))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=8, sampler=sampler, collate_fn=collate, num_workers=2, drop_last=True
    )
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape == (8, 32) and batch["input_ids"].dtype == torch.int64
        assert batch["encoder_attention_mask"].shape == (8, 32, 32)
        seen.append(batch["input_ids"])
    order = sampler
    assert torch.equal(
        torch.cat(seen),
        torch.from_numpy(np.stack([ds[i]["input_ids"] for i in order[: len(seen) * 8]]).astype(np.int64)),
    )
    with pytest.raises(IndexError):
        ds[len(ds)]
