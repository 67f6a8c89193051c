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
    """Tokenise ``sources`` (no special tokens) truncated to ``max_input_length`` into rows of
    ``length``; returns ``(input_ids (B, L), cond_mask (B, L) bool, truncated count)``."""
    ids = encoder.tokenizer(list(sources), add_special_tokens=False)["input_ids"]
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
) -> list[dict]:
    """Sample texts. Unconditional: ``num_samples`` rows of ``length`` tokens (default the model's
    ``max_length``). Conditional: one sample per entry of ``sources``, each condition truncated to
    ``max_input_length`` tokens and the remaining ``length − max_input_length`` tokens generated.
    Returns one dict per sample: ``text``, ``ids``, ``seed``, ``index``, the settings, and ``source``."""
    cfg = cfg or SampleConfig()
    mcfg = model_config(model)
    length = length or mcfg.max_length
    device = next(model.parameters()).device
    if sources is not None:
        if max_input_length is None or not 0 < max_input_length < length:
            raise ValueError(f"conditional generation needs 0 < max_input_length < length ({length}), got {max_input_length}")
        num_samples = len(sources)
    if not num_samples or num_samples < 1:
        raise ValueError("nothing to generate: give num_samples >= 1 or a non-empty list of sources")
    eos, pad = encoder.eos_id, (encoder.eos_id if pad_token == "eos" else encoder.pad_id)
    settings = asdict(cfg)
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
    """Conditions from a text file (one per line) or JSONL (``field`` of each object). Empty lines
    are refused with their line number; bytes that are not UTF-8 are an error naming the line."""
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
            obj = json.loads(text)
            if field not in obj:
                raise ValueError(f"{path}:{i}: JSON object has no field {field!r} (use --source-field)")
            text = str(obj[field])
        if not text.strip():
            raise ValueError(f"{path}:{i}: empty condition")
        out.append(text)
    if not out:
        raise ValueError(f"{path}: no conditions found")
    return out


def run_sample_cli(a) -> int:
    """``elflm sample``: load a checkpoint, sample, write JSONL."""
    import json
    import sys
    import time
    from dataclasses import replace

    from .checkpoint import load_pretrained

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[a.precision]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    model, encoder, settings = load_pretrained(a.checkpoint, raw=a.raw, device=device, dtype=dtype)
    cfg = settings.sample
    for key, value in (("method", a.method), ("steps", a.steps), ("grid", a.grid and a.grid.replace("-", "_")),
                       ("gamma", a.gamma), ("w", a.w), ("cfg_scale", a.cfg_scale)):
        if value is not None:
            cfg = replace(cfg, **{key: value})
    data = settings.data
    sources = read_conditions(a.input, a.source_field) if a.input else None
    max_in = a.max_input_length or data.max_input_length
    if sources is not None and max_in is None:
        raise ValueError("this model is unconditional: drop --input, or pass --max-input-length for a conditional model")
    if sources is None and not a.num_samples:
        raise ValueError("give --num-samples N (unconditional) or --input FILE (conditional)")
    if sources is not None:
        long = sum(len(ids) > max_in for ids in encoder.tokenizer(sources, add_special_tokens=False)["input_ids"])
        if long:
            print(f"warning: {long} condition(s) longer than {max_in} tokens were truncated", file=sys.stderr)
    t0 = time.perf_counter()
    records = generate(model, encoder, cfg, num_samples=a.num_samples, sources=sources, batch_size=a.batch_size,
                       seed=a.seed, length=a.length, max_input_length=max_in, pad_token=data.pad_token, progress=True)
    dt = time.perf_counter() - t0
    out = sys.stdout if a.output == "-" else open(a.output, "w", encoding="utf-8")
    try:
        for r in records:
            out.write(json.dumps({**r, "precision": a.precision, "checkpoint": str(a.checkpoint)}, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{len(records)} samples in {dt:.1f}s ({len(records) / dt:.2f} samples/s)", file=sys.stderr)
    return 0
