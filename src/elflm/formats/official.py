"""The official training config (the authors' flat ``Config`` / ``SamplingConfig`` fields) and
what it means for us: their defaults, the settings of the published models, the ``config.yml``
beside a checkpoint, and its translation into our :class:`~elflm.config.Settings`."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..checkpoint import CheckpointError
from ..config import (
    OFFICIAL_DEFAULTS,
    SAMPLER_PRESETS,
    DataConfig,
    EncoderConfig,
    ObjectiveConfig,
    SampleConfig,
    Settings,
    sample_configs,
)

# First entries of the official uncond / cond sampling config files.
SAMPLING = {"uncond": SAMPLER_PRESETS["uncond"][0], "cond": SAMPLER_PRESETS["cond"][0]}
_SDE64 = SAMPLER_PRESETS["uncond"][1]  # ELF-M / ELF-L defaults
_CONDITIONAL = dict(pad_token="eos", decoder_noise_scale=1.0, label_drop_prob=0.1)
ENCODER = "embedded-language-flows/t5_small_encoder_jax/t5_small_encoder_jax.pkl"
# Settings of the published models (their training YAMLs), for Hub snapshots without a config.
_PUBLISHED = {
    "ELF-B-owt": dict(max_length=1024),
    "ELF-M-owt": dict(max_length=1024, sampling_configs=[_SDE64]),
    "ELF-L-owt": dict(max_length=1024, sampling_configs=[_SDE64]),
    "ELF-B-de-en": dict(max_length=128, max_input_length=64, **_CONDITIONAL),
    "ELF-B-xsum": dict(max_length=1088, max_input_length=1024, **_CONDITIONAL),
    # the progressive-distillation student (distillation branch, distill_curriculum_ELF-B.yml)
    "ELF-B-PD-owt": dict(max_length=1024, sampling_configs=SAMPLER_PRESETS["fewstep"]),
}
_PUBLISHED_COMMON = dict(
    encoder_model_name="t5-small",
    encoder_checkpoint=ENCODER,
    latent_mean=0.0,
    latent_std=0.2,
    denoiser_p_mean=-1.5,
    denoiser_p_std=0.8,
    denoiser_noise_scale=2.0,
    t_eps=0.05,
    time_schedule="logit_normal",
    decoder_prob=0.2,
    decoder_noise_scale=5.0,
    decoder_p_mean=0.8,
    decoder_p_std=0.8,
    self_cond_prob=0.5,
)


# The unofficial Lightning reproduction (its reproduction/elf_b-owt/config.yml): ELF-B on OpenWebText
# with the Hub's t5-small encoder weights (which its checkpoints also carry).
_REPRODUCTIONS = {"Ugness/elf-torch": dict(max_length=1024, encoder_checkpoint=None)}


def published_config(repo_id: str) -> dict | None:
    """The training settings of a published ``embedded-language-flows/ELF-*`` model (``-torch``
    variants included) or of the Lightning reproduction ``Ugness/elf-torch``, or None for other
    repositories."""
    if repo_id in _REPRODUCTIONS:
        return {**_PUBLISHED_COMMON, **_REPRODUCTIONS[repo_id]}
    org, _, name = repo_id.partition("/")
    name = name.removesuffix("-torch")
    if org != "embedded-language-flows" or name not in _PUBLISHED:
        return None
    return {**_PUBLISHED_COMMON, **_PUBLISHED[name]}


def find_config(checkpoint: Path) -> Path | None:
    """``config.yml`` beside an official checkpoint: in it or in the run folder above it
    (``run/checkpoint_N`` or ``run/checkpoint_N/<item>``)."""
    start = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for folder in (start, start.parent, start.parent.parent):
        for name in ("config.yml", "config.yaml"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_config(config: str | Path | dict | None, checkpoint: Path) -> tuple[dict, Path | None]:
    """The official config of ``checkpoint`` and the YAML it came from: ``config`` itself (a
    dict, no file), the YAML file ``config``, else the ``config.yml`` beside the checkpoint,
    else ``{}`` (the official defaults) and None."""
    if isinstance(config, dict):
        return config, None
    file = Path(config) if config is not None else find_config(checkpoint)
    if file is None:
        return {}, None
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{file}: cannot read YAML config ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: a config must be a mapping of fields")
    return data, file


def settings_from_official(cfg: dict, config_file: Path | None = None) -> tuple[Settings, int]:
    """Our settings and ``max_length`` from an official config (``config.yml`` dumped by the
    authors' ``train.py`` or their input YAML; official field names, official defaults). A
    relative ``encoder_checkpoint`` is looked up beside ``config_file`` and in the folder above
    (the official run resolved it against its working folder)."""
    c = {**OFFICIAL_DEFAULTS, **cfg}
    objective = ObjectiveConfig(
        latent_mean=float(c["latent_mean"]),
        latent_std=float(c["latent_std"]),
        noise_scale=float(c["denoiser_noise_scale"]),
        p_mean=float(c["denoiser_p_mean"]),
        p_std=float(c["denoiser_p_std"]),
        t_eps=float(c["t_eps"]),
        time_schedule=c["time_schedule"],
        decoder_prob=float(c["decoder_prob"]),
        decoder_noise_scale=float(c["decoder_noise_scale"]),
        decoder_p_mean=float(c["decoder_p_mean"]),
        decoder_p_std=float(c["decoder_p_std"]),
        self_cond_prob=float(c["self_cond_prob"]),
        self_cond_cfg_min=float(c["self_cond_cfg_min"]),
        self_cond_cfg_max=float(c["self_cond_cfg_max"]),
        label_drop_prob=float(c["label_drop_prob"]),
        pad_token=c["pad_token"],
    )
    conditional = c["max_input_length"] is not None
    entries = c.get("sampling_configs") or [SAMPLING["cond" if conditional else "uncond"]]
    base = SampleConfig(
        noise_scale=objective.noise_scale, p_mean=objective.p_mean, p_std=objective.p_std, t_eps=objective.t_eps
    )
    try:
        sample = sample_configs(entries[:1], base, where=str(config_file or "the official config"))[0]
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    tokenizer = c["tokenizer_name"] or c["encoder_model_name"]
    weights = c["encoder_checkpoint"]
    if weights is not None and config_file is not None and not Path(weights).is_absolute():
        found = [d / weights for d in (config_file.parent, config_file.parent.parent) if (d / weights).is_file()]
        weights = str(found[0]) if found else weights
    encoder = EncoderConfig(
        kind="t5",
        name_or_path=c["encoder_model_name"],
        weights=weights,
        tokenizer=tokenizer,
        latent_mean=objective.latent_mean,
        latent_std=objective.latent_std,
    )
    data = DataConfig(
        max_length=int(c["max_length"]),
        max_input_length=c["max_input_length"],
        pad_token=c["pad_token"],
        tokenizer=tokenizer,
    )
    return Settings(encoder, data, objective, sample), int(c["max_length"])
