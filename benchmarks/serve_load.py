"""Load run of ``elflm serve``: N requests from C concurrent clients against a real uvicorn server
on loopback; prints requests/s, latency percentiles, sampler calls and the mean batch.

The model is a tiny random ELF over a tiny random T5 encoder with the real T5 tokenizer (the
server's batching, not the model, is what is measured); half the requests are prompted.

    python benchmarks/serve_load.py                      # 200 requests, 8 clients, 2 steps, 12 tokens
    python benchmarks/serve_load.py --requests 1000 --clients 32 --steps 8 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SHARED_T5 = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tokenizers" / "t5-small"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--length", type=int, default=12)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--tokenizer",
        default=str(SHARED_T5),
        help="T5 tokenizer folder (its config gives nothing: the encoder is tiny)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def tiny_model(folder: Path, tokenizer: str):
    """A tiny random ELF + tiny random T5 encoder with the real T5 tokenizer, loaded for serving."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    from elflm.config import EncoderConfig, ModelConfig, Settings
    from elflm.encoder import build_encoder
    from elflm.model import ELF

    enc_dir = folder / "t5"
    torch.manual_seed(0)
    T5EncoderModel(
        T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, is_encoder_decoder=False)
    ).save_pretrained(enc_dir)
    for f in Path(tokenizer).iterdir():
        if f.name != "config.json":
            shutil.copy(f, enc_dir / f.name)
    model = ELF(
        ModelConfig(
            encoder_dim=32, vocab_size=32128, hidden_size=64, depth=2, num_heads=4, bottleneck_dim=16, max_length=64
        )
    )
    settings = Settings(encoder=EncoderConfig(kind="t5", name_or_path=str(enc_dir), weights=str(enc_dir)))
    model.save_pretrained(folder / "m", settings=settings, encoder=build_encoder(settings.encoder))
    loaded = ELF.from_pretrained(folder / "m")
    return loaded, loaded.encoder, loaded.pretrained


async def post_all(url: str, bodies: list[dict], clients: int) -> list[tuple[int, float]]:
    """``(status, seconds)`` of each body POSTed to /generate by ``clients`` concurrent clients."""
    import httpx

    out: list = [None] * len(bodies)
    todo = iter(range(len(bodies)))

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for k in todo:
                t0 = time.perf_counter()
                r = await c.post("/generate", json=bodies[k])
                out[k] = (r.status_code, time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    import httpx
    import uvicorn

    from elflm.serve import Limits, create_app

    with tempfile.TemporaryDirectory() as tmp:
        model, enc, settings = tiny_model(Path(tmp), a.tokenizer)
        limits = Limits(
            max_samples=1,
            max_steps=max(16, a.steps),
            max_batch=a.max_batch,
            max_queue=4 * a.requests,
            batch_wait_ms=a.batch_wait_ms,
        )
        app = create_app(model, enc, settings, limits)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        bodies = [
            {"steps": a.steps, "length": a.length, "seed": k, **({"prompt": "Once upon a time"} if k % 2 else {})}
            for k in range(a.requests)
        ]
        before = httpx.get(f"{url}/health").json()["stats"]
        t0 = time.perf_counter()
        results = asyncio.run(post_all(url, bodies, a.clients))
        wall = time.perf_counter() - t0
        after = httpx.get(f"{url}/health").json()["stats"]
        server.should_exit = True
        thread.join(timeout=30)
    latencies = sorted(s for _, s in results)
    calls = after["calls"] - before["calls"]
    out = {
        "requests": a.requests,
        "clients": a.clients,
        "steps": a.steps,
        "length": a.length,
        "wall_s": wall,
        "requests_per_s": a.requests / wall,
        "errors": sum(code != 200 for code, _ in results),
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
        "sampler_calls": calls,
        "mean_batch": (after["rows"] - before["rows"]) / max(calls, 1),
        "threads": torch.get_num_threads(),
    }
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(
            f"{a.requests} requests from {a.clients} clients in {wall:.2f} s ({out['requests_per_s']:.1f}/s), "
            f"{out['errors']} errors; latency p50 {out['latency_p50_ms']:.0f} ms, p95 {out['latency_p95_ms']:.0f} ms; "
            f"{calls} sampler calls, mean batch {out['mean_batch']:.2f}"
        )
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
