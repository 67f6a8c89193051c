"""torchrun process groups, DDP / FSDP2 wrapping (FSDP2 with a bf16 mixed-precision policy), full
(gathered) state dicts and gathered objects."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes on ``device``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked: an
    unknown name or CUDA where there is none is a ``ValueError`` that says what to pass."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(name)!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(name)!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here; use cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 … cuda:N-1")
    return device


def setup(device: str = "auto", group: bool = False) -> Dist:
    """Initialise the process group when launched by ``torchrun`` with ``WORLD_SIZE`` > 1, or with
    ``group`` (FSDP needs one, also for one process) whenever ``torchrun`` launched this process:
    NCCL on CUDA, gloo on CPU. ``device`` is ``auto``, ``cpu`` or ``cuda`` (each process takes
    ``cuda:LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if (world > 1 or group and launched) and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def barrier(d: Dist) -> None:
    """Wait until every process got here (no-op on one process)."""
    if d.world > 1 and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, strategy: str, precision: str = "fp32") -> nn.Module:
    """Wrap for data parallelism: ``ddp``, ``fsdp`` or ``none``; ``auto`` is DDP when there are
    several processes.

    * DDP: gradients are views into the all-reduce buckets (no second copy of the gradients);
      unused parameters allowed (each step takes one branch, so the other head gets no gradient).
    * FSDP2: ``fully_shard`` per block, then at the root. With ``precision="bf16"`` the blocks'
      parameters are all-gathered in bf16 and their gradients reduce-scattered in float32 into the
      float32 shards (master weights); the root (input projections, control tokens, heads) stays
      float32, and block inputs are not cast, so the residual stream stays float32 under autocast
      as with DDP. Compile blocks (:meth:`~elflm.model.ELF.compile_blocks`) before wrapping."""
    if strategy == "auto":
        strategy = "ddp" if d.world > 1 else "none"
    if strategy == "none" or d.world == 1 and strategy == "ddp":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True, gradient_as_bucket_view=True)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise ValueError(
                "train.distributed=fsdp needs a process group: launch with torchrun (also for one process: "
                "torchrun --nproc_per_node=1 -m elflm.cli train ...), or set train.distributed=none"
            )
        low = torch.bfloat16 if precision == "bf16" else None
        blocks = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.blocks:
            fully_shard(block, mp_policy=blocks)
        fully_shard(model, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False))
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}; expected auto, none, ddp or fsdp")


def sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded (DTensor) parameters."""
    return any(hasattr(p, "device_mesh") for p in unwrap(model).parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 modules are their own root)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (collective: every rank must call); others as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every parameter and buffer, gathered from FSDP shards when sharded."""
    return {k: full_tensor(v).detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors into a possibly FSDP-sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    inner = unwrap(model)
    if any(hasattr(p, "full_tensor") for p in inner.parameters()):
        set_model_state_dict(inner, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        inner.load_state_dict(state, strict=True)


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a tensor over ranks (no-op on one process)."""
    if d.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


def gather_objects(obj, d: Dist) -> list:
    """``obj`` of every rank, in rank order, on every rank (a collective: all ranks call it;
    picklable objects); ``[obj]`` on one process."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
