"""The training planner (``elflm plan``): memory per GPU, FLOPs per token and throughput per MFU.

Memory comes from the real modules: the ELF network, its optimizer, EMA and the frozen encoder
are built on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no storage)
and one training step runs on them as :meth:`elflm.train.Trainer.train_step` runs it (batch masks,
draws, encoding, loss, backward, clipping, optimizer step, EMA). A dispatch-level tracker,
:class:`LiveBytes`, adds the bytes of every tensor storage an op creates and subtracts them when
the storage is freed, so the peak is that of the step's tensors, alive together (the CPU's
autocast and attention kernels stand in for the GPU's). Values the step reads back to the host
take planning values: data-dependent counts their maximum (every row self-conditioned, every
token in the decode loss), checks pass. The result is checked against the measured peak of real
CPU steps (``tests/test_plan.py``).

One process without data parallelism is exactly the traced step. Data parallelism adds to it:

* DDP: gradients are views into the all-reduce buckets, allocated for the whole run (all
  parameters' gradients, not only those alive at the traced peak);
* FSDP over N GPUs: parameters, gradients, optimizer state and EMA divided by N, plus the
  unsharded working set: two blocks' parameters all-gathered (current and prefetched, bf16 under
  the bf16 policy), one block's unsharded gradients (bf16 and their float32 copy for the
  reduce-scatter), the root's parameters and gradients, and the largest matrix gathered by Muon
  (its momentum and two Newton–Schulz temporaries).

The frozen encoder is counted whole on every GPU. Allocator fragmentation, the CUDA context and
communication buffers are not tensors: leave ``headroom``.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import asdict, dataclass, field, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import objective
from .config import Config
from .data import device_batch
from .encoder import TextEncoder
from .model import ELF
from .optim import EMA, build_optimizer, clip_grad_norm_

GiB = 2**30
MFUS = (0.2, 0.3, 0.4, 0.5, 0.6)  # the utilisations the throughput table is given for


# ---------------------------------------------------------------------------- FLOPs
def flops_per_token(m, length: int, decode: bool) -> float:
    """Forward FLOPs per text token of the ELF network (matmuls + attention), control tokens
    counted in the sequence."""
    H, C, D = m.hidden_size, m.encoder_dim, m.depth
    hidden = int(int(H * m.mlp_ratio) * 2 / 3)
    n = length + m.num_time_tokens + m.num_self_cond_cfg_tokens + m.num_mode_tokens
    per_block = 2 * (3 * H * H + H * H + 3 * H * hidden) + 4 * n * H
    io = 2 * (2 * C * C + C * m.bottleneck_dim + m.bottleneck_dim * H + H * C)
    head = 2 * (H * C + C * m.vocab_size) if decode else 0
    return (D * per_block + io) * n / length + head


def step_flops_per_token(m, length: int, decoder_prob: float) -> float:
    """Expected training FLOPs per token of one step: the denoise branch runs a no-grad forward
    on the self-conditioned half of the rows and one forward + backward (3.5 forwards), the decode
    branch forward + backward (3). Activation checkpointing recomputes the blocks once more; that
    is not counted (model FLOPs, as MFU is usually quoted)."""
    return (1 - decoder_prob) * 3.5 * flops_per_token(m, length, False) + decoder_prob * 3 * flops_per_token(
        m, length, True
    )


PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp32": 495.0},
    "H200": {"bf16": 989.0, "fp32": 495.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU whose name contains a key of :data:`PEAK_TFLOPS` (TF32 for
    fp32), or None."""
    for key, table in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return table[precision] * 1e12
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU (TF32 for fp32), or None (CPU / unknown)."""
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device), precision)


# ---------------------------------------------------------------------------- memory tracking
class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created by the ops run under this mode that are still alive
    (``live``), their ``peak`` and the op count at the peak (``peak_at``). A storage is counted when
    an op first returns a tensor on it that is not a view of an input, and uncounted when it is
    freed. Under fake tensors, host reads of data-dependent values take planning values: ``nonzero``
    returns every index, other reads True / 0 (constants keep their value)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.peak_at = self.ops = 0
        self.phase_peak = self.phase_peak_at = 0  # since the last :meth:`phase`
        self.born: dict[int, tuple[int, int]] = {}  # id(storage) -> (op count at birth, bytes)
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func is torch.ops.aten.nonzero.default and _fake(args[0]):
            x = args[0]
            out = torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        elif func is torch.ops.aten._local_scalar_dense.default and _fake(args[0]) and args[0].constant is None:
            return True if args[0].dtype == torch.bool else 0
        else:
            out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _storage_tensor(t)}
        for t in tree_leaves(out):
            if _storage_tensor(t):
                st = t.untyped_storage()
                if id(st) not in inputs and id(st) not in self._refs:
                    self._count(st)
        return out

    def _count(self, st) -> None:
        key, size = id(st), st.nbytes()
        self._refs[key] = weakref.ref(st, lambda _, key=key: self._free(key))
        self.born[key] = (self.ops, size)
        self.live += size
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self.ops
        if self.live > self.phase_peak:
            self.phase_peak, self.phase_peak_at = self.live, self.ops

    def phase(self) -> tuple[int, int]:
        """The peak since the previous call (or the start) and the op count at it; starts a new phase."""
        out = (self.phase_peak, self.phase_peak_at)
        self.phase_peak, self.phase_peak_at = self.live, self.ops
        return out

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        _, size = self.born.pop(key)
        self.live -= size


def _fake(t) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "fake_mode")


def _storage_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


def nbytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors if _storage_tensor(t)}
    return sum(seen.values())


# ---------------------------------------------------------------------------- the traced step
@dataclass
class StepMemory:
    """One traced optimizer step of one micro-batch, in bytes: ``peak`` of one process (model
    states included); ``activations``: the peak of forward and backward less the model states and
    the gradients alive then (activations, saved tensors, draws, batch, temporaries);
    ``optimizer_temporaries``: the peak of clipping, optimizer step and EMA update less the model
    states and gradients."""

    micro_batch: int
    decode: bool
    activation_checkpointing: bool
    peak: int
    activations: int
    optimizer_temporaries: int


@dataclass
class ModelStates:
    """Bytes of the persistent training state on one process (no sharding), and the counts the
    FSDP working set is made of."""

    params: int
    grads: int
    optimizer: int
    ema: int
    encoder: int
    num_params: int
    largest_block: int  # parameters of the largest transformer block
    root: int  # parameters outside the blocks (FSDP's root group)
    largest_matrix: int  # elements of the largest 2-D parameter (Muon gathers it whole)


class Tracer:
    """Traces training steps of ``cfg`` on fake tensors (see the module docstring); ``encoder`` is
    the run's frozen encoder (only its architecture is used: the fake copy is built from its
    config). ``device``: whose rules the optimizer follows where they differ (Muon's Newton–Schulz
    takes the Gram form on the CPU only, unless ``train.muon_ns_gram`` says). :meth:`step` results
    are cached per (micro-batch, branch, activation checkpointing)."""

    def __init__(self, cfg: Config, encoder: TextEncoder, device: str = "cuda"):
        if cfg.train.muon_ns_gram is None:
            cfg = replace(cfg, train=replace(cfg.train, muon_ns_gram=device == "cpu"))
        self.cfg = cfg
        self.mode = FakeTensorMode()
        self.model_config = cfg.resolved_model(encoder.dim, encoder.vocab_size)
        self.length = cfg.data.max_length
        with self.mode:
            torch.manual_seed(0)
            self.encoder = TextEncoder(
                type(encoder.model)(encoder.model.config),
                latent_mean=encoder.latent_mean,
                latent_std=encoder.latent_std,
            )
            self.model = ELF(self.model_config)
            self.optimizer = build_optimizer(self.model, cfg.train)
            self.ema = EMA(self.model, cfg.train.ema_decay)
            with LiveBytes() as live:  # a first step makes the optimizer state
                self._run(1, False, live)
        params = list(self.model.parameters())
        opt = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        blocks = [sum(p.numel() for p in b.parameters()) for b in self.model.blocks]
        self.states = ModelStates(
            params=nbytes(params),
            grads=nbytes(params),  # float32 gradients of every parameter
            optimizer=nbytes(opt),
            ema=nbytes(self.ema.state_dict().values()),
            encoder=nbytes([*self.encoder.parameters(), *self.encoder.buffers()]),
            num_params=sum(p.numel() for p in params),
            largest_block=max(blocks),
            root=sum(p.numel() for p in params) - sum(blocks),
            largest_matrix=max((p.numel() for p in params if p.dim() == 2), default=0),
        )
        self._cache: dict[tuple, StepMemory] = {}

    def _run(self, micro_batch: int, decode: bool, live: LiveBytes) -> tuple[int, int]:
        """One step of ``micro_batch`` full-length rows (conditional ones when the data is) under
        ``live``; returns the dynamic bytes (above the model states) of forward + backward and of
        the optimizer phase, each without the gradients alive at its peak."""
        cfg, L = self.cfg, self.length
        live.phase()
        cond = cfg.data.max_input_length or 0
        host = {
            "input_ids": torch.zeros(micro_batch, L, dtype=torch.long),
            "lengths": torch.tensor([cond, L]).repeat(micro_batch, 1),
        }
        batch = device_batch(host, "cpu", conditional=cond > 0)
        d = objective.draw(cfg.objective, micro_batch, L, self.model_config.encoder_dim, generator=torch.Generator())
        d.decode = decode
        self.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            loss = objective.training_loss(self.model, self.encoder, batch, cfg.objective, d).loss
            loss.backward()
        del d, host  # as in the trainer: the batch and the loss live on through the optimizer step
        grads = [live.born[id(p.grad.untyped_storage())] for p in self.model.parameters() if p.grad is not None]
        forward_peak, forward_at = live.phase()
        clip_grad_norm_(self.model.parameters(), cfg.train.clip)
        self.optimizer.step()
        freed_at = live.ops
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        optimizer_peak, optimizer_at = live.phase()
        before = lambda at: sum(size for born, size in grads if born <= at and at < freed_at)  # noqa: E731
        return forward_peak - before(forward_at), optimizer_peak - before(optimizer_at)

    def step(self, micro_batch: int, decode: bool, activation_checkpointing: bool) -> StepMemory:
        """The memory of one training step (see :class:`StepMemory`)."""
        key = (micro_batch, decode, activation_checkpointing)
        if key not in self._cache:
            self.model.set_activation_checkpointing(activation_checkpointing)
            with self.mode, LiveBytes() as live:
                activations, temporaries = self._run(micro_batch, decode, live)
            s = self.states
            static = s.params + s.optimizer + s.ema + s.encoder
            self._cache[key] = StepMemory(
                micro_batch, decode, activation_checkpointing, static + live.peak, activations, temporaries
            )
        return self._cache[key]


# ---------------------------------------------------------------------------- per GPU
STRATEGIES = ("none", "ddp", "fsdp")


def per_gpu(states: ModelStates, step: StepMemory, strategy: str, gpus: int, precision: str) -> int:
    """Bytes per GPU of ``step`` under ``strategy`` over ``gpus`` GPUs (see the module docstring)."""
    s = states
    if strategy == "none":
        return step.peak
    if strategy == "ddp":
        return s.params + s.grads + s.optimizer + s.ema + s.encoder + max(step.activations, step.optimizer_temporaries)
    if strategy == "fsdp":
        pb = 2 if precision == "bf16" else 4  # bytes of an all-gathered block parameter
        working = (
            2 * s.largest_block * pb  # the current and the prefetched block, all-gathered
            + s.largest_block * (pb + 4)  # one block's unsharded gradients and their float32 copy
            + 2 * s.root * 4  # the root's parameters and gradients, unsharded
        )
        muon = 3 * s.largest_matrix * 4  # the gathered momentum and two Newton-Schulz temporaries
        sharded = math.ceil((s.params + s.grads + s.optimizer + s.ema) / gpus)
        return sharded + s.encoder + max(working + step.activations, muon)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


@dataclass
class PlanReport:
    """What :func:`plan` finds; bytes unless named otherwise (``to_dict`` for JSON)."""

    model: dict  # parameters, sizes, length, precision
    gpus: int
    gpu: str
    gpu_memory: int
    usable: int  # gpu_memory less the headroom
    micro_batch: int
    states: ModelStates
    steps: list[StepMemory]  # at micro_batch: both branches, activation checkpointing off and on
    memory: dict  # strategy -> "ac_off" / "ac_on" -> branch -> bytes per GPU
    flops_per_token: dict  # forward FLOPs per token of each branch, and of an expected training step
    throughput: dict  # MFU -> tokens/s per GPU and in all
    largest_micro_batch: dict  # strategy -> "ac_off" / "ac_on" -> micro-batch (0: not even 1 fits)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _ac_key(on: bool) -> str:
    return "ac_on" if on else "ac_off"


def plan(
    cfg: Config,
    encoder: TextEncoder,
    *,
    gpus: int = 1,
    gpu: str = "H100",
    gpu_memory: int = 80 * GiB,
    micro_batch: int | None = None,
    headroom: float = 0.1,
    suggest: bool = True,
) -> PlanReport:
    """Memory per GPU of training ``cfg`` on ``gpus`` GPUs of ``gpu_memory`` bytes (strategies:
    one process, DDP, FSDP; activation checkpointing off and on; both branches) at ``micro_batch``
    rows per GPU (default: the config's), FLOPs per token, the throughput each MFU in :data:`MFUS`
    gives on ``gpu`` (:data:`PEAK_TFLOPS`), and with ``suggest`` the largest micro-batch that fits
    in ``gpu_memory·(1 − headroom)``. ``encoder``: the run's frozen encoder (its architecture)."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: expected at least 1")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom={headroom}: expected a fraction in [0, 1)")
    if gpu_memory <= 0:
        raise ValueError(f"gpu_memory={gpu_memory}: expected a positive number of bytes")
    precision = cfg.train.precision
    peak = gpu_peak_flops(gpu, precision)
    if peak is None:
        raise ValueError(f"gpu={gpu!r}: unknown GPU; expected one of {', '.join(PEAK_TFLOPS)}")
    if micro_batch is None:
        micro_batch = cfg.train.micro_batch(gpus)[0]
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch}: expected at least 1")
    tracer = Tracer(cfg, encoder)
    m, L = tracer.model_config, tracer.length
    strategies = ("none",) if gpus == 1 else ("ddp", "fsdp")
    usable = int(gpu_memory * (1 - headroom))

    class Need:
        """Bytes per GPU of a micro-batch under one strategy and activation checkpointing setting."""

        def __init__(self, strategy: str, ac: bool):
            self.strategy, self.ac = strategy, ac

        def step(self, b: int, decode: bool) -> StepMemory:
            return tracer.step(b, decode, self.ac)

        def __call__(self, b: int, decode: bool, step: StepMemory | None = None) -> int:
            return per_gpu(tracer.states, step or self.step(b, decode), self.strategy, gpus, precision)

    steps = [tracer.step(micro_batch, dec, ac) for ac in (False, True) for dec in (False, True)]
    memory = {
        s: {
            _ac_key(ac): {
                br: per_gpu(tracer.states, tracer.step(micro_batch, br == "decode", ac), s, gpus, precision)
                for br in ("denoise", "decode")
            }
            for ac in (False, True)
        }
        for s in strategies
    }
    largest = {}
    if suggest:
        for s in strategies:
            largest[s] = {_ac_key(ac): _largest(Need(s, ac), micro_batch, usable) for ac in (False, True)}
    step_flops = step_flops_per_token(m, L, cfg.objective.decoder_prob)
    flops = {
        "denoise_forward": flops_per_token(m, L, False),
        "decode_forward": flops_per_token(m, L, True),
        "training_step": step_flops,
    }
    throughput = {
        f"{mfu:.0%}": {"per_gpu": mfu * peak / step_flops, "total": mfu * peak * gpus / step_flops} for mfu in MFUS
    }
    notes = [
        f"traced on CPU fake tensors ({'bf16 autocast' if precision == 'bf16' else 'float32'}); tensors only: "
        f"leave headroom for the CUDA context, fragmentation and communication buffers ({headroom:.0%} here)"
    ]
    if cfg.train.grad_accum_steps and cfg.train.grad_accum_steps > 1 or cfg.train.micro_batch(gpus)[1] > 1:
        notes.append("gradient accumulation: the later micro-batches also hold every gradient (the DDP column's rule)")
    return PlanReport(
        model={
            "parameters": tracer.states.num_params,
            "hidden_size": m.hidden_size,
            "depth": m.depth,
            "encoder_dim": m.encoder_dim,
            "vocab_size": m.vocab_size,
            "length": L,
            "precision": precision,
            "conditional": cfg.data.conditional,
        },
        gpus=gpus,
        gpu=gpu,
        gpu_memory=gpu_memory,
        usable=usable,
        micro_batch=micro_batch,
        states=tracer.states,
        steps=steps,
        memory=memory,
        flops_per_token=flops,
        throughput=throughput,
        largest_micro_batch=largest,
        notes=notes,
    )


MAX_MICRO_BATCH = 2**16  # the search's ceiling


def _largest(need, start: int, usable: int) -> int:
    """The largest micro-batch b ≤ :data:`MAX_MICRO_BATCH` with ``need(b, decode) <= usable`` for
    both branches (0: none); ``need(b, decode, step)`` prices a given :class:`StepMemory`. The steps
    at ``start`` and ``2·start`` give each branch's memory as a line in b (activations grow
    linearly), whose largest fitting b is the first guess; then every candidate is traced: the
    guess and the next size, then doubling or bisection."""

    def predicted(b: int) -> bool:
        for decode in (False, True):
            s1, s2 = need.step(start, decode), need.step(2 * start, decode)
            grow = lambda x1, x2: max(x1 + (x2 - x1) * (b - start) // start, 0)  # noqa: E731
            line = replace(s1, peak=grow(s1.peak, s2.peak), activations=grow(s1.activations, s2.activations))
            if need(b, decode, line) > usable:
                return False
        return True

    lo, hi = 0, MAX_MICRO_BATCH + 1
    while hi - lo > 1:  # on the lines: no tracing
        b = (lo + hi) // 2
        lo, hi = (b, hi) if predicted(b) else (lo, b)
    guess = max(lo, 1)
    fits = lambda b: all(need(b, decode) <= usable for decode in (True, False))  # noqa: E731
    lo, hi = 0, MAX_MICRO_BATCH + 1  # traced: lo fits (0: nothing known to fit), hi does not
    for b in (guess, guess + 1):
        if lo < b < hi:
            lo, hi = (b, hi) if fits(b) else (lo, b)
    while hi - lo > 1:
        b = min(max(2 * lo, lo + 1), MAX_MICRO_BATCH) if hi > MAX_MICRO_BATCH else (lo + hi) // 2
        lo, hi = (b, hi) if fits(b) else (lo, b)
    return lo


def parse_memory(text: str) -> int:
    """``80GB``, ``80GiB``, ``141 GB``, ``80`` (GiB) or ``81920MB`` → bytes; GB and MB are read as
    GiB and MiB, as GPU memory is quoted (an "80 GB" H100 holds 80 GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib|t|tb|tib)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"GPU memory {text!r}: expected a size such as 80GB, 141GB or 40960MB")
    unit = (match.group(2) or "g")[0].lower()
    return int(float(match.group(1)) * {"m": 2**20, "g": 2**30, "t": 2**40}[unit])


def format_plan(r: PlanReport) -> str:
    """The report as text tables (GiB, TFLOPs, tokens/s)."""
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    m, s = r.model, r.states
    out = [
        f"ELF {m['parameters'] / 1e6:.1f}M parameters (depth {m['depth']}, H {m['hidden_size']}, C {m['encoder_dim']}, "
        f"V {m['vocab_size']}), {m['length']} tokens per row, {m['precision']}; micro-batch {r.micro_batch} per GPU; "
        f"{r.gpus} × {r.gpu} with {g(r.gpu_memory)} GiB ({g(r.usable)} GiB usable)",
        "",
        "model states, one process (GiB): "
        f"parameters {g(s.params)}, gradients {g(s.grads)}, optimizer {g(s.optimizer)}, EMA {g(s.ema)}, "
        f"frozen encoder {g(s.encoder)}",
        "activations and temporaries at the peak (GiB): "
        + ", ".join(
            f"{'decode' if st.decode else 'denoise'}{' +AC' if st.activation_checkpointing else ''} {g(st.activations)}"
            for st in r.steps
        ),
        "",
        "memory per GPU (GiB)       denoise   decode   denoise+AC   decode+AC   largest micro-batch (AC off / on)",
    ]
    for strategy, by_ac in r.memory.items():
        big = r.largest_micro_batch.get(strategy)
        largest = f"{big['ac_off']} / {big['ac_on']}" if big else "-"
        off, on = by_ac["ac_off"], by_ac["ac_on"]
        out.append(
            f"  {strategy:24} {g(off['denoise']):>7} {g(off['decode']):>8} {g(on['denoise']):>12} {g(on['decode']):>11}"
            f"   {largest}"
        )
    f = r.flops_per_token
    out += [
        "",
        f"FLOPs per token: denoise forward {f['denoise_forward'] / 1e9:.3f} G, decode forward "
        f"{f['decode_forward'] / 1e9:.3f} G, expected training step {f['training_step'] / 1e9:.3f} G",
        "throughput at MFU: " + ", ".join(f"{k} {v['total']:,.0f} tok/s" for k, v in r.throughput.items()),
    ]
    return "\n".join(out + [f"note: {n}" for n in r.notes])
