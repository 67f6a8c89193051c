"""The errors elflm raises for bad input, one type per layer where values enter, all subclasses of
:class:`ElflmError` (and of the builtin ``ValueError`` / ``OSError`` / ``RuntimeError`` they refine,
so ``except ValueError`` keeps working). Each message names the file, key, argument or field, the
value, and how to fix it; ``elflm``'s command line catches them once (:func:`elflm.cli.main`) and
prints one line.

=====================  ===========================================  ==========================
layer                  error                                        raised where
=====================  ===========================================  ==========================
configuration          :class:`~elflm.config.ConfigError`           config files, overrides,
                                                                    config dataclasses, resume
data files             :class:`DataError`                           prepared datasets
checkpoints, folders   :class:`~elflm.checkpoint.CheckpointError`   model / training folders
Hugging Face           :class:`~elflm.hub.HubError`                 Hub ids, HF folders
training               :class:`TrainingError`                       a non-finite step
=====================  ===========================================  ==========================

Function arguments of the Python API that are not settings (``num_samples``, ``length``, a
template) raise ``ValueError`` naming the argument (:func:`check_int`); the server answers 422
naming the field.
"""

import numbers


class ElflmError(Exception):
    """Bad input: the message names what was wrong (file, key, argument or field), the value and the fix."""


class DataError(ElflmError, ValueError):
    """A prepared dataset (``meta.json`` and its shards) is missing, damaged or of the wrong shape."""


class TrainingError(ElflmError, RuntimeError):
    """Training cannot go on: e.g. a step whose loss or gradient norm is NaN or infinite."""


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (a bool is not) in ``[low, high]``, else a
    ``ValueError`` naming the argument ``name``, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {'in ' if high is not None else ''}{bound}, got {value}")
    return int(value)


__all__ = ["ElflmError", "DataError", "TrainingError", "check_int"]
