"""``elflm serve``: a real uvicorn server on loopback, exercised with httpx."""

import asyncio
import json
import socket
import threading
import time
from dataclasses import replace

import pytest

from conftest import need_module

need_module("fastapi", "pip install 'elflm[serve]'")
httpx = need_module("httpx", "pip install httpx")
uvicorn = need_module("uvicorn", "pip install 'elflm[serve]'")

from elflm.cli import build_parser, main  # noqa: E402
from elflm.model import ELF  # noqa: E402
from elflm.serve import Limits, create_app  # noqa: E402

from tiny_model import make_tiny_model  # noqa: E402

LIMITS = Limits(max_samples=4, max_steps=16, max_chars=200, max_batch=8, max_queue=64, batch_wait_ms=100)
FAST = {"steps": 2, "length": 12}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, t5_tokenizer_dir):
    """(base url, app) of a server in a thread; stopped (and checked stopped) at the end."""
    folder = make_tiny_model(tmp_path_factory.mktemp("serve") / "m", t5_tokenizer_dir)
    model = ELF.from_pretrained(folder)
    enc, settings = model.encoder, model.pretrained
    app = create_app(model, enc, settings, LIMITS)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive(), "the server did not stop"


async def post_all(url: str, bodies: list[dict], clients: int) -> list[httpx.Response]:
    """POST every body to /generate from ``clients`` concurrent clients; responses in body order."""
    out: list = [None] * len(bodies)
    todo = iter(range(len(bodies)))

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            for k in todo:
                out[k] = await c.post("/generate", json=bodies[k])

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


def test_health_and_openapi(server):
    url, _ = server
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["model"]["max_length"] == 64 and h["limits"]["max_batch"] == 8
    schema = httpx.get(f"{url}/openapi.json").json()
    assert "/generate" in schema["paths"] and "/health" in schema["paths"]
    req = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert req["num_samples"]["maximum"] == 4 and req["steps"]["anyOf"][0]["maximum"] == 16


def test_generate_kinds(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/generate", json={**FAST, "num_samples": 2, "seed": 3}).json()
        assert len(r["samples"]) == 2 and all(len(s["ids"]) == 12 for s in r["samples"]) and r["seed"] == 3
        r = c.post("/generate", json={**FAST, "prompt": "Once upon a time"}).json()
        (s,) = r["samples"]
        assert s["text"].startswith("Once upon a time") and s["generated"][0] == 5 and len(s["ids"]) == 12
        r = c.post(
            "/generate", json={"steps": 2, "template": "The cat [MASK:4] on the mat.", "method": "ode", "w": 1.5}
        ).json()
        (s,) = r["samples"]
        assert s["text"].startswith("The cat") and s["text"].endswith("on the mat.") and r["settings"]["w"] == 1.5
        assert s["generated"] == [2, 3, 4, 5] and s["gaps"][0]["start"] == 2
        seg = c.post(
            "/generate", json={"steps": 2, "segments": [{"text": "The cat"}, {"gap": 4}, {"text": " on the mat."}]}
        ).json()
        assert seg["samples"][0]["generated"] == [2, 3, 4, 5]


def test_concurrent_requests_are_batched_and_batching_does_not_change_results(server):
    url, _ = server
    bodies = [{**FAST, "seed": k} for k in range(6)]
    rs = asyncio.run(post_all(url, bodies, clients=6))
    assert all(r.status_code == 200 for r in rs)
    data = [r.json() for r in rs]
    assert max(d["batched_requests"] for d in data) > 1
    assert all(d["batch_size"] >= d["batched_requests"] for d in data)
    with httpx.Client(base_url=url, timeout=60) as c:  # alone, request 4 gives the same sample
        alone = c.post("/generate", json=bodies[4]).json()
    assert alone["batched_requests"] == 1 and alone["samples"] == data[4]["samples"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"num_samples": 100}, 422, "num_samples"),
        ({"steps": 10_000}, 422, "steps"),
        ({"prompt": "x" * 500}, 422, "prompt"),
        ({"template": "a [MASK:0]"}, 422, "gap length must be >= 1"),
        ({"template": "a [MASK:x]"}, 422, "malformed gap marker"),
        ({"template": "no gaps here"}, 422, "no gap"),
        ({"template": "a [MASK:60] b c d e f"}, 422, "more than the 64 available"),
        ({"segments": [{"gap": 0}]}, 422, "gap"),
        ({"segments": [{"text": "a", "gap": 2}]}, 422, "segments"),
        ({"prompt": "a", "template": "b [MASK:1]"}, 422, "at most one of prompt, template, segments"),
        ({"source": "a condition"}, 422, "unconditional"),
        ({"length": 1000}, 422, "length"),
        ({"method": "euler"}, 422, "method"),
        ({"surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, body, status, words):
    url, _ = server
    r = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert r.status_code == status
    assert words in str(r.json()["detail"])


def test_malformed_json(server):
    url, _ = server
    r = httpx.post(f"{url}/generate", content=b"{not json", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422 and "json" in str(r.json()["detail"]).lower()


def test_serve_cli_defaults_to_loopback(capsys):
    a = build_parser().parse_args(["serve", "--checkpoint", "x"])
    assert a.host == "127.0.0.1" and a.port == 8000
    assert main(["serve", "--checkpoint", "x", "--max-samples", "9", "--max-batch", "4"]) == 2
    assert "max_samples (9) must not exceed max_batch (4)" in capsys.readouterr().err


def test_compile_reaches_the_sampler(server):
    """``--compile``: the server's samplers run the steps and the decode pass through torch.compile."""
    assert build_parser().parse_args(["serve", "--checkpoint", "x", "--compile"]).compile
    b0 = server[1].state.batcher
    for compiled in (False, True):
        app = create_app(b0.model, b0.encoder, b0.settings, LIMITS, compiled=compiled)
        sampler = app.state.batcher.sampler(b0.settings.sample)
        assert sampler.compiled is compiled and (sampler.forward is not b0.model) is compiled


def test_full_queue_is_refused(server):
    from elflm.serve import Batcher, QueueFull, request_models

    b0 = server[1].state.batcher
    b = Batcher(b0.model, b0.encoder, b0.settings, Limits(max_queue=2, max_batch=8, max_samples=1))
    Request, _, TextSegment = request_models(b.limits, b.max_length)

    async def go():
        with pytest.raises(RuntimeError, match="not running"):
            b.submit(b.job(Request(**FAST), TextSegment))
        b.start()
        for _ in range(2):
            b.submit(b.job(Request(**FAST), TextSegment))
        with pytest.raises(QueueFull, match="busy"):
            b.submit(b.job(Request(**FAST), TextSegment))

    asyncio.run(go())


def test_only_compatible_requests_share_a_call(server):
    url, _ = server
    bodies = [{**FAST, "seed": k, "steps": 2 if k % 2 else 3} for k in range(6)]
    data = [r.json() for r in asyncio.run(post_all(url, bodies, clients=6))]
    for body, d in zip(bodies, data):
        assert d["settings"]["steps"] == body["steps"] and d["batched_requests"] <= 3


def test_conditional_checkpoint(tmp_path, t5_tokenizer_dir):
    from fastapi.testclient import TestClient

    folder = make_tiny_model(tmp_path / "c", t5_tokenizer_dir, max_input_length=16)
    model = ELF.from_pretrained(folder)
    enc, settings = model.encoder, model.pretrained
    with TestClient(create_app(model, enc, settings, LIMITS)) as c:
        r = c.post(
            "/generate",
            json={
                "source": "The house is big",
                "template": "Das [MASK:3] Haus.",
                "steps": 2,
                "cfg_scale": 2.0,
                "length": 32,
                "num_samples": 2,
            },
        )
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["settings"]["cfg_scale"] == 2.0 and d["batch_size"] == 2
        for s in d["samples"]:
            assert s["text"].startswith("Das") and s["text"].endswith("Haus.") and len(s["generated"]) == 3
        r = c.post("/generate", json={"source": "The house is big", "steps": 2, "length": 20})
        assert (
            r.status_code == 200 and len(r.json()["samples"][0]["ids"]) == 20 - 16
        )  # as the official sampler: L − max_input_length
        r = c.post("/generate", json={"source": "one two three four five six seven eight", "length": 8})
        assert r.status_code == 422 and "leaves nothing to generate" in r.json()["detail"]


def test_one_request_the_same_samples_through_every_door(tmp_path, t5_tokenizer_dir):
    """The same seed and settings give the same ids and texts from the Python API, `elflm sample`
    at batch sizes 1, 3 and 8, and the server: a sample depends on its seed and row index only."""
    from fastapi.testclient import TestClient

    from elflm.generate import generate
    from elflm.infill import infill

    folder = make_tiny_model(tmp_path / "m", t5_tokenizer_dir)
    model = ELF.from_pretrained(folder)
    enc, settings = model.encoder, model.pretrained
    cfg = replace(settings.sample, steps=3, method="sde", grid="logit_normal")
    opts = ["--checkpoint", str(folder), "--steps", "3", "--method", "sde", "--grid", "logit_normal", "--seed", "5"]
    template = "The cat [MASK:4] on the mat. [MASK:3]"

    def cli(extra, batch):
        out = tmp_path / f"s{batch}.jsonl"
        assert main(["sample", *opts, *extra, "--batch-size", str(batch), "-o", str(out), "--overwrite"]) == 0
        return [(r["ids"], r["text"]) for r in map(json.loads, out.read_text().splitlines())]

    with TestClient(create_app(model, enc, settings, Limits(max_samples=8, max_batch=8))) as c:
        for extra, body, api in [
            (
                ["--num-samples", "8", "--length", "12"],
                {"num_samples": 8, "length": 12},
                lambda: generate(model, enc, cfg, num_samples=8, length=12, seed=5, batch_size=5),
            ),
            (
                ["--infill", template, "--num-samples", "5"],
                {"num_samples": 5, "template": template},
                lambda: infill(model, enc, template, cfg, num_samples=5, seed=5, batch_size=2),
            ),
        ]:
            want = [(r["ids"], r["text"]) for r in api()]
            for batch in (1, 3, 8):
                assert cli(extra, batch) == want, f"elflm sample --batch-size {batch}"
            r = c.post("/generate", json={**body, "steps": 3, "method": "sde", "grid": "logit_normal", "seed": 5})
            assert r.status_code == 200, r.text
            assert [(s["ids"], s["text"]) for s in r.json()["samples"]] == want, "elflm serve"
            assert len({tuple(ids) for ids, _ in want}) == len(want)  # rows differ: each its own stream
