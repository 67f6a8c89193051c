"""A tiny sampling-ready model folder without training: random tiny T5 encoder + random tiny ELF."""

from dataclasses import replace
from pathlib import Path

import torch

from elflm.config import DataConfig, EncoderConfig, ModelConfig, SampleConfig, Settings
from elflm.model import ELF

from train_fixtures import make_tiny_t5


def make_tiny_model(
    folder: Path, tokenizer_dir: Path, max_input_length: int | None = None, max_length: int = 64
) -> Path:
    """An elflm folder (tiny T5 copied in); ``max_input_length`` makes it a conditional checkpoint
    (EOS padding). The denoise head gets random weights so that x̂ depends on the input."""
    enc = make_tiny_t5(folder.parent / f"{folder.name}-t5", tokenizer_dir)
    torch.manual_seed(0)
    model = ELF(
        ModelConfig(
            encoder_dim=32,
            vocab_size=32128,
            hidden_size=64,
            depth=2,
            num_heads=4,
            bottleneck_dim=16,
            max_length=max_length,
        )
    )
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.5)
    data = DataConfig(
        max_length=max_length, max_input_length=max_input_length, pad_token="eos" if max_input_length else "pad"
    )
    settings = Settings(
        encoder=EncoderConfig(kind="t5", name_or_path=str(enc), weights=str(enc)),
        data=data,
        sample=replace(SampleConfig(), steps=4),
    )
    from elflm.encoder import build_encoder

    return model.save_pretrained(folder, settings=settings, encoder=build_encoder(settings.encoder))
