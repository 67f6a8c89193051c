"""Text in, text out: unconditional and conditional generation with a trained ELF.

``generate(model, encoder, sample_cfg, ...)`` batches the sampler of :mod:`elflm.sampling`, encodes
conditions with the frozen encoder, decodes token ids and text. Same seed → same samples.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from . import sampling
from .config import SampleConfig
from .objective import model_config


def batch_generator(seed: int, index: int, device) -> torch.Generator:
    """Independent, reproducible generator for batch ``index`` of a run seeded with ``seed``."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def condition_rows(encoder, sources: list[str], length: int, max_input_length: int, pad_id: int):
    """Tokenise ``sources`` ending with EOS, as the training conditions are, truncated to
    ``max_input_length``, into rows of ``length``; returns ``(input_ids (B, L), cond_mask (B, L)
    bool, truncated count)``."""
    ids = [row + [encoder.eos_id] for row in encoder.tokenizer(list(sources), add_special_tokens=False)["input_ids"]]
    rows = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.bool)
    truncated = 0
    for i, row in enumerate(ids):
        truncated += len(row) > max_input_length
        row = row[:max_input_length]
        rows[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return rows, mask, truncated


def encode_condition(encoder, input_ids: torch.Tensor, cond_mask: torch.Tensor) -> sampling.Condition:
    """Clean condition latents: the condition attends only to itself in the encoder (SPEC §1)."""
    from .encoder import encoder_attention_mask

    mask = encoder_attention_mask(cond_mask, cond_mask)
    return sampling.Condition(encoder.encode(input_ids, mask), cond_mask)


@torch.no_grad()
def generate(
    model,
    encoder,
    cfg: SampleConfig | None = None,
    num_samples: int | None = None,
    sources: list[str] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    length: int | None = None,
    max_input_length: int | None = None,
    pad_token: str = "pad",
    progress: bool = False,
    callback=None,
) -> list[dict]:
    """Sample texts. Unconditional: ``num_samples`` rows of ``length`` tokens (default the model's
    ``max_length``). Conditional: one sample per entry of ``sources``, each condition truncated to
    ``max_input_length`` tokens and the remaining ``length − max_input_length`` tokens generated.
    A sample depends on ``seed``, ``batch_size`` and the settings (each batch draws from its own
    generator). Returns one dict per sample: ``text``, ``ids``, ``seed``, ``index``, the settings
    (``cfg`` with the actual ``num_samples``, ``batch_size``, ``length``), and ``source``.
    ``callback(i, t, t_next, z, x̂)`` sees every step of every batch (:func:`sampling.sample_latents`)."""
    cfg = cfg or SampleConfig()
    mcfg = model_config(model)
    length = length or mcfg.max_length
    device = next(model.parameters()).device
    if not 0 < length <= mcfg.max_length:
        raise ValueError(f"length must be in [1, {mcfg.max_length}] (the model's max_length), got {length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for key, low in (("steps", 1), ("gamma", 0), ("w", 0), ("cfg_scale", 0)):
        if getattr(cfg, key) < low:
            raise ValueError(f"sampler setting {key} must be >= {low}, got {getattr(cfg, key)}")
    if sources is not None:
        if max_input_length is None or not 0 < max_input_length < length:
            raise ValueError(f"conditional generation needs 0 < max_input_length < length ({length}), got {max_input_length}")
        num_samples = len(sources)
    if not num_samples or num_samples < 1:
        raise ValueError("nothing to generate: give num_samples >= 1 or a non-empty list of sources")
    eos, pad = encoder.eos_id, (encoder.eos_id if pad_token == "eos" else encoder.pad_id)
    settings = {**asdict(cfg), "num_samples": num_samples, "batch_size": batch_size, "length": length}
    out: list[dict] = []
    starts = range(0, num_samples, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    for b, start in enumerate(starts):
        n = min(batch_size, num_samples - start)
        gen = batch_generator(seed, b, device)
        z = torch.randn(n, length, mcfg.encoder_dim, generator=gen, device=device) * cfg.noise_scale
        grid = sampling.time_grid(cfg, generator=gen, device=device)
        cond, cond_mask = None, None
        if sources is not None:
            ids, cond_mask, _ = condition_rows(encoder, sources[start : start + n], length, max_input_length, pad)
            cond = encode_condition(encoder, ids.to(device), cond_mask.to(device))
        final = sampling.sample_latents(
            model, cfg, z, grid, cond=cond, noise=lambda i: torch.randn(z.shape, generator=gen, device=device),
            state_dtype=torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32,
            callback=callback,
        )
        logits = sampling.decode_logits(model, final, cfg)
        gen_len = None if sources is None else length - max_input_length
        ids = sampling.tokens_from_logits(logits, eos, pad, None if cond is None else cond.mask, gen_len).cpu()
        for i in range(n):
            row = ids[i].tolist()
            record = {"index": start + i, "text": encoder.tokenizer.decode(row, skip_special_tokens=True), "ids": row, "seed": seed, **settings}
            if sources is not None:
                record["source"] = sources[start + i]
            out.append(record)
    return out


def read_conditions(path: str, field: str = "source") -> list[str]:
    """Conditions from a text file (one per line) or JSONL (``field`` of each object, a string;
    blank lines skipped). Empty conditions, bytes that are not UTF-8 and malformed JSON are errors
    naming the line."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    raw = p.read_bytes().splitlines()
    jsonl = p.suffix == ".jsonl"
    out = []
    for i, line in enumerate(raw, 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if jsonl:
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(obj, dict) or field not in obj:
                raise ValueError(f"{path}:{i}: expected a JSON object with the field {field!r} (see --source-field)")
            if not isinstance(obj[field], str):
                raise ValueError(f"{path}:{i}: field {field!r} must be a string, got {type(obj[field]).__name__}")
            text = obj[field]
        if not text.strip():
            raise ValueError(f"{path}:{i}: empty condition")
        out.append(text)
    if not out:
        raise ValueError(f"{path}: no conditions found")
    return out


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def cli_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    return device


def check_output(path: str) -> None:
    """Fail before any work when the output file ``path`` (``-`` = stdout) cannot be written."""
    from pathlib import Path

    if path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--output {path} is a folder; expected a file name")
    if not p.parent.is_dir():
        raise ValueError(f"--output {path}: the folder {p.parent} does not exist")


def warn_truncated(encoder, sources: list[str], max_input_length: int) -> int:
    """Print a warning on stderr naming the conditions longer than ``max_input_length`` tokens
    (EOS included), which :func:`condition_rows` truncates; returns their count."""
    import sys

    long = [i for i, ids in enumerate(encoder.token_ids(sources), 1) if len(ids) + 1 > max_input_length]
    if long:
        which = ", ".join(map(str, long[:10])) + (" …" if len(long) > 10 else "")
        print(f"warning: {len(long)} condition(s) longer than {max_input_length} tokens (EOS included) were truncated "
              f"to fit: condition no. {which}", file=sys.stderr)
    return len(long)


def cli_sample_config(cfg: SampleConfig, a) -> SampleConfig:
    """``cfg`` with the sampler options given on the command line (``--method`` ... ``--cfg-scale``)."""
    from dataclasses import replace

    for key, value in (("method", a.method), ("steps", a.steps), ("grid", a.grid and a.grid.replace("-", "_")),
                       ("gamma", a.gamma), ("w", a.w), ("cfg_scale", a.cfg_scale)):
        if value is not None:
            cfg = replace(cfg, **{key: value})
    return cfg


def run_sample_cli(a) -> int:
    """``elflm sample``: load a checkpoint, sample, write JSONL."""
    import time

    from .model import ELF

    if a.input and a.num_samples:
        raise ValueError("give either --num-samples N (unconditional) or --input FILE (one sample per condition), not both")
    if not a.input and not a.num_samples:
        raise ValueError("give --num-samples N (unconditional) or --input FILE (conditional)")
    if a.cfg_scale not in (None, 1) and not a.input:
        raise ValueError("--cfg-scale (classifier-free guidance) applies to conditional sampling: give --input FILE")
    check_output(a.output)
    device = cli_device(a.device)
    sources = read_conditions(a.input, a.source_field) if a.input else None
    model = ELF.from_pretrained(a.checkpoint, raw=a.raw, device=device, dtype=PRECISIONS[a.precision])
    encoder, settings = model.encoder, model.pretrained
    cfg = cli_sample_config(settings.sample, a)
    data = settings.data
    max_in = a.max_input_length or data.max_input_length
    if sources is not None and max_in is None:
        raise ValueError(f"{a.checkpoint} is an unconditional model (no data.max_input_length): drop --input, "
                         "or pass --max-input-length N to hold the inputs fixed as conditions")
    if sources is not None:
        warn_truncated(encoder, sources, max_in)
    from .trajectory import recorder_from_args, save_from_args

    recorder = recorder_from_args(a, model, encoder, cfg)
    t0 = time.perf_counter()
    records = generate(model, encoder, cfg, num_samples=a.num_samples, sources=sources, batch_size=a.batch_size,
                       seed=a.seed, length=a.length, max_input_length=max_in, pad_token=data.pad_token, progress=True,
                       callback=recorder)
    write_records(a, records, time.perf_counter() - t0)
    save_from_args(a, recorder)
    return 0


def write_records(a, records: list[dict], seconds: float) -> None:
    """Write sample records as JSONL to ``a.output`` (``-``: stdout) with the precision and
    checkpoint of the run; report the rate on stderr."""
    import json
    import sys

    out = sys.stdout if a.output == "-" else open(a.output, "w", encoding="utf-8")
    try:
        for r in records:
            out.write(json.dumps({**r, "precision": a.precision, "checkpoint": str(a.checkpoint)}, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{len(records)} samples in {seconds:.1f}s ({len(records) / max(seconds, 1e-9):.2f} samples/s)", file=sys.stderr)
