"""Config dataclasses, YAML load/dump, dotted overrides, validation errors and the shipped configs."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from elflm.config import (
    MIRRORS,
    OFFICIAL_DEFAULTS,
    OFFICIAL_KEYS,
    OFFICIAL_UNUSED,
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    EncoderConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    from_dict,
    is_official,
    load_config,
    model_preset,
    read_sampling_configs,
    sample_configs,
    sampler_preset,
    to_dict,
    validate,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
OWT = Path(__file__).resolve().parents[1] / "configs" / "elf-b-owt.yaml"


def test_configs_folder_has_the_official_and_tiny_configs():
    names = {p.stem for p in CONFIGS}
    assert {"elf-b-owt", "elf-m-owt", "elf-l-owt", "elf-b-de-en", "elf-b-xsum", "tiny-owt", "tiny-de-en"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert validate(cfg) is cfg
    dump_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(tmp_path / "sub" / "config.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.model.max_length == cfg.data.max_length


# The official training YAMLs and sampling YAMLs (SPEC §5, §6), in our names.
COMMON = {
    "model.bottleneck_dim": 128,
    "model.num_time_tokens": 4,
    "model.num_self_cond_cfg_tokens": 4,
    "model.num_mode_tokens": 4,
    "encoder.name_or_path": "t5-small",
    "encoder.latent_mean": 0.0,
    "encoder.latent_std": 0.2,
    "encoder.weights": "embedded-language-flows/t5_small_encoder_jax/t5_small_encoder_jax.pkl",
    "objective.p_mean": -1.5,
    "objective.p_std": 0.8,
    "objective.noise_scale": 2.0,
    "objective.t_eps": 0.05,
    "objective.time_schedule": "logit_normal",
    "objective.decoder_prob": 0.2,
    "objective.decoder_p_mean": 0.8,
    "objective.decoder_p_std": 0.8,
    "objective.self_cond_prob": 0.5,
    "train.global_batch_size": 512,
    "train.blr": 1e-3,
    "train.peak_lr": 2e-3,
    "train.weight_decay": 0.0,
    "train.optimizer": "muon",
    "train.ema_decay": 0.9999,
    "train.seed": 42,
    "train.clip": 1.0,
    "train.lr_schedule": "constant",
    "sample.grid": "logit_normal",
}
UNCOND = {
    "data.max_length": 1024,
    "data.max_input_length": None,
    "data.pad_token": "pad",
    "objective.decoder_noise_scale": 5.0,
    "objective.label_drop_prob": 0.0,
    "train.warmup_steps": None,
    "train.warmup_epochs": 0.5,
    "sample.method": "sde",
    "sample.w": 3.0,
    "sample.cfg_scale": 1.0,
    "sample.num_samples": 1000,
}
COND = {
    "data.pad_token": "eos",
    "objective.decoder_noise_scale": 1.0,
    "objective.label_drop_prob": 0.1,
    "train.epochs": 100,
    "train.warmup_steps": 5000,
    "sample.method": "ode",
    "sample.steps": 64,
    "sample.w": 1.0,
    "sample.cfg_scale": 2.0,
}
OFFICIAL = {
    "elf-b-owt": {
        **UNCOND,
        "model.depth": 12,
        "model.hidden_size": 768,
        "train.epochs": 5,
        "sample.steps": 32,
        "sample.gamma": 1.5,
    },
    "elf-m-owt": {
        **UNCOND,
        "model.depth": 24,
        "model.hidden_size": 1056,
        "train.epochs": 4,
        "sample.steps": 64,
        "sample.gamma": 1.0,
    },
    "elf-l-owt": {
        **UNCOND,
        "model.depth": 32,
        "model.hidden_size": 1280,
        "train.epochs": 3,
        "sample.steps": 64,
        "sample.gamma": 1.0,
    },
    "elf-b-de-en": {**COND, "data.max_length": 128, "data.max_input_length": 64, "sample.num_samples": 5000},
    "elf-b-xsum": {**COND, "data.max_length": 1088, "data.max_input_length": 1024, "sample.num_samples": 100},
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_hyper_parameters(name):
    cfg = load_config(OWT.with_name(f"{name}.yaml"))
    for key, expected in {**COMMON, **OFFICIAL[name]}.items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == expected, key
    assert cfg.data.conditional == (name not in ("elf-b-owt", "elf-m-owt", "elf-l-owt"))
    assert cfg.sample.noise_scale == 2.0 and cfg.sample.p_mean == -1.5  # copies of the objective's


# Every field of the official Config class and SamplingConfig, and the Lightning reproduction's extras.
OFFICIAL_FIELDS = [
    "data_path", "eval_data_path", "max_length", "max_input_length", "pad_token", "tokenizer_name",
    "encoder_model_name", "encoder_checkpoint", "latent_mean", "latent_std", "model", "bottleneck_dim",
    "num_time_tokens", "num_self_cond_cfg_tokens", "num_model_mode_tokens", "attn_dropout", "proj_dropout",
    "denoiser_p_mean", "denoiser_p_std", "denoiser_noise_scale", "t_eps", "time_schedule", "decoder_prob",
    "decoder_noise_scale", "decoder_p_mean", "decoder_p_std", "label_drop_prob", "self_cond_prob",
    "self_cond_cfg_min", "self_cond_cfg_max", "epochs", "warmup_epochs", "warmup_steps", "batch_size",
    "global_batch_size", "lr", "blr", "min_lr", "lr_schedule", "weight_decay", "optimizer", "adam_b1", "adam_b2",
    "grad_accum_steps", "ema_decay1", "sampling_configs_path", "sampling_configs", "num_samples", "online_eval",
    "eval_ppl_model", "eval_ppl_batch_size", "eval_ppl_max_length", "log_freq", "eval_freq", "save_freq",
    "output_dir", "hf_repo_id", "resume", "use_wandb", "wandb_project", "wandb_entity", "wandb_run_name",
    "wandb_tag", "wandb_resume", "seed", "num_workers", "sampling_method", "num_sampling_steps", "cfgs",
    "self_cond_cfg_scales", "sde_gamma",
]  # fmt: skip
LIGHTNING_FIELDS = [
    "prefetch_factor", "pin_memory", "persistent_workers", "use_flash", "precision", "compile",
    "epoch_eval_num_samples", "epoch_eval_num_sampling_steps", "epoch_eval_sde_gamma", "epoch_eval_self_cond_cfg_scale",
]  # fmt: skip


def test_every_official_field_has_a_home_or_a_reason():
    ours = {f"{s}.{k}" for s, cls in SECTIONS.items() for k in cls.__dataclass_fields__} | {"model.preset", "sample"}
    for name, target in OFFICIAL_KEYS.items():
        assert target in ours, (name, target)
    for name in OFFICIAL_FIELDS + LIGHTNING_FIELDS:
        assert (name in OFFICIAL_KEYS) != (name in OFFICIAL_UNUSED), name
    assert set(OFFICIAL_DEFAULTS) <= set(OFFICIAL_KEYS) | set(OFFICIAL_UNUSED)


# The published setups as the authors' flat training YAMLs state them (values: SPEC §5, §6).
def official_yaml(name: str) -> dict:
    task, size = {"elf-b-owt": ("owt", "B"), "elf-m-owt": ("owt", "M"), "elf-l-owt": ("owt", "L")}.get(
        name, (name.split("-", 2)[2], "B")
    )
    cond = task != "owt"
    d = {
        "data_path": "embedded-language-flows/" + {"owt": "openwebtext-t5", "de-en": "wmt14_de-en_train_t5",
                                                   "xsum": "xsum_train_t5"}[task],
        "max_length": {"owt": 1024, "de-en": 128, "xsum": 1088}[task],
        "encoder_model_name": "t5-small",
        "encoder_checkpoint": "embedded-language-flows/t5_small_encoder_jax/t5_small_encoder_jax.pkl",
        "latent_mean": 0.0, "latent_std": 0.2, "model": f"ELF-{size}", "bottleneck_dim": 128,
        "num_time_tokens": 4, "num_self_cond_cfg_tokens": 4, "num_model_mode_tokens": 4,
        "denoiser_p_mean": -1.5, "denoiser_p_std": 0.8, "denoiser_noise_scale": 2.0, "t_eps": 0.05,
        "time_schedule": "logit_normal", "decoder_prob": 0.2, "decoder_noise_scale": 1.0 if cond else 5.0,
        "decoder_p_mean": 0.8, "decoder_p_std": 0.8, "self_cond_prob": 0.5,
        "epochs": 100 if cond else {"B": 5, "M": 4, "L": 3}[size], "global_batch_size": 512, "blr": 0.001,
        "weight_decay": 0.0, "optimizer": "muon", "ema_decay1": 0.9999,
        "sampling_configs_path": f"configs/sampling_configs/{'cond' if cond else 'uncond'}_sampling_configs.yml",
        "num_samples": {"owt": 1000, "de-en": 5000, "xsum": 100}[task], "log_freq": 100, "save_freq": 10 if cond else 1,
        "eval_freq": 10 if cond else 1, "output_dir": f"outputs/{name}", "hf_repo_id": None, "resume": None,
        "use_wandb": True, "wandb_project": "elf", "wandb_entity": None, "wandb_run_name": name, "seed": 42,
    }  # fmt: skip
    if cond:
        d.update(eval_data_path=d["data_path"].replace("train", "validation"), pad_token="eos", label_drop_prob=0.1)
        d.update(max_input_length={"de-en": 64, "xsum": 1024}[task], warmup_steps=5000)
    else:
        d.update(warmup_epochs=0.5, warmup_steps=-1)
    return d


def _entry(method, steps, cfg, w, gamma=None) -> dict:
    e = {"sampling_method": method, "num_sampling_steps": [steps], "cfgs": [cfg], "self_cond_cfg_scales": [w]}
    return {**e, **({} if gamma is None else {"sde_gamma": gamma}), "time_schedule": "logit_normal"}


SAMPLING_FILES = {
    "uncond": [_entry("sde", 32, 1, 3, 1.5), _entry("sde", 64, 1, 3, 1.0)],
    "cond": [_entry("ode", 64, 2, 1)],
}


@pytest.fixture
def official_tree(tmp_path):
    """The authors' layout: src/configs/{training_configs,sampling_configs}/."""
    src = tmp_path / "src" / "configs"
    (src / "training_configs").mkdir(parents=True)
    (src / "sampling_configs").mkdir()
    for kind, entries in SAMPLING_FILES.items():
        (src / "sampling_configs" / f"{kind}_sampling_configs.yml").write_text(yaml.safe_dump(entries))
    return src


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_training_yaml_is_accepted_as_it_is(name, official_tree):
    path = official_tree / "training_configs" / f"train_{name}.yml"
    path.write_text(yaml.safe_dump(official_yaml(name)))
    lines = []
    cfg = load_config(path, log=lines.append)
    ours = load_config(OWT.with_name(f"{name}.yaml"))
    assert cfg.model == ours.model and cfg.objective == ours.objective and cfg.encoder == ours.encoder
    assert cfg.data == ours.data  # the Hub dataset id included
    for key in ("epochs", "global_batch_size", "blr", "peak_lr", "warmup_steps", "ema_decay", "seed"):
        assert getattr(cfg.train, key) == getattr(ours.train, key), key
    if ours.train.warmup_steps is None:  # warm-up in epochs
        assert cfg.train.warmup_epochs == ours.train.warmup_epochs
    assert cfg.train.logger == "wandb" and cfg.train.run_name == name and cfg.train.wandb_project == "elf"
    if name not in ("elf-m-owt", "elf-l-owt"):  # ours samples ELF-M / L with the file's second setting
        assert cfg.sample == ours.sample
    text = "\n".join(lines)
    assert (
        "model: 'ELF-" in text
        and "-> model.preset = 'elf-" in text
        and "denoiser_p_mean: -1.5 -> objective.p_mean" in text
    )
    assert "not used: save_freq (epochs; train.save_every counts steps)" in text
    assert "sampling_configs.yml: -> sample = the first setting" in text
    if name.endswith("owt"):
        assert "warmup_steps: -1 -> train.warmup_steps = null" in text and "2 settings listed" in text


def test_official_config_details(tmp_path, capsys):
    d = {**official_yaml("elf-b-owt"), "grad_accum_steps": 4, "global_batch_size": 128, "resume": "outputs/x"}
    d.update(
        output_dir="outputs/x", prefetch_factor=4, use_flash=True, precision="bf16-mixed", compile=True, typo_key=1
    )
    del d["sampling_configs_path"]
    (tmp_path / "t.yml").write_text(yaml.safe_dump(d))
    lines = []
    cfg = load_config(tmp_path / "t.yml", ["train.max_steps=10"], log=lines.append)
    assert cfg.train.global_batch_size == 512 and cfg.train.grad_accum_steps == 4  # official: per micro-batch
    assert (
        cfg.train.resume == "auto" and cfg.train.precision == "bf16" and cfg.train.compile and cfg.train.max_steps == 10
    )
    text = "\n".join(lines)
    assert "not used: prefetch_factor" in text and "not used: typo_key (not a field of the official config)" in text
    assert "official defaults for the fields the file omits: " in text and "adam_b2" in text
    assert cfg.train.adam_b2 == 0.95 and cfg.sample.method == "ode" and cfg.sample.steps == 50  # official defaults
    d["precision"] = "16-mixed"
    (tmp_path / "t.yml").write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"t\.yml: precision='16-mixed': only fp32 and bf16"):
        load_config(tmp_path / "t.yml")
    assert not is_official({"model": "elf-b", "train": {}}) and is_official({"model": "ELF-B", "blr": 1e-3})


def test_sampling_configs(tmp_path):
    (tmp_path / "s.yml").write_text(yaml.safe_dump(SAMPLING_FILES["uncond"]))
    settings = sample_configs(read_sampling_configs(tmp_path / "s.yml"))
    assert [(s.method, s.steps, s.gamma, s.w) for s in settings] == [("sde", 32, 1.5, 3.0), ("sde", 64, 1.0, 3.0)]
    grid = sample_configs([{"num_sampling_steps": [8, 16], "cfgs": [1, 2], "self_cond_cfg_scales": [1]}])
    assert [(s.method, s.steps, s.cfg_scale) for s in grid] == [
        ("ode", 8, 1.0),
        ("ode", 8, 2.0),
        ("ode", 16, 1.0),
        ("ode", 16, 2.0),
    ]
    (tmp_path / "ours.yaml").write_text("sample:\n  method: ode\n  steps: 7\n")
    assert sample_configs(read_sampling_configs(tmp_path / "ours.yaml"))[0].steps == 7
    with pytest.raises(ConfigError, match="entry 1: unknown sampling field"):
        sample_configs([{"sampling_methd": "ode"}])
    (tmp_path / "bad.yml").write_text("3\n")
    with pytest.raises(ConfigError, match="bad.yml: expected the authors' sampling-config list"):
        read_sampling_configs(tmp_path / "bad.yml")


def test_presets_have_the_spec_sizes():
    for name, (depth, hidden, heads) in {
        "elf-b": (12, 768, 12),
        "elf-m": (24, 1056, 16),
        "elf-l": (32, 1280, 16),
    }.items():
        m = model_preset(name)
        assert (m.depth, m.hidden_size, m.num_heads, m.mlp_ratio, m.bottleneck_dim) == (depth, hidden, heads, 4.0, 128)
        assert (m.encoder_dim, m.vocab_size) == (512, 32128)
    assert model_preset("ELF_M") == model_preset("elf-m")
    assert model_preset("tiny", depth=3).depth == 3


@pytest.mark.parametrize("model", ["elf-m", "ELF-M", {"preset": "elf-m"}])
def test_model_section_selects_a_preset(model):
    cfg = from_dict({"model": model, "data": {"max_length": 256}})
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.max_length) == (24, 1056, 256)


def test_preset_with_overrides_and_plain_mapping():
    assert from_dict({"model": {"preset": "elf-b", "depth": 6}}).model.depth == 6
    assert from_dict({"model": {"depth": 6}}).model.hidden_size == 768  # defaults are ELF-B
    assert from_dict({}) == Config()


def test_overrides_parse_and_coerce():
    cfg = load_config(
        OWT,
        [
            "model.depth=24",
            "train.blr=1e-3",
            "sample.method=ode",
            "train.compile=false",
            "train.max_steps=null",
            "objective.noise_scale=3",
            "train.output_dir=123",
            "train.muon_adam_betas=[0.8, 0.99]",
            "train.warmup_epochs=1",
            "train.logger=tensorboard,wandb",
            "sample.steps='48'",
            "train.resume=none",
        ],
    )
    assert cfg.model.depth == 24 and cfg.train.blr == 1e-3 and isinstance(cfg.train.blr, float)
    assert cfg.sample.method == "ode" and cfg.train.compile is False and cfg.train.max_steps is None
    assert cfg.objective.noise_scale == 3.0 and isinstance(cfg.objective.noise_scale, float)
    assert cfg.sample.noise_scale == 3.0  # follows its home
    assert cfg.train.output_dir == "123" and cfg.train.muon_adam_betas == (0.8, 0.99)
    assert cfg.train.logger == "tensorboard,wandb" and cfg.sample.steps == 48 and cfg.train.resume is None
    assert load_config(OWT, ["model=elf-l"]).model.depth == 32
    assert load_config(OWT, ["model.preset=elf-m"]).model.depth == 24


def test_override_of_a_home_key_on_a_dumped_config(tmp_path):
    dump_config(load_config(OWT), tmp_path / "c.yaml")
    cfg = load_config(
        tmp_path / "c.yaml",
        [
            "data.pad_token=eos",
            "data.max_length=128",
            "data.max_input_length=64",
            "encoder.latent_std=0.3",
            "encoder.tokenizer=some/tok",
        ],
    )
    assert cfg.objective.pad_token == "eos" and cfg.model.max_length == 128
    assert cfg.objective.latent_std == 0.3 and cfg.data.tokenizer == "some/tok"


def test_mirrors_follow_their_home():
    cfg = Config(
        data=DataConfig(pad_token="eos", max_length=77), encoder=EncoderConfig(latent_std=None, name_or_path="x")
    )
    assert cfg.objective.pad_token == "eos" and cfg.model.max_length == 77 and cfg.data.tokenizer == "x"
    assert cfg.objective.latent_std == 0.2  # home None (estimate from data): the copy keeps its value
    cfg.data.pad_token = "pad"
    with pytest.raises(ConfigError, match="objective.pad_token") as e:
        validate(cfg)
    assert e.value.key == "objective.pad_token"
    assert validate(replace(cfg)).objective.pad_token == "pad"
    assert set(MIRRORS) & set(MIRRORS.values()) == set()


def test_resolved_model_takes_the_encoder_sizes():
    cfg = load_config(OWT.with_name("tiny-owt.yaml"))
    m = cfg.resolved_model(384, 30522)
    assert (m.encoder_dim, m.vocab_size, m.max_length, m.hidden_size) == (384, 30522, 64, 64)
    assert isinstance(m, ModelConfig) and cfg.model.encoder_dim == 512
    with pytest.raises(ConfigError, match="model.vocab_size"):
        cfg.resolved_model(384, 0)


def test_batch_split():
    t = TrainConfig(global_batch_size=512, batch_size=64)
    assert t.micro_batch(world=2) == (64, 4)
    assert TrainConfig(global_batch_size=512, grad_accum_steps=4).micro_batch(world=2) == (64, 4)
    assert TrainConfig(global_batch_size=512).micro_batch(world=8) == (64, 1)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        TrainConfig(global_batch_size=512, batch_size=64).micro_batch(world=3)
    assert TrainConfig(blr=1e-3, global_batch_size=512).peak_lr == pytest.approx(2e-3)
    assert TrainConfig(lr=5e-4).peak_lr == 5e-4


BAD_OVERRIDES = [
    (["model.dpeth=3"], "model.dpeth", "did you mean 'model.depth'"),
    (["train.ema_decay1=0.9"], "train.ema_decay1", "did you mean 'train.ema_decay'"),
    (["train.pad_token=eos"], "train.pad_token", "did you mean 'data.pad_token'"),
    (["trian.blr=1"], "trian", "did you mean 'train'"),
    (["train.eval_freq=5"], "train.eval_freq", "did you mean 'train.eval_every'"),  # not eval_steps
    (["train.eval_ppl_model=gpt2"], "train.eval_ppl_model", "did you mean 'train.eval_judge'"),
    (["train.eval_every=-1"], "train.eval_every", ">= 0"),
    (["train.eval_steps=0"], "train.eval_steps", ">= 1"),
    (["train.blr=abc"], "train.blr", "expected a number"),
    (["train.compile=maybe"], "train.compile", "expected true or false"),
    (["model.depth=2.5"], "model.depth", "expected an integer"),
    (["model.num_heads=5"], "model.hidden_size", "multiple of model.num_heads"),
    (["model.hidden_size=36", "model.num_heads=4"], "model.num_heads", "even"),
    (["objective.decoder_prob=1.5"], "objective.decoder_prob", "[0, 1]"),
    (["objective.label_drop_prob=-0.1"], "objective.label_drop_prob", "[0, 1]"),
    (["sample.steps=0"], "sample.steps", ">= 1"),
    (["data.max_input_length=1024"], "data.max_input_length", "fewer tokens than data.max_length"),
    (["encoder.latent_std=0"], "encoder.latent_std", "> 0"),
    (["sample.method=euler"], "sample.method", "one of 'ode', 'sde'"),
    (["sample.grid=cosine"], "sample.grid", "one of 'logit_normal', 'uniform'"),
    (["sample.gamma=-1"], "sample.gamma", ">= 0"),
    (["data.pad_token=bos"], "data.pad_token", "one of 'pad', 'eos'"),
    (["sample.cfg_scale=2"], "sample.cfg_scale", "unconditional"),
    (["model.vocab_size=100"], "model.vocab_size", "property of the encoder"),
    (["objective.pad_token=eos"], "objective.pad_token", "set data.pad_token only"),
    (["model=elf-xl"], "model.preset", "unknown model preset"),
    (["train.batch_size=7"], "train.global_batch_size", "multiple of train.batch_size"),
    (["train.epochs=0"], "train.epochs", "train.max_steps"),
    (["train.lr=0"], "train.lr", "> 0"),
    (["train.distributed=horovod"], "train.distributed", "'fsdp'"),
    (["train.precision=fp16"], "train.precision", "'bf16'"),
    (["model.depth=null"], "model.depth", "expected an integer, got None"),
]


@pytest.mark.parametrize("overrides,key,message", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_values_name_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as e:
        load_config(OWT, overrides)
    text = str(e.value)
    assert e.value.key == key and key in text and message in text and "elf-b-owt.yaml" in text


BAD_FILES = [
    ("train:\n  blr: 1e-3\n   epochs: 1\n", ":3:", "malformed YAML: mapping values are not allowed"),
    ("train:\n  blr: 1\n  blr: 2\n", ":3:", "duplicate key 'blr'"),
    ("- a\n- b\n", "", "expected a mapping of sections"),
    ("train:\n  blr: 1\ndenoiser_p_mean: -1.5\n", "", "did you mean 'objective.p_mean'"),  # ours mixed with official
    ("data: {}\nepochs: 5\n", "", "did you mean 'train.epochs'"),
    ("train: 5\n", "", "train: expected a mapping"),
    ("model:\n  preset: 3\n", "", "model.preset: expected a preset name"),
    ("model: elf-b\ndata:\n  max_length: 64\nobjective: {}\nmodel_: 1\n", "", "did you mean 'model'"),
]


@pytest.mark.parametrize("text,where,message", BAD_FILES, ids=[b[2] for b in BAD_FILES])
def test_bad_files_name_the_file(tmp_path, text, where, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"bad.yaml{where}" in str(e.value) and message in str(e.value)


def test_mirror_contradiction_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  max_length: 128\ndata:\n  max_length: 64\n")
    with pytest.raises(ConfigError, match="model.max_length=128 contradicts data.max_length=64"):
        load_config(path)
    path.write_text("model:\n  max_length: 64\ndata:\n  max_length: 64\n")
    assert load_config(path).model.max_length == 64


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' not found: give a YAML file or one of the bundled configs"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="folder.yaml' not found"):
        load_config(tmp_path / "folder.yaml")


def test_bundled_configs_load_by_name():
    """The run configs ship inside the package (a wheel has them too) and load by name."""
    from elflm.config import bundled_configs, config_path

    assert {"elf-b-owt", "elf-m-owt", "elf-l-owt", "elf-b-de-en", "elf-b-xsum", "quickstart", "tiny-owt"} <= set(
        bundled_configs()
    )
    assert config_path("elf-b-owt") == config_path("elf-b-owt.yaml") and config_path("elf-b-owt").is_file()
    cfg = load_config("elf-b-owt", ["train.max_steps=3"])
    assert cfg.model.hidden_size == 768 and cfg.train.max_steps == 3


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.blr"])
    with pytest.raises(ConfigError, match="one dot"):
        apply_overrides({}, ["train.a.b=1"])


def test_validate_rejects_wrong_types_built_in_code():
    with pytest.raises(ConfigError, match="model.depth: expected an integer"):
        validate(Config(model=ModelConfig(depth="12")))
    with pytest.raises(ConfigError, match="train.compile: expected true or false"):
        validate(Config(train=TrainConfig(compile=1)))
    with pytest.raises(ConfigError, match="data: expected a DataConfig"):
        Config(data={"max_length": 3})


def test_sampler_presets_are_the_authors_files():
    """fewstep = uncond_fewstep_sampling_configs.yml: --steps picks the setting listed for that many
    steps, else the nearest (the fewer on a tie); no steps: the first setting."""
    base = SampleConfig(noise_scale=1.5, num_samples=7)
    pick = lambda *a: (lambda s: (s.method, s.steps, s.gamma, s.w, s.grid))(sampler_preset(*a))  # noqa: E731
    assert pick("fewstep", 4) == ("sde", 4, 1.5, 2.5, "logit_normal")
    assert pick("fewstep", 32) == ("sde", 32, 2.0, 2.0, "logit_normal")
    assert pick("fewstep", 12) == ("sde", 12, 1.5, 2.5, "logit_normal")  # 8 and 16 tie: the fewer
    assert pick("fewstep", 13) == ("sde", 13, 2.0, 2.0, "logit_normal")
    assert pick("fewstep", 100) == ("sde", 100, 2.0, 2.0, "logit_normal")
    assert pick("fewstep") == ("sde", 1, 1.5, 2.5, "logit_normal")
    assert pick("uncond") == ("sde", 32, 1.5, 3.0, "logit_normal") and pick("uncond", 64)[2] == 1.0
    cond = sampler_preset("cond", None, base)
    assert (cond.method, cond.steps, cond.cfg_scale, cond.w) == ("ode", 64, 2.0, 1.0)
    assert (cond.noise_scale, cond.num_samples) == (1.5, 7)  # the rest is the base's
    with pytest.raises(ConfigError, match="unknown sampler preset 'few'; expected one of uncond, cond, fewstep"):
        sampler_preset("few")
    for steps in (0, 2.5, True):
        with pytest.raises(ConfigError, match="expected an integer >= 1"):
            sampler_preset("fewstep", steps)
