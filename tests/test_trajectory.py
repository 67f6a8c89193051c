"""Trajectory view: x̂ decoded at every step, the HTML page (parsed) and the PNG strip."""

from html.parser import HTMLParser

import pytest
import torch

from elflm.cli import main
from elflm.config import SampleConfig
from elflm.generate import generate
from elflm.model import ELF
from elflm.sampling import Sampler, decode_logits
from elflm.trajectory import Trajectory, render_html, write_png

from tiny_model import make_tiny_model

CFG = SampleConfig(method="sde", steps=5, grid="uniform", gamma=1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, t5_tokenizer_dir):
    folder = make_tiny_model(tmp_path_factory.mktemp("traj") / "m", t5_tokenizer_dir)
    model = ELF.from_pretrained(folder)
    enc = model.encoder
    return folder, model, enc


class Table(HTMLParser):
    """Collects the text of every body row's cells and checks that tags nest properly."""

    VOID = {"meta", "br", "img", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.rows, self.refs, self.in_body = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows.append([])
        elif tag == "td" and self.in_body:
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "tbody":
            self.in_body = False

    def handle_data(self, data):
        if self.in_body and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def parse(page: str) -> Table:
    p = Table()
    p.feed(page)
    p.close()
    assert p.stack == [], f"unclosed tags {p.stack}"
    return p


def test_trajectory_rows_and_last_step_is_the_final_decode(tiny):
    _, model, enc = tiny
    traj = Trajectory(model, enc.tokenizer, CFG, max_samples=2)
    sampler = Sampler(model, CFG)
    final = sampler.sample(sampler.start(range(3), 10, 0), callback=traj)
    grid = torch.linspace(0, 1, 6)
    assert [s.index for s in traj.steps] == list(range(5)) and traj.num_samples == 2
    assert torch.allclose(torch.stack([s.t for s in traj.steps]), grid[:-1, None].expand(5, 2))
    # uniform grid: the last step lands exactly on x̂, so its decode is the sampler's final decode
    assert torch.equal(traj.steps[-1].ids, decode_logits(model, final, CFG).argmax(-1)[:2])

    page = parse(render_html(traj, title="a <b> title"))
    assert len(page.rows) == 5 and page.refs == []
    for step, row in zip(traj.steps, page.rows):
        assert row[0] == str(step.index) and len(row) == 2 + 2  # step, changed, one cell per recorded sample
        assert row[2].startswith(f"t {step.t[0]:.4f} → {step.t_next[0]:.4f}")
    assert page.rows[0][1].strip() == "20"  # every token is new at step 0 (2 samples × 10)
    assert "a &lt;b&gt; title" in render_html(traj, title="a <b> title")


def test_only_the_first_sampler_call_is_recorded(tiny):
    _, model, enc = tiny
    traj = Trajectory(model, enc.tokenizer, CFG)
    generate(model, enc, CFG, num_samples=3, batch_size=2, length=8, callback=traj)
    assert len(traj.steps) == 5 and traj.num_samples == 2 and traj.done


def test_png_and_empty(tiny, tmp_path):
    _, model, enc = tiny
    traj = Trajectory(model, enc.tokenizer, CFG)
    with pytest.raises(ValueError, match="empty"):
        render_html(traj)
    generate(model, enc, CFG, num_samples=1, length=8, callback=traj)
    png = write_png(traj, tmp_path / "t.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli_trajectory(tiny, tmp_path):
    folder, _, _ = tiny
    page, png = tmp_path / "t.html", tmp_path / "t.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(folder),
                "--num-samples",
                "2",
                "--length",
                "8",
                "--steps",
                "6",
                "-o",
                str(tmp_path / "o.jsonl"),
                "--trajectory",
                str(page),
                "--trajectory-png",
                str(png),
            ]
        )
        == 0
    )
    assert len(parse(page.read_text(encoding="utf-8")).rows) == 6 and png.stat().st_size > 1000
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(folder),
                "--infill",
                "The cat [MASK:3] sat.",
                "--steps",
                "3",
                "-o",
                str(tmp_path / "o.jsonl"),
                "--trajectory",
                str(page),
                "--overwrite",
            ]
        )
        == 0
    )
    assert len(parse(page.read_text(encoding="utf-8")).rows) == 3
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(folder),
                "--num-samples",
                "1",
                "--trajectory",
                str(tmp_path / "no" / "t.html"),
            ]
        )
        == 2
    )
