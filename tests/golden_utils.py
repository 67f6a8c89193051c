"""Builders shared by the golden tests: the tiny official model and its draws, the raw ids of the
conditioning batches."""

import numpy as np
import torch
import yaml

from elflm.config import SAMPLER_PRESETS, ModelConfig
from elflm.formats.flax import flax_params_to_state_dict
from elflm.model import ELF

from conftest import GOLDEN, load_npz

FLAX = GOLDEN / "checkpoint" / "checkpoint_3"  # the official orbax checkpoint (README §6)
FLAX_CONFIG = GOLDEN / "checkpoint" / "config.yml"
PORT = GOLDEN / "checkpoint_torch" / "tiny.pt"  # the pytorch_elf payload (README §7)
STEP2 = "trainstep/step2"  # muon.npz: the state saved in FLAX

TINY = ModelConfig(
    encoder_dim=32, vocab_size=128, max_length=16, hidden_size=64, depth=2, num_heads=4, bottleneck_dim=16
)


def tree(g: dict, prefix: str) -> dict:
    """``{flax path: array}`` of the keys under ``prefix/``."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in g.items() if k.startswith(prefix + "/")}


def tiny_model(file: str = "elf_model.npz", prefix: str = "params", fast: bool = False) -> ELF:
    """The golden tiny ELF with the weights under ``prefix`` of ``file``, in eval mode."""
    model = ELF(TINY)
    model.load_state_dict(flax_params_to_state_dict(tree(load_npz(file), prefix)), strict=True)
    return model.set_fast_attention(fast).eval()


def T(g: dict, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(g[key]))


def assert_close(actual, expected, atol, what=""):
    actual = actual.detach().double()
    expected = torch.as_tensor(np.asarray(expected)).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= atol, f"{what}: max abs diff {err:.3g} > {atol:.3g}"


EOS, PAD = 1, 0
BATCH_KEYS = ["input_ids", "attention_mask", "cond_seq_mask", "encoder_attention_mask"]


def golden_id_lists(g: dict) -> tuple[list, list, list]:
    """Raw id lists behind the batches of t5_encoder.npz (golden README "Two conditioning
    batches"): unconditional sequences, conditions, targets."""
    u = g["uncond/input_ids"].tolist()
    uncond = [u[0] + [7, 8, 9, 10], u[1][:11], u[2][:6]]  # lengths 20 (4 ids past the row), 11, 6
    c = g["cond/input_ids"].tolist()
    conds = [c[0][:5], c[1][:8] + [5, 6], c[2][:3]]  # 5, 10 (2 ids past max_input_length), 3
    targets = [c[0][5:11], c[1][8:16] + [EOS], c[2][3:15]]  # 6, 9 (its EOS falls off the row), 12
    assert [len(x) for x in uncond] == [20, 11, 6] and [len(x) for x in conds] == [5, 10, 3]
    assert [len(x) for x in targets] == [6, 9, 12] and all(t[-1] == EOS for t in targets)
    return uncond, conds, targets


def assert_batch(batch: dict, g: dict, name: str) -> None:
    """``batch`` equals the golden batch ``name`` (``uncond`` / ``cond``), dtypes included."""
    for k in BATCH_KEYS:
        want = torch.from_numpy(g[f"{name}/{k}"].astype(np.float32 if k != "input_ids" else np.int64))
        assert batch[k].dtype == want.dtype, k
        assert torch.equal(batch[k], want), k


def muon_weights(prefix: str) -> dict[str, torch.Tensor]:
    """Our state dict of the ``muon.npz`` tree under ``prefix`` (e.g. ``trainstep/step2/ema_after``)."""
    return flax_params_to_state_dict(tree(load_npz("muon.npz"), prefix))


def assert_same_weights(actual: dict, reference: dict):
    """Same names, dtypes and values, bit for bit."""
    assert set(actual) == set(reference)
    for k, v in reference.items():
        assert actual[k].dtype == v.dtype and torch.equal(actual[k], v), k


def pd_weights(part: str) -> dict[str, torch.Tensor]:
    """``teacher`` or ``student_init`` of ``distill.npz`` in torch-port names (golden README §8)."""
    return {k: torch.from_numpy(np.asarray(v)).clone() for k, v in tree(load_npz("distill.npz"), part).items()}


def write_pd_checkpoint(folder, step: int = 3, config: bool = True, prefix: str = ""):
    """A run folder of the authors' ``distillation`` branch: ``checkpoint_<step>`` (no extension) as its
    ``save_checkpoint`` writes it (``params``: the student's ``state_dict``, here ``student_init`` of
    ``distill.npz``; ``ema_params1``: its EMA, here the ``teacher`` weights; a real optimizer and
    ``LambdaLR`` state, the dropout generator's state) and, with ``config``, the ``config.yml`` its
    ``train.py`` dumps (``vars(config)``: the curriculum YAML's fields with the few-step sampling
    configs expanded). ``prefix`` (e.g. ``_orig_mod.``) goes before every parameter name. Returns the
    file."""
    folder.mkdir(parents=True, exist_ok=True)
    params, ema = pd_weights("student_init"), pd_weights("teacher")
    live = [torch.nn.Parameter(v.clone()) for v in params.values()]
    opt = torch.optim.SGD(live, lr=2e-3, momentum=0.95)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda s: min(1.0, s / 2))
    for p in live:
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    payload = {
        "params": {prefix + k: v for k, v in params.items()},
        "ema_params1": {prefix + k: v for k, v in ema.items()},
        "opt_state": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "step": step,
        "epoch": 0,
        "dropout_rng": torch.Generator().manual_seed(42).get_state(),
        "grad_accum_buffers": {},
    }
    file = folder / f"checkpoint_{step}"
    torch.save(payload, file)
    if config:
        fields = yaml.safe_load(FLAX_CONFIG.read_text())
        fields.update(
            pd_teacher_steps=64,
            pd_step_size=1.0,
            pd_student_schedule="logit_normal",
            pd_teacher_schedule="logit_normal",
            teacher_path="embedded-language-flows/ELF-B-owt-torch",
            initialize_student_from_teacher=True,
            teacher_use_ema=True,
            student_init_from_checkpoint="outputs/elf_b-owt_progressive_distillation/round4_2step",
            sampling_configs_path="src/configs/sampling_configs/uncond_fewstep_sampling_configs.yml",
            sampling_configs=SAMPLER_PRESETS["fewstep"],
        )
        (folder / "config.yml").write_text(yaml.safe_dump(fields, sort_keys=False))
    return file
