"""Infilling and prompted continuation: template parsing, layout, held latents, exact known tokens, CLI."""

import json
from dataclasses import replace

import pytest
import torch

from elflm import infill
from elflm.cli import main
from elflm.config import SampleConfig
from elflm.generate import Row, encode_known, finish, known_mask, layout, sample_rows
from elflm.model import ELF
from elflm.sampling import Sampler

from tiny_model import make_tiny_model

CFG = SampleConfig(method="sde", steps=4, grid="logit_normal")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, t5_tokenizer_dir):
    root = tmp_path_factory.mktemp("infill")
    return make_tiny_model(root / "unc", t5_tokenizer_dir), make_tiny_model(
        root / "cond", t5_tokenizer_dir, max_input_length=16
    )


@pytest.fixture(scope="module")
def unc(folders):
    model = ELF.from_pretrained(folders[0])
    enc = model.encoder
    return model, enc


@pytest.fixture(scope="module")
def cond(folders):
    model = ELF.from_pretrained(folders[1])
    enc = model.encoder
    return model, enc


# ----------------------------------------------------------------------------- parsing


def test_parse_template():
    assert infill.parse_template("The cat [MASK:12] on the mat. [MASK:40]") == ["The cat ", 12, " on the mat. ", 40]
    assert infill.parse_template("[MASK: 3 ]x") == [3, "x"]
    assert infill.parse_template("no gap") == ["no gap"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("a [MASK:0] b", "gap length must be >= 1"),
        ("a [MASK:x] b", "malformed gap marker '[MASK:x]' at character 2"),
        ("a [MASK:-2]", "malformed"),
        ("a [MASK] b", "malformed"),
        ("a [MASK:3 b", "unclosed gap marker"),
    ],
)
def test_parse_template_errors(text, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        infill.parse_template(text)


def test_segments_from_json():
    assert infill.segments_from_json([{"text": "a"}, {"gap": 2}]) == ["a", 2]
    for bad, words in [
        ([], "non-empty"),
        ([{"gap": 0}], "segment 0: a gap length must be >= 1"),
        ([{"text": "a"}, {"gap": "3"}], "segment 1"),
        ([{"gap": True}], "segment 0"),
        ([{"text": 1}], "segment 0"),
        ([{"text": "a", "gap": 1}], "segment 0"),
    ]:
        with pytest.raises(ValueError, match=words):
            infill.segments_from_json(bad)


def test_build_template_places_ids(unc):
    _, enc = unc
    tok = enc.tokenizer
    t = infill.make_template("The cat [MASK:3] on the mat.[MASK:2]", enc)
    head, tail = (
        tok("The cat", add_special_tokens=False)["input_ids"],
        tok(" on the mat.", add_special_tokens=False)["input_ids"],
    )
    assert t.length == len(head) + 3 + len(tail) + 2
    assert t.ids[: len(head)].tolist() == head and t.ids[len(head) + 3 : len(head) + 3 + len(tail)].tolist() == tail
    assert t.gaps() == [(len(head), len(head) + 3), (t.length - 2, t.length)]
    assert t.known.sum() == len(head) + len(tail)
    # JSON segments give the same template; punctuation after a gap stays glued (no bare "▁" piece)
    same = infill.make_template([{"text": "The cat "}, {"gap": 3}, {"text": " on the mat."}, {"gap": 2}], enc)
    assert torch.equal(same.ids, t.ids) and torch.equal(same.known, t.known)
    glued = infill.make_template("cat[MASK:2].", enc)
    assert (
        glued.ids[-1].item() == tok.convert_tokens_to_ids(".")
        and glued.length == len(tok("cat", add_special_tokens=False)["input_ids"]) + 3
    )


def test_template_errors(unc):
    _, enc = unc
    with pytest.raises(ValueError, match="no gap"):
        infill.make_template("nothing to fill", enc)
    with pytest.raises(
        ValueError, match=r"the template is 70 tokens \(0 known \+ 70 in gaps\), more than the 64 available"
    ):
        infill.make_template("[MASK:70]", enc, max_length=64)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        infill.prompt_template(enc, "one two three four", 3)


def test_read_templates(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('"a [MASK:2]"\n\n[{"text": "b"}, {"gap": 1}]\n{"template": "c [MASK:1]", "source": "s"}\n')
    assert infill.read_templates(f) == [
        {"template": "a [MASK:2]", "source": None},
        {"template": [{"text": "b"}, {"gap": 1}], "source": None},
        {"template": "c [MASK:1]", "source": "s"},
    ]
    for text, words in [
        ('"a [MASK:0]"\n', ":1: empty gap"),
        ('{"tmpl": "a"}\n', ":1: expected"),
        ("not json\n", ":1: not valid JSON"),
        ('"ok [MASK:1]"\n[{"gap": -1}]\n', ":2: segment 0"),
    ]:
        f.write_text(text)
        with pytest.raises(ValueError, match=words):
            infill.read_templates(f)


# ----------------------------------------------------------------------------- sampling


def test_infill_keeps_known_tokens_and_fills_gaps(unc):
    model, enc = unc
    template = "The cat [MASK:12] on the mat. [MASK:7]"
    t = infill.make_template(template, enc)
    recs = infill.infill(model, enc, template, CFG, num_samples=3, seed=1)
    assert len(recs) == 3
    for r in recs:
        ids = torch.tensor(r["ids"])
        assert len(r["ids"]) == t.length
        assert torch.equal(ids[t.known], t.ids[t.known])  # every known token exactly in place
        assert r["generated"] == (~t.known).nonzero().flatten().tolist()
        assert [(g["start"], g["end"]) for g in r["gaps"]] == [(2, 14), (t.length - 7, t.length)]
        assert r["text"].startswith("The cat") and "on the mat." in r["text"]
        assert r["steps"] == 4 and "cfg_scale" not in r and r["length"] == t.length
    assert len({tuple(r["ids"]) for r in recs}) > 1  # different noise streams, different fills
    again = infill.infill(model, enc, template, CFG, num_samples=3, seed=1)
    assert [r["ids"] for r in again] == [r["ids"] for r in recs]  # reproducible


def test_known_latents_are_held_every_step(unc):
    model, enc = unc
    rows = [Row(0, 3, template=infill.make_template("The cat [MASK:5] on the mat.", enc))]
    lay = layout(enc, rows, None, None, enc.pad_id)
    held = encode_known(enc, lay)
    seen = []

    def check(i, t, t_next, z, x):
        seen.append(i)
        assert torch.allclose(z[held.mask], held.latents[held.mask])
        assert torch.allclose(x[held.mask], held.latents[held.mask])
        assert not torch.allclose(z[~held.mask], held.latents[~held.mask])

    sample_rows(Sampler(model, CFG), enc, rows, callback=check)
    assert seen == [0, 1, 2, 3]


def test_known_latents_see_only_known_columns(unc):
    model, enc = unc
    a = infill.make_template("The cat [MASK:4] on the mat.", enc)
    lay = layout(enc, [Row(0, template=a)], None, None, enc.pad_id)
    got = encode_known(enc, lay).latents[0, a.known]
    # the known tokens alone, at their positions: changing the gap ids must not matter
    ids = lay.ids.clone()
    ids[0, ~a.known] = 100
    other = enc.encode(ids, known_mask(lay.cond, lay.target))[0, a.known]
    assert torch.allclose(got, other, atol=1e-5)
    full = enc.encode(ids)[0, a.known]  # without the mask the gap ids leak in
    assert not torch.allclose(got, full, atol=1e-3)


def test_the_known_tokens_condition_the_gaps(unc):
    model, enc = unc
    x = infill.infill(model, enc, "The cat [MASK:6] on the mat.", CFG, seed=5)[0]
    y = infill.infill(model, enc, "A big dog [MASK:6] under a tree", CFG, seed=5)[0]
    assert x["ids"][2:8] != y["ids"][3:9]  # same noise, different context, different fill


def test_batching_does_not_change_a_row(unc):
    model, enc = unc
    t = infill.make_template("The cat [MASK:6] on the mat.", enc)
    u = infill.make_template("Every [MASK:3] day I [MASK:4] .", enc)
    assert t.length == u.length
    sampler = Sampler(model, CFG)
    alone = sample_rows(sampler, enc, [Row(0, 7, template=t)])
    together = sample_rows(sampler, enc, [Row(3, 9, template=u), Row(0, 7, template=t)])
    assert together[1]["ids"] == alone[0]["ids"]
    with pytest.raises(ValueError, match="same length"):
        sample_rows(sampler, enc, [Row(0, template=t), Row(1, template=infill.make_template("x [MASK:1]", enc))])


def test_eos_in_the_last_gap_ends_the_text(unc):
    _, enc = unc
    t = infill.make_template("a [MASK:2] b [MASK:4]", enc)
    n = int(t.known.sum())
    ids = torch.full((t.length,), 7)
    ids[2] = enc.eos_id  # EOS in an interior gap: kept
    ids[n + 3] = enc.eos_id  # EOS in the last gap: the rest becomes padding
    rec = finish(Row(0, template=t), ids, enc, enc.pad_id)
    assert rec["ids"][2] == enc.eos_id
    assert rec["ids"][n + 3 :] == [enc.pad_id] * (t.length - n - 3)
    assert rec["ids"][n + 2] == 7


def test_prompted_continuation(unc):
    model, enc = unc
    prompt = enc.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    recs = infill.continue_prompt(model, enc, "Once upon a time", CFG, length=20, num_samples=2)
    for r in recs:
        assert len(r["ids"]) == 20 and r["ids"][: len(prompt)] == prompt
        assert r["generated"] == list(range(len(prompt), 20))
    with pytest.raises(ValueError, match="length must be in"):
        infill.continue_prompt(model, enc, "Once", CFG, length=65)


def test_conditional_infill_layout_and_guidance(cond):
    model, enc = cond
    t = infill.make_template("Das [MASK:3] Haus.", enc)
    src = enc.tokenizer("The house is big", add_special_tokens=False)["input_ids"] + [enc.eos_id]
    lay = layout(enc, [Row(0, source="The house is big", template=t)], 32, 16, enc.eos_id)
    n, T = len(src), t.length
    assert lay.ids[0, :n].tolist() == src and lay.start == [n] and lay.size == [T]
    assert lay.ids[0, n : n + T].tolist() == t.ids.tolist() and lay.ids[0, n + T] == enc.eos_id
    assert lay.held[0].tolist() == [True] * n + t.known.tolist() + [True] * (32 - n - T)
    m = known_mask(lay.cond, lay.target)[0]
    visible = lay.cond[0] | lay.target[0]
    assert torch.equal(m[0], lay.cond[0])  # the source sees only itself
    assert torch.equal(m[n], visible)  # a known target token sees the source and the known target (and the closing EOS)
    assert not m[:, n + T + 1 :].any()  # nobody sees the padding
    dropped = known_mask(lay.cond, lay.target, drop=True)[0]
    assert torch.equal(dropped[n], lay.target[0])  # label drop: the target loses the source
    held = encode_known(enc, lay, guidance=True)
    assert (held.dropped[0, :n] == 0).all()
    assert not torch.allclose(held.dropped[0, n], held.latents[0, n])  # encoded without the source

    cfg = replace(CFG, cfg_scale=2.0, method="ode")
    recs = infill.infill(
        model,
        enc,
        "Das [MASK:3] Haus.",
        cfg,
        source="The house is big",
        max_input_length=16,
        length=32,
        pad_token="eos",
        num_samples=2,
    )
    for r in recs:
        assert len(r["ids"]) == T and torch.equal(torch.tensor(r["ids"])[t.known], t.ids[t.known])
        assert r["source"] == "The house is big" and r["cfg_scale"] == 2.0
    with pytest.raises(ValueError, match="conditional checkpoint"):
        infill.infill(model, enc, "a [MASK:2]", cfg, source="x")


def test_cli_infill_and_prompt(folders, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(folders[0]),
                "--infill",
                "The cat [MASK:4] on the mat.",
                "--num-samples",
                "2",
                "--steps",
                "3",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1] and all(r["text"].startswith("The cat") for r in recs)
    assert all(r["template"] == "The cat [MASK:4] on the mat." and r["steps"] == 3 for r in recs)
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(folders[0]),
                "--prompt",
                "Once upon a time",
                "--length",
                "12",
                "-o",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert r["text"].startswith("Once upon a time") and len(r["ids"]) == 12 and r["prompt"] == "Once upon a time"
    f = tmp_path / "t.jsonl"
    f.write_text(
        json.dumps({"template": "Das [MASK:2] Haus.", "source": "The house"}) + "\n" + json.dumps("Ein [MASK:3]") + "\n"
    )
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(folders[1]),
                "--infill-file",
                str(f),
                "--length",
                "32",
                "-o",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert (
        [r["template_index"] for r in recs] == [0, 1] and recs[0]["source"] == "The house" and "source" not in recs[1]
    )
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(folders[0]), "--infill", "a [MASK:x]"]) == 2
    assert "malformed gap marker '[MASK:x]'" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(folders[0]), "--infill-file", str(f)]) == 2
    assert "unconditional model" in capsys.readouterr().err
