"""``elflm serve``: an HTTP generation server (FastAPI + uvicorn) that batches concurrent requests.

``POST /generate`` takes one JSON request (unconditional, ``prompt``, ``template`` / ``segments``
infilling, ``source`` for conditional checkpoints; sampler options ``method``, ``steps``, ``grid``,
``w``, ``gamma``, ``cfg_scale``, ``seed``), validated by a pydantic model whose bounds (samples,
steps, text size, gap and row lengths) come from :class:`Limits` and the checkpoint. A background
task takes the oldest waiting request, waits up to ``batch_wait_ms`` (or until ``max_batch`` rows)
for requests with the same sampler settings and row length, and runs them together as one
:func:`elflm.generate.sample_rows` call in a worker thread (the others wait for the next call, oldest
first); the response says how many rows (``batch_size``) and requests (``batched_requests``)
shared the call. ``GET /health`` reports the model, limits, queue and
batching statistics; ``/docs`` and ``/openapi.json`` describe the API.

Results do not depend on batching: sample k of a request is row k of the run seeded with the
request's ``seed`` (random when not given), so it equals row k of ``elflm sample --seed`` with the
same settings. fastapi, uvicorn and pydantic are imported when the app is built
(``pip install 'elflm[serve]'``).

Stopping (SIGINT / SIGTERM, :func:`run_server`): uvicorn stops accepting connections; the
sampler call in progress ends at its next step and it and the requests still waiting are answered
503 ("the server is stopping"), all within :data:`SHUTDOWN_GRACE_S` seconds; then the signal is
raised again for the caller (``elflm serve`` prints one line and exits 128 + the signal).
"""

import asyncio
import json
import math
import os
import socket
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from . import infill
from .config import MAX_CHURN, MAX_GUIDANCE, ConfigError, SampleConfig
from .errors import check_int
from .generate import Row, pad_id, sample_rows
from .model import model_config
from .sampling import Sampler, used_settings

SHUTDOWN_GRACE_S = 2  # seconds the server gives requests in flight when it is told to stop


@dataclass
class Limits:
    """Bounds of one request and of the batcher."""

    max_samples: int = 8  # samples per request
    max_steps: int = 256  # sampler steps
    max_chars: int = 4000  # characters of prompt / template / source (segments: all texts together)
    max_segments: int = 256  # items of a segment list
    max_batch: int = 32  # rows per sampler call
    max_queue: int = 1024  # requests waiting; more get 503
    max_body_bytes: int = 256 * 1024  # request body; larger ones get 413 before they are parsed
    batch_wait_ms: float = 5.0  # how long the batcher waits for company

    def __post_init__(self):
        for k, v in asdict(self).items():
            if k == "batch_wait_ms":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                    raise ValueError(f"server limit {k} must be a finite number >= 0, got {v!r}")
            else:
                check_int(f"server limit {k}", v, 1, 2**63 - 1)
        if self.max_samples > self.max_batch:
            raise ValueError(
                f"max_samples ({self.max_samples}) must not exceed max_batch ({self.max_batch}): "
                "a request's samples share one sampler call"
            )


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` (``port`` 0: any free one) for the server, bound
    before the model loads; an ``OSError`` naming the address and the fix when it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise OSError(
            f"--host {host!r} is not an address of this machine ({getattr(e, 'strerror', None) or e}); "
            "use 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or a local host name"
        ) from e
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port (0: any free one) or --host"
        ) from e
    sock.set_inheritable(True)
    return sock


def require_serve():
    """The uvicorn module, or an ImportError naming the extra that installs the server's packages."""
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ImportError("elflm serve needs fastapi and uvicorn: pip install 'elflm[serve]'") from e
    return uvicorn


def request_models(limits: Limits, max_length: int):
    """The pydantic request / response models with this server's bounds."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    # strict: JSON true is not 1, "2" is not 2, 2.5 is not an integer; no NaN or infinity
    strict = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    class TextSegment(BaseModel):
        model_config = strict
        text: str = Field(max_length=limits.max_chars, description="known text, tokenised on its own")

    class GapSegment(BaseModel):
        model_config = strict
        gap: int = Field(ge=1, le=max_length, description="number of tokens to generate here")

    class GenerateRequest(BaseModel):
        """At most one of ``prompt``, ``template``, ``segments``; none = unconditional."""

        model_config = strict
        prompt: str | None = Field(
            None,
            min_length=1,
            max_length=limits.max_chars,
            description="known prefix; the rest of the row is generated",
        )
        template: str | None = Field(
            None,
            min_length=1,
            max_length=limits.max_chars,
            description='text with gaps, e.g. "The cat [MASK:5] on the mat."',
        )
        segments: list[TextSegment | GapSegment] | None = Field(
            None, min_length=1, max_length=limits.max_segments, description='[{"text": ...} | {"gap": n}, ...]'
        )
        source: str | None = Field(
            None, min_length=1, max_length=limits.max_chars, description="condition (conditional checkpoints only)"
        )
        num_samples: int = Field(1, ge=1, le=limits.max_samples)
        length: int | None = Field(
            None,
            ge=1,
            le=max_length,
            description="row length (default max_length); with a template the row is the template",
        )
        method: Literal["ode", "sde"] | None = None
        steps: int | None = Field(None, ge=1, le=limits.max_steps)
        grid: Literal["uniform", "logit_normal"] | None = None
        w: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, description="self-conditioning guidance scale")
        gamma: float | None = Field(None, ge=0.0, le=MAX_CHURN, description="SDE churn")
        cfg_scale: float | None = Field(
            None, ge=0.0, le=MAX_GUIDANCE, description="classifier-free guidance (with a source)"
        )
        seed: int | None = Field(None, ge=0, lt=2**63, description="noise seed (default: random)")

        @model_validator(mode="after")
        def _one_kind(self):
            given = [k for k in ("prompt", "template", "segments") if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"give at most one of prompt, template, segments (got {', '.join(given)})")
            if self.segments is not None:
                chars = sum(len(s.text) for s in self.segments if isinstance(s, TextSegment))
                if chars > limits.max_chars:
                    raise ValueError(f"the segments hold {chars} characters of text, more than {limits.max_chars}")
            return self

    class Gap(BaseModel):
        start: int
        end: int
        text: str

    class Sample(BaseModel):
        text: str
        ids: list[int]
        generated: list[int] = Field(
            description="positions (in ids) that were sampled; the others are the known tokens"
        )
        gaps: list[Gap]

    class GenerateResponse(BaseModel):
        samples: list[Sample]
        seed: int
        settings: dict
        batch_size: int = Field(description="rows in the sampler call that served this request")
        batched_requests: int = Field(description="requests that shared that sampler call")
        queue_ms: float
        compute_ms: float

    return GenerateRequest, GenerateResponse, TextSegment


@dataclass
class Job:
    """A validated request: its rows, sampler settings, batching key and result future."""

    rows: list[Row]
    cfg: SampleConfig
    key: tuple
    length: int | None
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class QueueFull(RuntimeError):
    pass


class Stopping(RuntimeError):
    """The server is stopping: a sampler call in progress ends at its next step."""


class Batcher:
    """Holds the model; turns requests into :class:`Job` s and serves them in batched sampler calls."""

    def __init__(self, model, encoder, settings, limits: Limits, precision: str = "fp32", compiled: bool = False):
        self.model, self.encoder, self.settings, self.limits = model, encoder, settings, limits
        self.defaults = settings.sample
        self.max_length = model_config(model).max_length
        self.max_in = settings.data.max_input_length
        self.pad_token = settings.data.pad_token
        self.precision, self.compiled = precision, compiled
        self.samplers: dict[tuple, Sampler] = {}
        self.pending: deque[Job] = deque()
        self.arrived: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = threading.Event()  # set when the server stops: ends a sampler call in its thread
        self.stats = {"requests": 0, "rows": 0, "calls": 0, "errors": 0}

    # -- requests -------------------------------------------------------------------------------

    def job(self, req, text_segment_cls) -> Job:
        """Validate ``req`` against the model and build its rows; ValueError says what is wrong.
        Every size is checked before anything of that size is built."""
        over = {
            k: getattr(req, k)
            for k in ("method", "steps", "grid", "w", "gamma", "cfg_scale")
            if getattr(req, k) is not None
        }
        try:
            cfg = replace(self.defaults, **over)  # the sampler settings' own checks, as the CLI's
        except ConfigError as e:
            raise ValueError(f"{(e.key or 'sample').removeprefix('sample.')}: {e}") from None
        L = req.length or self.max_length
        enc = self.encoder
        if req.source is not None:
            if self.max_in is None:
                raise ValueError("this model is unconditional: 'source' is not accepted")
            n_src = infill.source_length(enc, req.source, self.max_in)
            if n_src >= L:
                raise ValueError(f"the source ({n_src} tokens) leaves nothing to generate in a row of {L}")
            budget = L - n_src
        else:
            if req.cfg_scale is not None and req.cfg_scale != 1:
                raise ValueError("cfg_scale (classifier-free guidance) needs a 'source': this request has no condition")
            budget = L
        template = None
        if req.prompt is not None:
            template = infill.prompt_template(enc, req.prompt, budget, self.pad_token)
        elif req.template is not None:
            template = infill.make_template(req.template, enc, budget, self.pad_token)
        elif req.segments is not None:
            segs = [s.text if isinstance(s, text_segment_cls) else s.gap for s in req.segments]
            template = infill.build_template(segs, enc.tokenizer, pad_id(enc, self.pad_token), budget)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        rows = [Row(k, seed, req.source, template) for k in range(req.num_samples)]
        conditional = req.source is not None
        row_len = L if conditional or template is None else template.length
        key = (tuple(sorted(asdict(cfg).items())), row_len, conditional)
        return Job(rows, cfg, key, L, asyncio.get_running_loop().create_future())

    def start(self) -> None:
        """Create the waiting list and its wake-up event (in the server's event loop)."""
        self.pending = deque()
        self.arrived = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.stopping.clear()

    def stop(self) -> None:
        """Begin stopping (safe in a signal handler of the loop's thread): the sampler call in
        progress ends at its next step; it, the waiting jobs and any new one fail with
        :class:`Stopping`."""
        self.stopping.set()
        if self.arrived is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.arrived.set)

    def submit(self, job: Job) -> asyncio.Future:
        if self.stopping.is_set():
            raise Stopping("the server is stopping; retry later")
        if self.arrived is None:
            raise RuntimeError(
                "the batcher is not running: serve the app with its lifespan "
                "(uvicorn, or TestClient as a context manager)"
            )
        if len(self.pending) >= self.limits.max_queue:
            raise QueueFull(f"the server is busy ({self.limits.max_queue} requests waiting); retry later")
        self.pending.append(job)
        self.arrived.set()
        return job.future

    # -- the batching loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: wait for a job; wait up to ``batch_wait_ms`` for company (jobs with the same
        key as the oldest one, until ``max_batch`` rows); run the oldest job with the company
        that fits in ``max_batch`` rows as one sampler call in a worker thread."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending or self.stopping.is_set():
                for job in self.pending:
                    if not job.future.done():
                        job.future.set_exception(Stopping("the server is stopping; retry later"))
                self.pending.clear()
                self.arrived.clear()
                await self.arrived.wait()
            key = self.pending[0].key
            deadline = loop.time() + self.limits.batch_wait_ms / 1000
            while (
                sum(len(j.rows) for j in self.pending if j.key == key) < self.limits.max_batch
                and loop.time() < deadline
            ):
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            call, rest, rows = [], deque(), 0
            for job in self.pending:
                if job.future.done():  # the client went away
                    continue
                if job.key == key and rows + len(job.rows) <= self.limits.max_batch:
                    call.append(job)
                    rows += len(job.rows)
                else:
                    rest.append(job)
            self.pending = rest
            if call:
                await self._serve(call)

    def sampler(self, cfg: SampleConfig) -> Sampler:
        key = tuple(sorted(asdict(cfg).items()))
        if key not in self.samplers:
            self.samplers[key] = Sampler(self.model, cfg, precision=self.precision, compiled=self.compiled)
        return self.samplers[key]

    def _sample(self, call: list[Job]) -> list[dict]:
        rows = [r for job in call for r in job.rows]
        return sample_rows(
            self.sampler(call[0].cfg),
            self.encoder,
            rows,
            length=call[0].length,
            max_input_length=self.max_in,
            pad_token=self.pad_token,
            callback=self._check_stopping,
        )

    def _check_stopping(self, *_) -> None:
        if self.stopping.is_set():
            raise Stopping("the server is stopping")

    async def _serve(self, call: list[Job]) -> None:
        start = time.perf_counter()
        try:
            records = await asyncio.to_thread(self._sample, call)
        except Exception as e:  # every waiting client gets the error
            self.stats["errors"] += 1
            for job in call:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        compute = (time.perf_counter() - start) * 1000
        n = sum(len(j.rows) for j in call)
        self.stats["calls"] += 1
        self.stats["rows"] += n
        self.stats["requests"] += len(call)
        k = 0
        for job in call:
            recs, k = records[k : k + len(job.rows)], k + len(job.rows)
            if job.future.done():
                continue
            job.future.set_result(
                {
                    "samples": [_sample(r) for r in recs],
                    "seed": job.rows[0].seed,
                    "settings": used_settings(job.cfg, job.rows[0].source is not None),
                    "batch_size": n,
                    "batched_requests": len(call),
                    "queue_ms": (start - job.queued) * 1000,
                    "compute_ms": compute,
                }
            )

    def health(self) -> dict:
        s = self.stats
        return {
            "status": "ok",
            "model": {
                "max_length": self.max_length,
                "conditional": self.max_in is not None,
                "max_input_length": self.max_in,
                "pad_token": self.pad_token,
                "device": str(next(self.model.parameters()).device),
                "parameters": sum(p.numel() for p in self.model.parameters()),
            },
            "sample_defaults": {k: v for k, v in asdict(self.defaults).items() if k != "num_samples"},
            "limits": asdict(self.limits),
            "queue": len(self.pending),
            "stats": {
                **s,
                "mean_batch_size": s["rows"] / s["calls"] if s["calls"] else 0.0,
                "mean_batched_requests": s["requests"] / s["calls"] if s["calls"] else 0.0,
            },
        }


def _sample(record: dict) -> dict:
    """A response sample from a record; a row without template was generated whole (one gap)."""
    n = len(record["ids"])
    whole = {"generated": list(range(n)), "gaps": [{"start": 0, "end": n, "text": record["text"]}]}
    return {"text": record["text"], "ids": record["ids"], **{k: record.get(k, v) for k, v in whole.items()}}


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` (declared or sent) is answered 413
    before the app parses any of it; a smaller one is read whole and handed on."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, given = b"".join(chunks), False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        detail = f"the request body is larger than {self.max_bytes} bytes (the server's --max-body-bytes)"
        payload = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def invalid_request(errors: list[dict], limit: int = 5) -> str:
    """pydantic's errors of a request as one line naming each field and what it should be; the
    values themselves are never repeated (an unknown field's name is cut to 30 characters)."""
    cut = lambda x: str(x) if len(str(x)) <= 30 else str(x)[:29] + "…"  # noqa: E731
    parts = []
    for e in errors[:limit]:
        loc = ".".join(cut(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts)[:2000] + more


def create_app(model, encoder, settings, limits: Limits | None = None, precision: str = "fp32", compiled: bool = False):
    """The FastAPI app serving ``model`` / ``encoder`` with the checkpoint ``settings``;
    ``precision`` / ``compiled``: the :class:`~elflm.sampling.Sampler`'s."""
    require_serve()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    if encoder is None or encoder.tokenizer is None:
        raise ValueError("the server needs the checkpoint's encoder and tokenizer")
    batcher = Batcher(model, encoder, settings, limits, precision, compiled)
    GenerateRequest, GenerateResponse, TextSegment = request_models(limits, batcher.max_length)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            batcher.stopping.set()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    app = FastAPI(
        title="elflm",
        version="1",
        lifespan=lifespan,
        description="Embedded Language Flows: unconditional, prompted, infilling and conditional generation.",
    )
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": invalid_request(list(exc.errors()))})

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError):
        return JSONResponse(status_code=422, content={"detail": " ".join(str(exc).split())[:2000]})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # logged by the server with its traceback
        return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__})"})

    @app.exception_handler(QueueFull)
    @app.exception_handler(Stopping)
    async def _busy(request: Request, exc: QueueFull | Stopping):
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses={
            413: {"description": "request body larger than the server's limit"},
            422: {"description": "invalid request (the detail names each field and what was expected)"},
            503: {"description": "queue full, or the server is stopping"},
        },
    )
    async def generate(req: GenerateRequest):
        job = batcher.job(req, TextSegment)
        return await batcher.submit(job)

    @app.get("/health")
    async def health():
        return batcher.health()

    return app


def run_server(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` (:func:`create_app`) with uvicorn on ``sock`` (:func:`listen`) until SIGINT /
    SIGTERM; the batcher stops as
    soon as the signal arrives (see the module's notes), and once the server is down the signal is
    raised again in this process (uvicorn's behaviour), so the caller's handler decides what follows.
    Unlike ``uvicorn.run``, a resulting ``KeyboardInterrupt`` is not swallowed."""
    uvicorn = require_serve()
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    server = uvicorn.Server(config)
    uvicorn_exit = server.handle_exit

    def handle_exit(sig, frame) -> None:  # installed by uvicorn while it serves
        app.state.batcher.stop()
        uvicorn_exit(sig, frame)

    server.handle_exit = handle_exit
    server.run(sockets=[sock])
