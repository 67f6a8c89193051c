"""Typed configuration: model, encoder, data, objective, training and sampling settings.

Every section is a dataclass; :class:`Config` holds one of each. :func:`load_config` reads YAML,
applies dotted ``section.key=value`` overrides and validates, raising :class:`ConfigError` that
names the offending key and what was expected.

Each setting has one home. A few fields are copies kept for the code that reads one section
only (see :data:`MIRRORS`): :class:`Config` fills them from their home, and a YAML file may
repeat them only with the same value. ``model.encoder_dim`` (C) and ``model.vocab_size`` (V)
are properties of the encoder (T5-small: C = 512, V = 32128): a ``Config`` leaves them at their
defaults and :meth:`Config.resolved_model` fills them from the loaded encoder.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ElflmError
from .files import write_text


class ConfigError(ElflmError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible; ``key`` is the
    dotted name of the setting, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class ModelConfig:
    """The ELF network (SPEC §4). ``encoder_dim`` is C, ``hidden_size`` is H, ``vocab_size`` V."""

    encoder_dim: int = 512
    vocab_size: int = 32128
    max_length: int = 1024
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    bottleneck_dim: int = 128
    num_time_tokens: int = 4
    num_self_cond_cfg_tokens: int = 4
    num_mode_tokens: int = 4
    self_cond: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        check_section("model", self)


@dataclass
class ObjectiveConfig:
    """Flow and training-objective hyper-parameters (SPEC §3, §5); official names in comments.
    In a :class:`Config`, ``latent_mean``/``latent_std`` mirror ``encoder.*`` and ``pad_token``
    mirrors ``data.pad_token``."""

    latent_mean: float = 0.0
    latent_std: float = 0.2
    noise_scale: float = 2.0  # denoiser_noise_scale
    p_mean: float = -1.5  # denoiser_p_mean
    p_std: float = 0.8  # denoiser_p_std
    t_eps: float = 0.05
    time_schedule: Literal["logit_normal", "uniform"] = "logit_normal"
    decoder_prob: float = 0.2
    decoder_noise_scale: float = 5.0
    decoder_p_mean: float = 0.8
    decoder_p_std: float = 0.8
    self_cond_prob: float = 0.5
    self_cond_cfg_min: float = 0.5
    self_cond_cfg_max: float = 5.0
    label_drop_prob: float = 0.0
    pad_token: Literal["pad", "eos"] = "pad"  # which id pads rows (eos for conditional tasks)

    def __post_init__(self):
        check_section("objective", self)


@dataclass
class DistillConfig:
    """Progressive distillation (golden README §8; official ``distillation`` branch, same names): a
    student step spans ``pd_step_size`` (1/N for an N-step student) from ``t_s = u·max(1 −
    pd_step_size, 1e-6)``, u drawn from ``pd_student_schedule``; the frozen teacher builds the target
    with ``pd_teacher_steps`` Euler sub-steps over the span at sorted times drawn from
    ``pd_teacher_schedule``. Flow, branch and self-conditioning settings are the
    :class:`ObjectiveConfig`'s. Defaults: round 1 of the official curriculum (rounds 2-5: 1/8, 1/4,
    1/2, 1 with 8, 16, 32, 64 sub-steps).

    ``teacher`` (official ``teacher_path``): what :meth:`ELF.from_pretrained` loads (a model folder,
    training run, official checkpoint or Hub id), with its EMA weights unless ``teacher_use_ema`` is
    false. The student starts from the teacher's weights, or from those of ``student_init``
    (``student_init_from_checkpoint``: the previous round of a curriculum), read the same way."""

    pd_step_size: float = 0.0625
    pd_teacher_steps: int = 4
    pd_student_schedule: Literal["logit_normal", "uniform"] = "logit_normal"
    pd_teacher_schedule: Literal["logit_normal", "uniform"] = "logit_normal"
    teacher: str | None = None
    teacher_use_ema: bool = True
    student_init: str | None = None

    def __post_init__(self):
        if not 0 < self.pd_step_size <= 1:
            raise ConfigError(
                f"distill.pd_step_size={self.pd_step_size!r}: expected a span in (0, 1] (1/N for an N-step student)",
                "distill.pd_step_size",
            )
        n = self.pd_teacher_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"distill.pd_teacher_steps={n!r}: expected an integer >= 1", "distill.pd_teacher_steps")
        for key in ("pd_student_schedule", "pd_teacher_schedule"):
            if getattr(self, key) not in ("logit_normal", "uniform"):
                raise ConfigError(
                    f"distill.{key}={getattr(self, key)!r}: expected 'logit_normal' or 'uniform'", f"distill.{key}"
                )


@dataclass
class SampleConfig:
    """Sampler settings (SPEC §6). ``w`` is the self-conditioning-CFG scale, ``cfg_scale`` the
    classifier-free guidance scale of conditional models (1 = off). In a :class:`Config`,
    ``noise_scale``, ``p_mean``, ``p_std`` and ``t_eps`` mirror the objective's."""

    method: Literal["ode", "sde"] = "sde"
    steps: int = 32
    grid: Literal["logit_normal", "uniform"] = "logit_normal"
    gamma: float = 1.5  # SDE churn
    w: float = 3.0
    cfg_scale: float = 1.0
    noise_scale: float = 2.0
    p_mean: float = -1.5
    p_std: float = 0.8
    t_eps: float = 0.05
    t_final: float = 1.0
    num_samples: int = 1000

    def __post_init__(self):
        check_section("sample", self)


def _entry(method: str, steps: list[int], gamma: float, w: float, cfg: float = 1) -> dict:
    """One entry of the authors' sampling-config YAML (their field names)."""
    return dict(
        sampling_method=method,
        num_sampling_steps=steps,
        cfgs=[cfg],
        sde_gamma=gamma,
        self_cond_cfg_scales=[w],
        time_schedule="logit_normal",
    )


# The authors' sampling-config files by name (their src/configs/sampling_configs/*.yml): ``uncond``
# (ELF-B 32 SDE steps, ELF-M / L 64), ``cond`` (De-En, XSum) and ``fewstep`` (distilled students).
SAMPLER_PRESETS: dict[str, list[dict]] = {
    "uncond": [_entry("sde", [32], 1.5, 3.0), _entry("sde", [64], 1.0, 3.0)],
    "cond": [_entry("ode", [64], 0.0, 1.0, cfg=2)],
    "fewstep": [_entry("sde", [1, 2, 4, 8], 1.5, 2.5), _entry("sde", [16, 32], 2.0, 2.0)],
}


def sampler_preset(name: str, steps: int | None = None, base: SampleConfig | None = None) -> SampleConfig:
    """The sampler setting of the authors' preset ``name`` (:data:`SAMPLER_PRESETS`) on top of
    ``base`` (its noise scale, time-draw parameters, ``t_eps``): for ``steps`` sampler steps the
    listed setting with that many steps, else the one with the nearest step count (the fewer on a
    tie) run for ``steps``; without ``steps`` the preset's first setting."""
    if name not in SAMPLER_PRESETS:
        raise ConfigError(f"unknown sampler preset {name!r}; expected one of {', '.join(SAMPLER_PRESETS)}", "preset")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"sampler preset {name!r}: steps={steps!r}, expected an integer >= 1", "sample.steps")
    settings = sample_configs(SAMPLER_PRESETS[name], base, where=f"sampler preset {name!r}")
    if steps is None:
        return settings[0]
    return replace(min(settings, key=lambda s: (abs(s.steps - steps), s.steps)), steps=steps)


@dataclass
class DataConfig:
    """Training data. Rows are ``max_length`` tokens; a conditional row is
    ``condition[:max_input_length] ++ target`` (SPEC §1), so ``max_input_length`` is None for
    unconditional data. ``tokenizer`` mirrors the encoder's tokenizer. ``train_path`` is a prepared
    folder (``elflm prepare``), or inputs ``elflm prepare`` reads (a Hugging Face dataset folder or
    Hub id, text / JSONL files), prepared on first use with the encoder's tokenizer into a cache;
    the ``*_field`` names pick their text / condition / target fields then."""

    train_path: str | None = None
    eval_path: str | None = None  # held-out prepared data: conditions of evaluations and previews
    max_length: int = 1024
    max_input_length: int | None = None
    pad_token: Literal["pad", "eos"] = "pad"
    tokenizer: str | None = None
    text_field: str = "text"  # unconditional JSONL / dataset column
    source_field: str = "source"  # conditional: the condition ...
    target_field: str = "target"  # ... and the text to generate
    num_workers: int = 0  # DataLoader worker processes (the order is the plan's whatever the number)

    def __post_init__(self):
        check_section("data", self)

    @property
    def conditional(self) -> bool:
        return self.max_input_length is not None


@dataclass
class EncoderConfig:
    """The frozen text encoder whose (normalised) states are the latents: ``t5`` (the T5 encoder
    stack) or ``hf`` (any Hugging Face encoder). ``weights`` replaces the checkpoint of
    ``name_or_path`` (e.g. the official JAX pickle); ``tokenizer`` None means ``name_or_path``.
    ``latent_mean``/``latent_std`` None: estimate from the training data."""

    kind: Literal["t5", "hf"] = "t5"
    name_or_path: str = "t5-small"
    weights: str | None = None
    tokenizer: str | None = None
    latent_mean: float | None = 0.0
    latent_std: float | None = 0.2

    def __post_init__(self):
        check_section("encoder", self)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.name_or_path


@dataclass
class TrainConfig:
    """Optimisation, schedule, parallelism, logging and checkpoints. ``global_batch_size``
    counts the rows of one optimizer update (processes × ``batch_size`` × accumulation).
    The learning rate is ``lr``, or ``blr · global_batch_size / 256`` when ``lr`` is None.
    Warm-up is ``warmup_steps`` when set, else ``warmup_epochs``; the run lasts ``max_steps``
    when set, else ``epochs``. Muon's Adam branch uses ``muon_adam_betas``; ``adam_b1``,
    ``adam_b2`` and ``weight_decay`` belong to ``optimizer: adamw``. ``logger`` adds experiment
    trackers (:mod:`elflm.tracking`) to the console and ``metrics.jsonl``. Every ``eval_every`` steps
    the EMA weights sample ``eval_samples`` rows with the ``sample`` settings (``eval_steps`` steps):
    Gen PPL and entropy under ``eval_judge`` (unconditional runs), BLEU and ROUGE on the first rows
    of ``data.eval_path`` (conditional runs)."""

    global_batch_size: int = 512
    batch_size: int | None = None  # rows per process per micro-batch; None: from grad_accum_steps
    grad_accum_steps: int | None = None  # micro-batches per update; None: from batch_size (else 1)
    blr: float = 1e-3
    lr: float | None = None
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    warmup_steps: int | None = None
    warmup_epochs: float | None = 0.5
    epochs: float = 5.0
    max_steps: int | None = None
    clip: float = 1.0
    optimizer: Literal["muon", "adamw"] = "muon"
    muon_momentum: float = 0.95
    muon_ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    muon_ns_steps: int = 5
    muon_eps: float = 1e-8
    muon_adam_betas: tuple[float, float] = (0.9, 0.999)
    muon_ns_gram: bool | None = None  # Newton–Schulz on the Gram matrix: null = for wide (embedding-like) matrices
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block in backward instead of keeping its activations
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    # branch draw: per_device (official: each micro-batch draws its own), per_step (one for all);
    # auto = per_device, but per_step under FSDP, whose collectives need the same passes on every rank
    branch: Literal["auto", "per_device", "per_step"] = "auto"
    log_every: int = 100
    save_every: int = 5000  # steps; 0: only at the end
    keep_last: int = 3  # checkpoints kept; 0: all
    output_dir: str = "outputs/run"
    resume: str | None = None  # a checkpoint folder, or "auto": the latest in output_dir
    logger: str | None = None  # trackers besides the console and metrics.jsonl: "tensorboard", "wandb" or both
    run_name: str | None = None  # the W&B run name (default: the output folder's name)
    wandb_project: str = "elflm"
    wandb_entity: str | None = None
    wandb_tags: str | None = None  # comma-separated
    preview_every: int = 0  # steps between sample previews; 0: none
    preview_samples: int = 4
    eval_every: int = 0  # steps between evaluations on the EMA weights; 0: none
    eval_samples: int = 64  # unconditional samples, or data.eval_path rows translated
    eval_steps: int | None = None  # sampler steps of the evaluation; null: sample.steps
    eval_batch_size: int = 32  # rows per sampler call and per judge batch
    eval_judge: str = "gpt2-large"  # Gen PPL judge of unconditional runs (elflm eval --judge)
    cache_latents: Literal["memory", "disk"] | None = None  # reuse the frozen encoder's latents of rows seen before
    latent_cache_dir: str | None = None  # cache_latents=disk: where; null: $XDG_CACHE_HOME/elflm/latents
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a step with a NaN / inf loss or gradient norm: stop, or skip it
    allow_config_change: bool = False  # resume with changed optimizer / schedule / batch settings (printed)

    def __post_init__(self):
        check_section("train", self)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.global_batch_size / 256

    def micro_batch(self, world: int) -> tuple[int, int]:
        """``(rows per micro-batch, micro-batches per update)`` with ``world`` processes."""
        G = self.global_batch_size
        accum = self.grad_accum_steps or (G // (self.batch_size * world) if self.batch_size else 1)
        micro = self.batch_size or G // (world * accum)
        if micro < 1 or micro * world * accum != G:
            raise ConfigError(
                f"train.global_batch_size={G} must equal train.batch_size ({self.batch_size}) × processes ({world}) "
                f"× train.grad_accum_steps ({self.grad_accum_steps})",
                "train.global_batch_size",
            )
        return micro, accum


PRESETS: dict[str, dict] = {
    "elf-b": dict(hidden_size=768, depth=12, num_heads=12),
    "elf-m": dict(hidden_size=1056, depth=24, num_heads=16),
    "elf-l": dict(hidden_size=1280, depth=32, num_heads=16),
    "tiny": dict(hidden_size=64, depth=2, num_heads=4, bottleneck_dim=16, max_length=64),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A :class:`ModelConfig` for ``elf-b``, ``elf-m``, ``elf-l`` or ``tiny``, with overrides."""
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}", "model.preset")
    return ModelConfig(**{**PRESETS[key], **overrides})


TRACKERS = ("tensorboard", "wandb")  # train.logger: trackers besides the console and metrics.jsonl

# mirror key -> its home; Config copies the home's value when it is not None
MIRRORS = {
    "model.max_length": "data.max_length",
    "objective.pad_token": "data.pad_token",
    "objective.latent_mean": "encoder.latent_mean",
    "objective.latent_std": "encoder.latent_std",
    "data.tokenizer": "encoder.tokenizer_name",
    "sample.noise_scale": "objective.noise_scale",
    "sample.p_mean": "objective.p_mean",
    "sample.p_std": "objective.p_std",
    "sample.t_eps": "objective.t_eps",
}
_HOME_SOURCES = {"encoder.tokenizer_name": ("encoder.tokenizer", "encoder.name_or_path")}
_FROM_ENCODER = ("encoder_dim", "vocab_size")  # model keys a YAML may not set


@dataclass
class Config:
    """A full run: ``model``, ``encoder``, ``data``, ``objective``, ``train``, ``sample`` and, for
    ``elflm distill``, ``distill``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, got {type(getattr(self, name)).__name__}", name)
        for mirror, home in MIRRORS.items():
            value = _get(self, home)
            section, name = mirror.split(".")
            if value is not None and getattr(getattr(self, section), name) != value:
                setattr(self, section, replace(getattr(self, section), **{name: value}))

    def resolved_model(self, encoder_dim: int, vocab_size: int) -> ModelConfig:
        """The network's config: ``model`` with C and V of the loaded encoder."""
        for key, v in (("encoder_dim", encoder_dim), ("vocab_size", vocab_size)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(
                    f"model.{key}: the encoder reported {v!r}; expected a positive integer", f"model.{key}"
                )
        return replace(self.model, encoder_dim=encoder_dim, vocab_size=vocab_size)


SECTIONS = {
    "model": ModelConfig,
    "encoder": EncoderConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "distill": DistillConfig,
}


@dataclass
class Settings:
    """What a pretrained model carries besides its sizes: how to rebuild the frozen ``encoder``,
    the ``data`` layout (conditional ``max_input_length``, ``pad_token``), the ``objective``
    (latent mean / std, noise scale), the ``sample`` defaults and the weights' ``source``."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    source: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config, source: dict | None = None) -> Settings:
        """The settings of a training run's :class:`Config`."""
        return cls(cfg.encoder, cfg.data, cfg.objective, cfg.sample, dict(source or {}))


# ------------------------------------------------------------------------------ the authors' configs
# The fields of the authors' flat ``Config`` with their defaults (what a YAML that omits a field
# gets), and what each becomes here: a dotted key, or None with the reason it is not used.
OFFICIAL_DEFAULTS = dict(
    data_path=None,
    eval_data_path=None,
    max_length=128,
    max_input_length=None,
    pad_token="pad",
    tokenizer_name=None,
    encoder_model_name="t5-small",
    encoder_checkpoint=None,
    latent_mean=0.0,
    latent_std=1.0,
    model="ELF-B",
    bottleneck_dim=128,
    num_time_tokens=4,
    num_self_cond_cfg_tokens=4,
    num_model_mode_tokens=4,
    attn_dropout=0.0,
    proj_dropout=0.0,
    denoiser_p_mean=0.8,
    denoiser_p_std=0.8,
    denoiser_noise_scale=1.0,
    t_eps=0.05,
    time_schedule="logit_normal",
    decoder_prob=0.5,
    decoder_noise_scale=1.0,
    decoder_p_mean=0.8,
    decoder_p_std=0.8,
    label_drop_prob=0.0,
    self_cond_prob=0.5,
    self_cond_cfg_min=0.5,
    self_cond_cfg_max=5.0,
    epochs=200,
    warmup_epochs=None,
    warmup_steps=5000,
    batch_size=None,
    global_batch_size=512,
    lr=None,
    blr=5e-5,
    min_lr=0.0,
    lr_schedule="constant",
    weight_decay=0.0,
    optimizer="muon",
    adam_b1=0.9,
    adam_b2=0.95,
    grad_accum_steps=1,
    ema_decay1=0.9999,
    sampling_configs_path=None,
    sampling_configs=None,
    num_samples=100,
    online_eval=True,
    eval_ppl_model="gpt2-large",
    eval_ppl_batch_size=64,
    eval_ppl_max_length=1024,
    log_freq=100,
    eval_freq=10,
    save_freq=100,
    output_dir="./output_dir",
    hf_repo_id=None,
    resume=None,
    use_wandb=False,
    wandb_project="ELF",
    wandb_entity=None,
    wandb_run_name=None,
    wandb_tag=None,
    wandb_resume="allow",
    seed=0,
    num_workers=0,
)
# The authors' ``SamplingConfig`` defaults (entries of a sampling-config YAML).
OFFICIAL_SAMPLING_DEFAULTS = dict(
    sampling_method="ode",
    num_sampling_steps=[50],
    cfgs=[1],
    self_cond_cfg_scales=[1.0],
    time_schedule="logit_normal",
    sde_gamma=0.0,
)
_SAME = {
    "data": ["max_length", "max_input_length", "pad_token", "num_workers"],
    "model": ["bottleneck_dim", "num_time_tokens", "num_self_cond_cfg_tokens"],
    "objective": [
        "t_eps",
        "time_schedule",
        "decoder_prob",
        "decoder_noise_scale",
        "decoder_p_mean",
        "decoder_p_std",
        "label_drop_prob",
        "self_cond_prob",
        "self_cond_cfg_min",
        "self_cond_cfg_max",
    ],
    "train": [
        "epochs",
        "warmup_epochs",
        "warmup_steps",
        "global_batch_size",
        "grad_accum_steps",
        "lr",
        "blr",
        "min_lr",
        "lr_schedule",
        "weight_decay",
        "optimizer",
        "adam_b1",
        "adam_b2",
        "output_dir",
        "resume",
        "seed",
        "wandb_project",
        "wandb_entity",
        "compile",
    ],
    "sample": ["num_samples"],
}
# the ``distillation`` branch's fields -> our key (no official defaults: a training config has none)
OFFICIAL_DISTILL = {
    "pd_step_size": "distill.pd_step_size",
    "pd_teacher_steps": "distill.pd_teacher_steps",
    "pd_student_schedule": "distill.pd_student_schedule",
    "pd_teacher_schedule": "distill.pd_teacher_schedule",
    "teacher_path": "distill.teacher",
    "teacher_use_ema": "distill.teacher_use_ema",
    "student_init_from_checkpoint": "distill.student_init",
}
# official field -> our key
OFFICIAL_KEYS = {
    **OFFICIAL_DISTILL,
    **{k: f"{section}.{k}" for section, keys in _SAME.items() for k in keys},
    "model": "model.preset",
    "data_path": "data.train_path",
    "tokenizer_name": "encoder.tokenizer",
    "encoder_model_name": "encoder.name_or_path",
    "encoder_checkpoint": "encoder.weights",
    "latent_mean": "encoder.latent_mean",
    "latent_std": "encoder.latent_std",
    "num_model_mode_tokens": "model.num_mode_tokens",
    "proj_dropout": "model.dropout",
    "denoiser_p_mean": "objective.p_mean",
    "denoiser_p_std": "objective.p_std",
    "denoiser_noise_scale": "objective.noise_scale",
    "ema_decay1": "train.ema_decay",
    "log_freq": "train.log_every",
    "use_wandb": "train.logger",
    "wandb_run_name": "train.run_name",
    "wandb_tag": "train.wandb_tags",
    "precision": "train.precision",  # the Lightning reproduction's
    # a sampling-config entry
    "sampling_method": "sample.method",
    "num_sampling_steps": "sample.steps",
    "sde_gamma": "sample.gamma",
    "self_cond_cfg_scales": "sample.w",
    "cfgs": "sample.cfg_scale",
    "sampling_configs": "sample",
    "sampling_configs_path": "sample",
    # evaluation while training
    "eval_data_path": "data.eval_path",
    "online_eval": "train.eval_every",
    "eval_freq": "train.eval_every",  # official: epochs; ours: steps
    "eval_ppl_model": "train.eval_judge",
    "eval_ppl_batch_size": "train.eval_batch_size",
}
# official field -> why it has no key here (the Lightning reproduction's extra fields included)
OFFICIAL_UNUSED = {
    "attn_dropout": "the official network never uses it",
    "batch_size": "set at run time by the official code (global_batch_size / devices); here train.batch_size",
    "eval_ppl_max_length": "`elflm eval` scores 1024 tokens",
    "save_freq": "epochs; train.save_every counts steps",
    "hf_repo_id": "upload with `elflm push`",
    "wandb_resume": "a resumed run continues the W&B run of its output_dir",
    "prefetch_factor": "the loader keeps its default prefetch (data.num_workers sets the workers)",
    "pin_memory": "memory is pinned whenever the device is CUDA",
    "persistent_workers": "the loader's workers live for the whole run",
    "use_flash": "scaled_dot_product_attention picks flash attention itself",
    "epoch_eval_num_samples": "train.preview_samples",
    "epoch_eval_num_sampling_steps": "the sample section",
    "epoch_eval_sde_gamma": "the sample section",
    "epoch_eval_self_cond_cfg_scale": "the sample section",
    "initialize_student_from_teacher": "the student starts from the teacher, or from distill.student_init",
}


def is_official(raw) -> bool:
    """Whether a YAML mapping is one of the authors' flat configs: no section of ours (``model``
    aside, a field in both) and at least one other official field."""
    if not isinstance(raw, dict):
        return False
    keys = set(raw) - {"model"}
    return not keys & set(SECTIONS) and bool(keys & (set(OFFICIAL_DEFAULTS) | set(OFFICIAL_UNUSED)))


def _find_beside(name: str, source: Path | None) -> Path | None:
    """``name`` as given (from the working directory), else relative to the YAML's folder or one
    of its parents (the official paths are relative to their ``src/``)."""
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute() or source is None:
        return path if path.exists() else None
    return next((d / name for d in Path(source).resolve().parents if (d / name).exists()), None)


def read_sampling_configs(path: str | Path) -> list[dict]:
    """The entries of the authors' sampling-config YAML (a list of ``SamplingConfig`` fields), or,
    for one of our YAML files, its ``sample`` section (a mapping) as one entry in our names."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a sampling config ({' '.join(str(e).split())})") from None
    if isinstance(data, dict):
        data = data.get("sample", data)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: 'sample' must be a mapping of sampler settings")
        return [data]
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        raise ConfigError(
            f"{path}: expected the authors' sampling-config list (- sampling_method: sde ...) or a 'sample' mapping"
        )
    return data


def sample_configs(
    entries: list[dict], base: SampleConfig | None = None, where: str = "sampling config"
) -> list[SampleConfig]:
    """Every sampler setting the entries describe, in the official order (per entry: steps × cfg
    scale × self-conditioning scale), on top of ``base``; an entry in our names (a ``sample``
    section) is one setting."""
    base = base or SampleConfig()
    hints, out = _hints(SampleConfig), []
    for i, entry in enumerate(entries):
        here = f"{where} entry {i + 1}"
        if entry and set(entry) <= set(hints):  # ours
            given = {k: _coerce(v, hints[k], f"sample.{k}") for k, v in entry.items()}
            out.append(_replaced(base, given, here))
            continue
        unknown = sorted(set(entry) - set(OFFICIAL_SAMPLING_DEFAULTS))
        if unknown:
            raise ConfigError(
                f"{here}: unknown sampling field(s) {unknown}; expected {sorted(OFFICIAL_SAMPLING_DEFAULTS)}"
            )
        e = {**OFFICIAL_SAMPLING_DEFAULTS, **entry}
        lists = {
            k: e[k] if isinstance(e[k], list) else [e[k]]
            for k in ("num_sampling_steps", "cfgs", "self_cond_cfg_scales")
        }
        for steps, cfg_scale, w in itertools.product(
            lists["num_sampling_steps"], lists["cfgs"], lists["self_cond_cfg_scales"]
        ):
            values = dict(
                method=e["sampling_method"],
                steps=steps,
                grid=e["time_schedule"],
                gamma=e["sde_gamma"] or 0.0,
                w=w,
                cfg_scale=cfg_scale,
            )
            given = {k: _coerce(v, hints[k], f"{here}: {k}") for k, v in values.items()}
            setting = _replaced(base, given, here)
            if setting not in out:
                out.append(setting)
    return out


def _replaced(base: SampleConfig, given: dict, where: str) -> SampleConfig:
    """``base`` with the settings ``given``; a range error names ``where`` they come from."""
    try:
        return replace(base, **given)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}", e.key) from None


def _official_value(key: str, value, raw: dict, source: Path | None):
    """An official field's value in our terms (None: leave our default)."""
    if key == "model":
        return str(value).lower().replace("_", "-")
    if key == "warmup_steps":
        return None if value is None or value < 0 else value
    if key == "global_batch_size":  # ours counts one optimizer update, the official one micro-batch per step
        return value * (raw.get("grad_accum_steps") or 1)
    if key == "use_wandb":
        return "wandb" if value else None
    if key == "precision":
        text = str(value).lower()
        if text.startswith("bf16"):
            return "bf16"
        if text in ("fp32", "32", "32-true"):
            return "fp32"
        raise ConfigError(f"precision={value!r}: only fp32 and bf16 (bf16-mixed) are supported here", "train.precision")
    if key == "resume" and value is not None and str(value) == str(raw.get("output_dir", "")):
        return "auto"  # the official resume from the run's own folder, if it has a checkpoint
    if key == "encoder_checkpoint" and value is not None and not str(value).count("/") >= 2:
        found = _find_beside(str(value), source)  # a local pickle beside the YAML or above it
        return str(found) if found is not None else value
    return value


def from_official(raw: dict, source: str | Path | None = None) -> tuple[dict, list[str]]:
    """Our nested YAML dict (``{section: {key: value}}``) of one of the authors' flat training
    configs (their ``train_*.yml``, a dumped ``config.yml`` or the Lightning reproduction's), with
    the official defaults for the fields it omits; and the lines that report how each given field
    maps, which official defaults were applied and which fields are not used (and why). A
    ``sampling_configs_path`` is read relative to the working directory or the YAML's folders;
    its first setting becomes the ``sample`` section."""
    source = Path(source) if source is not None else None
    known = set(OFFICIAL_DEFAULTS) | set(OFFICIAL_UNUSED) | set(OFFICIAL_DISTILL) | {"precision", "compile"}
    report, out = [], {name: {} for name in SECTIONS}
    values = {**{k: v for k, v in OFFICIAL_DEFAULTS.items() if k in OFFICIAL_KEYS}, **raw}
    defaults = sorted(
        k for k in OFFICIAL_DEFAULTS if k not in raw and k in OFFICIAL_KEYS and not k.startswith("sampling")
    )
    for key, value in values.items():
        if key in ("sampling_configs", "sampling_configs_path") or key in OFFICIAL_UNUSED or key not in known:
            continue
        target = OFFICIAL_KEYS[key]
        ours = _official_value(key, value, raw, source)
        section, name = target.split(".")
        if ours is not None or name in ("lr", "warmup_steps", "warmup_epochs", "max_input_length", "resume"):
            if target == "model.preset":
                out["model"] = {"preset": ours}
            else:
                out[section][name] = ours
        if key in raw:
            shown = (
                "null (ours: " + ("epochs" if name == "warmup_steps" else "the default") + ")"
                if ours is None
                else repr(ours)
            )
            report.append(f"  {key}: {value!r} -> {target} = {shown}")
    entries, where = raw.get("sampling_configs"), "sampling_configs"
    if raw.get("sampling_configs_path") and not entries:
        found = _find_beside(str(raw["sampling_configs_path"]), source)
        if found is None:
            report.append(
                f"  sampling_configs_path: {raw['sampling_configs_path']!r} not found (looked beside {source}); "
                "the sample section keeps its defaults"
            )
        else:
            entries, where = read_sampling_configs(found), str(found)
    if not entries and "sampling_configs_path" not in raw:
        entries, where = [{}], "official default SamplingConfig"
    if entries:
        settings = sample_configs(entries, where=where)
        first = settings[0]
        out["sample"].update({k: getattr(first, k) for k in ("method", "steps", "grid", "gamma", "w", "cfg_scale")})
        more = (
            f"; {len(settings)} settings listed, `elflm sweep --sampling-config` runs them all"
            if len(settings) > 1
            else ""
        )
        report.append(f"  {where}: -> sample = the first setting ({setting_text(first)}){more}")
    if defaults:
        report.append("  official defaults for the fields the file omits: " + ", ".join(defaults))
    unused = [k for k in raw if k in OFFICIAL_UNUSED]
    unknown = [k for k in raw if k not in known]
    for k in unused:
        report.append(f"  not used: {k} ({OFFICIAL_UNUSED[k]})")
    for k in unknown:
        report.append(f"  not used: {k} (not a field of the official config)")
    out = {k: v for k, v in out.items() if v}
    return out, report


def setting_text(s: SampleConfig) -> str:
    """A sampler setting in one phrase: method, steps, γ, w, cfg scale, grid."""
    gamma = f" γ={s.gamma:g}" if s.method == "sde" else ""
    return f"{s.method} {s.steps} steps{gamma} w={s.w:g} cfg={s.cfg_scale:g} {s.grid}"


# ------------------------------------------------------------------------------ types
def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@functools.cache
def _hints(cls) -> dict:
    return get_type_hints(cls)


def _arms(tp) -> tuple:
    """The alternatives of a union type, or ``(tp,)``."""
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)


def _describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _number(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _coerce(value, tp, key: str):
    """``value`` as type ``tp``: ints become floats, numeric strings numbers, "true"/"false"
    bools, integral floats ints; anything else that does not fit raises."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal and isinstance(value, str) and value in args:
        return value
    if isinstance(value, str) and tp in (int, float):
        value = _number(value)
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: type(v) is int or (type(v) is float and v.is_integer()),
        float: lambda v: type(v) in (int, float),
        str: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is not None and ok(value):
        out = tp(value)
        if tp is float and not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}", key)
        if tp is int and not -INT_LIMIT < out < INT_LIMIT:
            raise ConfigError(f"{key}: expected an integer in (-2**63, 2**63), got {value!r}", key)
        return out
    if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}", key)


def _unknown(key: str, options) -> ConfigError:
    section, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    elsewhere = [f"{s}.{name}" for s, cls in SECTIONS.items() if s != section and name in _hints(cls)]
    guess = (  # an official name maps for sure; a close spelling is a guess
        OFFICIAL_KEYS.get(name)
        or (f"{section}.{close[0]}" if close and section else close[0] if close else None)
        or (elsewhere[0] if elsewhere else None)
    )
    hint = f"; did you mean {guess!r}?" if guess else f"; expected one of {', '.join(options)}"
    return ConfigError(f"unknown key {key!r}{hint}", key)


# ------------------------------------------------------------------------------ dict <-> Config
def _section(name: str, raw) -> tuple[object, dict]:
    """A section dataclass from its YAML mapping; also returns the coerced explicit values."""
    cls = SECTIONS[name]
    if name == "model" and isinstance(raw, str):
        raw = {"preset": raw}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        extra = " or a preset name (elf-b, elf-m, elf-l, tiny)" if name == "model" else ""
        raise ConfigError(f"{name}: expected a mapping of settings{extra}, got {raw!r}", name)
    raw, base = dict(raw), {}
    if name == "model" and "preset" in raw:
        preset = raw.pop("preset")
        if not isinstance(preset, str):
            raise ConfigError(f"model.preset: expected a preset name, got {preset!r}", "model.preset")
        try:
            base = asdict(model_preset(preset))
        except ConfigError as e:
            raise ConfigError(f"model.preset: {e}", "model.preset") from None
    hints, given = _hints(cls), {}
    for k, v in raw.items():
        key = f"{name}.{k}"
        if name == "model" and k in _FROM_ENCODER:
            raise ConfigError(
                f"{key} is a property of the encoder (filled from it when the model is built); remove it", key
            )
        if k not in hints or k.startswith("_"):
            raise _unknown(key, [*hints, *(["preset"] if name == "model" else [])])
        given[k] = _coerce(v, hints[k], key)
    return cls(**{**base, **given}), given


def from_dict(d: dict) -> Config:
    """A validated :class:`Config` from nested ``{section: {key: value}}`` (YAML layout)."""
    if not isinstance(d, dict):
        raise ConfigError(f"expected a mapping of sections ({', '.join(SECTIONS)}), got {type(d).__name__}")
    for k in d:
        if k not in SECTIONS:
            raise _unknown(str(k), SECTIONS)
    built = {name: _section(name, d.get(name)) for name in SECTIONS}
    sections = {name: obj for name, (obj, _) in built.items()}
    for mirror, home in MIRRORS.items():
        section, key = mirror.split(".")
        home_section, home_key = home.split(".")
        home_value = getattr(sections[home_section], home_key)
        if key in built[section][1] and home_value is not None and built[section][1][key] != home_value:
            raise ConfigError(
                f"{mirror}={built[section][1][key]!r} contradicts {home}={home_value!r}: {mirror} is a "
                f"copy of {home}; set {home.replace('tokenizer_name', 'tokenizer')} only",
                mirror,
            )
    return validate(Config(**sections))


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (lists for tuples) that :func:`from_dict` turns back into ``cfg``."""
    out = {}
    for name in SECTIONS:
        section = asdict(getattr(cfg, name))
        out[name] = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in section.items()
            if not (name == "model" and k in _FROM_ENCODER)
        }
    return out


def apply_overrides(d: dict, overrides) -> dict:
    """A copy of the YAML dict ``d`` with dotted ``section.key=value`` overrides applied (values
    parsed as YAML; the text exactly as given for settings that take a string, such as paths:
    ``#``, spaces and line breaks are kept). ``model=elf-m`` (or ``model.preset=``)
    replaces the model section by a preset. An override of a home key drops the stale copies of
    its mirrors."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for item in overrides:
        key, eq, text = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.blr=1e-3")
        if key in ("model", "model.preset"):
            d["model"] = {"preset": text.strip()}
            continue
        section, dot, name = key.partition(".")
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS)
        if not dot or "." in name:
            raise ConfigError(f"override {item!r}: expected section.key=value with one dot", key)
        tp = _hints(SECTIONS[section]).get(name)
        if str in _arms(tp) and text.strip():  # a string setting (a path, a name) is taken literally
            value = text
        else:
            try:
                value = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError:
                value = text
        current = d.get(section)
        d[section] = {"preset": current} if isinstance(current, str) else dict(current or {})
        d[section][name] = value
        for mirror, home in MIRRORS.items():
            ms, mk = mirror.split(".")
            if key in _HOME_SOURCES.get(home, (home,)) and isinstance(d.get(ms), dict):
                d[ms].pop(mk, None)
    return d


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


BUNDLED = Path(__file__).parent / "configs"


def config_path(name: str | Path) -> Path:
    """``name`` as a path, or, when no such file exists, the config of that name shipped with
    elflm (``elf-b-owt`` or ``elf-b-owt.yaml``: see :func:`bundled_configs`)."""
    path = Path(name).expanduser()
    if path.exists() or path.parent != Path("."):
        return path
    for candidate in (BUNDLED / path.name, BUNDLED / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    return path


def bundled_configs() -> list[str]:
    """Names of the run configs shipped with elflm (``elflm train --config <name>``)."""
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def load_config(path: str | Path, overrides=(), log=None) -> Config:
    """Read a YAML config (a file, or the name of a bundled one: :func:`config_path`), apply
    dotted overrides (``["model.depth=24", "train.blr=1e-3"]``) and validate. One of the authors'
    flat training YAMLs is accepted as it is (:func:`from_official`); ``log`` (e.g. ``print``)
    then receives the lines saying how each official field maps and which are not used. Errors
    name the file (and line for malformed YAML) and the key."""
    path = config_path(path)
    if not path.is_file():
        raise ConfigError(
            f"config {str(path)!r} not found: give a YAML file or one of the bundled configs "
            f"({', '.join(bundled_configs())})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); expected a YAML config"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, (dict, type(None))):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    overrides = list(overrides)
    if is_official(raw):
        try:
            raw, report = from_official(raw, path)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}", e.key) from None
        if log is not None:
            log(f"{path}: the authors' flat config; how its fields map:")
            for line in report:
                log(line)
    try:
        return from_dict(apply_overrides(raw or {}, overrides))
    except ConfigError as e:
        keys = [str(o).split("=", 1)[0].strip() for o in overrides]
        culprit = [o for o, k in zip(overrides, keys) if e.key and e.key in (k, "model.preset" if k == "model" else k)]
        source = f"{path} (override {culprit[-1]!r})" if culprit else str(path)  # the last one is in effect
        raise ConfigError(f"{source}: {e}", e.key) from None


# ------------------------------------------------------------------------------ resuming
# train.* settings that do not change the optimisation: a resumed run may change them freely
# (train.max_steps / train.epochs too, unless the cosine schedule decays over the run's length)
RESUME_FREE = {
    "train." + k
    for k in (
        "device",
        "compile",
        "cache_latents",
        "latent_cache_dir",
        "activation_checkpointing",
        "distributed",
        "log_every",
        "save_every",
        "keep_last",
        "output_dir",
        "resume",
        "logger",
        "run_name",
        "wandb_project",
        "wandb_entity",
        "wandb_tags",
        "preview_every",
        "preview_samples",
        "eval_every",
        "eval_samples",
        "eval_steps",
        "eval_batch_size",
        "eval_judge",
        "on_nonfinite",
        "allow_config_change",
    )
} | {"data.num_workers", "data.eval_path"}
RESUME_REFUSED = ("model", "encoder", "data", "objective")  # sections that define the model and its data


def config_changes(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` of every setting that differs between two configs,
    section by section; mirror copies (:data:`MIRRORS`) are left out (their home is listed)."""
    a, b = to_dict(old), to_dict(new)
    return [
        (f"{name}.{k}", v, b[name][k])
        for name in SECTIONS
        for k, v in a[name].items()
        if v != b[name][k] and f"{name}.{k}" not in MIRRORS
    ]


def resume_changes(saved: Config, current: Config, changes=None) -> tuple[list, list, list]:
    """What resuming a run saved with ``saved`` under ``current`` changes, as three lists of
    :func:`config_changes` entries (``changes``: those, already computed): ``refused`` (the model,
    encoder, data or objective), ``optimisation`` (optimizer, schedule, batch, seed, precision:
    allowed with ``train.allow_config_change``) and ``free`` (:data:`RESUME_FREE`, the sampler
    defaults; the run's length unless the schedule is cosine)."""
    changes = config_changes(saved, current) if changes is None else changes
    length_free = saved.train.lr_schedule == current.train.lr_schedule == "constant"
    refused, optimisation, free = [], [], []
    for change in changes:
        key = change[0]
        if (
            key in RESUME_FREE
            or key.startswith("sample.")
            or (length_free and key in ("train.max_steps", "train.epochs"))
        ):
            free.append(change)
        elif key.split(".")[0] in RESUME_REFUSED:
            refused.append(change)
        else:
            optimisation.append(change)
    return refused, optimisation, free


def format_changes(changes, limit: int = 8) -> str:
    """``key: old → new`` of :func:`config_changes` entries, on one line."""
    shown = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."  # noqa: E731
    text = "; ".join(f"{k}: {shown(a)} → {shown(b)}" for k, a, b in changes[:limit])
    return text + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal Config (atomically:
    :func:`elflm.files.write_text`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


# ------------------------------------------------------------------------------ validation
INT_LIMIT = 2**63  # every integer setting lies in (-2**63, 2**63) (torch's int64); seeds in [0, 2**63)
MAX_SAMPLER_STEPS = 100_000  # sample.steps: the time grid is allocated per row
MAX_NUM_SAMPLES = 10_000_000  # sample.num_samples
MAX_WORKERS = 256  # worker processes one setting may start (data.num_workers; elflm prepare --workers)
MAX_GUIDANCE = 100.0  # sample.w, sample.cfg_scale (the authors use 1-3)
MAX_CHURN = 100.0  # sample.gamma (the authors use 0-2)

_POSITIVE_INT = [
    "model.hidden_size",
    "model.depth",
    "model.num_heads",
    "model.bottleneck_dim",
    "data.max_length",
    "train.global_batch_size",
    "train.log_every",
    "train.muon_ns_steps",
    "train.preview_samples",
    "train.eval_samples",
    "train.eval_batch_size",
    "sample.steps",
    "sample.num_samples",
]
_NON_NEGATIVE = [
    "data.num_workers",
    "model.num_time_tokens",
    "model.num_self_cond_cfg_tokens",
    "model.num_mode_tokens",
    "objective.self_cond_cfg_min",
    "train.min_lr",
    "train.weight_decay",
    "train.epochs",
    "train.muon_eps",
    "train.save_every",
    "train.keep_last",
    "train.preview_every",
    "train.eval_every",
    "sample.gamma",
    "sample.w",
    "sample.cfg_scale",
    "sample.p_std",
]
_POSITIVE = [
    "model.mlp_ratio",
    "objective.noise_scale",
    "objective.p_std",
    "objective.decoder_noise_scale",
    "objective.decoder_p_std",
    "train.blr",
    "train.clip",
    "sample.noise_scale",
]
_PROBABILITY = [
    "objective.decoder_prob",
    "objective.self_cond_prob",
    "objective.label_drop_prob",
    "train.ema_decay",
    "train.adam_b1",
    "train.adam_b2",
]
_OPTIONAL_MIN = {
    "data.max_input_length": 1,
    "train.batch_size": 1,
    "train.grad_accum_steps": 1,
    "train.warmup_steps": 0,
    "train.warmup_epochs": 0,
    "train.max_steps": 1,
    "train.eval_steps": 1,
}
_AT_MOST = {  # sizes bounded before anything is built (ELF-L: depth 32, hidden 1280)
    "model.depth": 1024,
    "model.max_length": 2**20,
    "model.hidden_size": 65536,
    "model.bottleneck_dim": 65536,
    "model.mlp_ratio": 64,
    "model.num_time_tokens": 1024,
    "model.num_self_cond_cfg_tokens": 1024,
    "model.num_mode_tokens": 1024,
    "data.max_length": 2**20,
    "data.num_workers": MAX_WORKERS,
    "sample.steps": MAX_SAMPLER_STEPS,
    "sample.num_samples": MAX_NUM_SAMPLES,
    "sample.w": MAX_GUIDANCE,
    "sample.cfg_scale": MAX_GUIDANCE,
    "sample.gamma": MAX_CHURN,
}


def _need(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}", key)


def _ranges(name: str, get) -> None:
    """The one-key range checks of section ``name``; ``get(key)`` reads a dotted key."""
    mine = lambda keys: [k for k in keys if k.startswith(name + ".")]  # noqa: E731
    for key in mine(_POSITIVE_INT):
        _need(get(key) >= 1, key, get(key), "an integer >= 1")
    for key in mine(_NON_NEGATIVE):
        _need(get(key) >= 0, key, get(key), "a value >= 0")
    for key in mine(_POSITIVE):
        _need(get(key) > 0, key, get(key), "a value > 0")
    for key in mine(_PROBABILITY):
        _need(0 <= get(key) <= 1, key, get(key), "a probability in [0, 1]")
    for key in mine(_OPTIONAL_MIN):
        low = _OPTIONAL_MIN[key]
        _need(get(key) is None or get(key) >= low, key, get(key), f"null or a value >= {low}")
    for key in mine(_AT_MOST):
        _need(get(key) <= _AT_MOST[key], key, get(key), f"at most {_AT_MOST[key]:,}")


def _relations(name: str, section) -> None:
    """The checks between settings of one section."""
    if name == "model":
        m = section
        _need(
            m.hidden_size % m.num_heads == 0,
            "model.hidden_size",
            m.hidden_size,
            f"a multiple of model.num_heads ({m.num_heads})",
        )
        _need(
            m.hidden_size // m.num_heads % 2 == 0,
            "model.num_heads",
            m.num_heads,
            "a head width hidden_size/num_heads that is even (RoPE rotates pairs); "
            f"got {m.hidden_size / m.num_heads:g}",
        )
        _need(0 <= m.dropout < 1, "model.dropout", m.dropout, "a rate in [0, 1)")
    elif name == "objective":
        o = section
        _need(0 < o.t_eps <= 1, "objective.t_eps", o.t_eps, "a value in (0, 1]")
        _need(
            o.self_cond_cfg_max >= o.self_cond_cfg_min,
            "objective.self_cond_cfg_max",
            o.self_cond_cfg_max,
            f">= objective.self_cond_cfg_min ({o.self_cond_cfg_min})",
        )
    elif name == "data":
        d = section
        _need(
            d.max_input_length is None or d.max_input_length < d.max_length,
            "data.max_input_length",
            d.max_input_length,
            f"fewer tokens than data.max_length ({d.max_length}), leaving room for the target",
        )
    elif name == "encoder":
        e = section
        _need(e.latent_std is None or e.latent_std > 0, "encoder.latent_std", e.latent_std, "null (estimate) or > 0")
        _need(bool(e.name_or_path), "encoder.name_or_path", e.name_or_path, "a model name or folder")
    elif name == "train":
        t = section
        _need(0 <= t.seed < INT_LIMIT, "train.seed", t.seed, "an integer in [0, 2**63)")
        _need(t.epochs > 0 or t.max_steps is not None, "train.epochs", t.epochs, "> 0, or train.max_steps set")
        _need(t.lr is None or t.lr > 0, "train.lr", t.lr, "null (blr scaling) or > 0")
        _need(0 <= t.muon_momentum < 1, "train.muon_momentum", t.muon_momentum, "a value in [0, 1)")
        _need(
            all(0 <= b < 1 for b in t.muon_adam_betas),
            "train.muon_adam_betas",
            t.muon_adam_betas,
            "two values in [0, 1)",
        )
        per = (t.batch_size or 1) * (t.grad_accum_steps or 1)
        _need(
            t.global_batch_size % per == 0,
            "train.global_batch_size",
            t.global_batch_size,
            f"a multiple of train.batch_size × train.grad_accum_steps ({per})",
        )
        trackers = [] if t.logger is None else [x.strip() for x in t.logger.split(",")]
        _need(
            all(x in TRACKERS for x in trackers),
            "train.logger",
            t.logger,
            f"null or a comma-separated list of {', '.join(TRACKERS)}",
        )
        _need(bool(t.eval_judge.strip()), "train.eval_judge", t.eval_judge, "a judge (Hub id, folder, .gguf) or 'none'")
    elif name == "sample":
        s = section
        _need(0 < s.t_eps <= 1, "sample.t_eps", s.t_eps, "a value in (0, 1]")
        _need(0 < s.t_final <= 1, "sample.t_final", s.t_final, "a value in (0, 1]")


def check_section(name: str, section) -> None:
    """Check one section (``name`` in ``model``, ``encoder``, ``data``, ``objective``, ``train``,
    ``sample``): every value of its declared type (a bool is not a number, a string is not a
    number, floats finite, integers within int64), in its range, and consistent with the others
    of the section; raises :class:`ConfigError` naming the dotted key, the value and what is
    expected. The same number written another way is normalised in place (4 → 4.0 for a float,
    2.0 → 2 for an integer, a list → a tuple). Every section dataclass calls it on creation."""
    for k, tp in _hints(SECTIONS[name]).items():
        key, v = f"{name}.{k}", getattr(section, k)
        c = _coerce(v, tp, key)
        if c != v and not (isinstance(v, list) and tuple(v) == c) or isinstance(v, str) != isinstance(c, str):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {v!r}", key)
        if c is not v:
            setattr(section, k, c)
    _ranges(name, lambda key: getattr(section, key.split(".")[1]))
    _relations(name, section)


def validate(cfg: Config) -> Config:
    """Check types and value ranges of every section (:func:`check_section`) and the settings that
    involve several sections; returns ``cfg`` or raises :class:`ConfigError`."""
    for name in SECTIONS:
        check_section(name, getattr(cfg, name))
    s, d = cfg.sample, cfg.data
    _need(
        s.cfg_scale == 1 or d.conditional,
        "sample.cfg_scale",
        s.cfg_scale,
        "1 for an unconditional model (classifier-free guidance needs data.max_input_length)",
    )
    for mirror, home in MIRRORS.items():
        if _get(cfg, home) is not None and _get(cfg, mirror) != _get(cfg, home):
            raise ConfigError(
                f"{mirror}={_get(cfg, mirror)!r} differs from its home {home}={_get(cfg, home)!r}; "
                "after editing a Config in place, re-sync it with dataclasses.replace(cfg)",
                mirror,
            )
    return cfg


__all__ = [
    "ConfigError",
    "ModelConfig",
    "ObjectiveConfig",
    "DistillConfig",
    "SampleConfig",
    "DataConfig",
    "EncoderConfig",
    "TrainConfig",
    "Config",
    "Settings",
    "PRESETS",
    "MIRRORS",
    "OFFICIAL_KEYS",
    "OFFICIAL_DEFAULTS",
    "OFFICIAL_UNUSED",
    "OFFICIAL_DISTILL",
    "SAMPLER_PRESETS",
    "TRACKERS",
    "from_official",
    "is_official",
    "read_sampling_configs",
    "sample_configs",
    "sampler_preset",
    "model_preset",
    "load_config",
    "dump_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "validate",
    "check_section",
    "config_changes",
    "resume_changes",
    "format_changes",
    "RESUME_FREE",
    "INT_LIMIT",
    "MAX_SAMPLER_STEPS",
    "MAX_NUM_SAMPLES",
    "MAX_WORKERS",
    "MAX_GUIDANCE",
    "MAX_CHURN",
]
