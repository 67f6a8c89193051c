"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/<name>.py``)."""

import resource

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
