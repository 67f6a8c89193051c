"""elflm: Embedded Language Flows in PyTorch.

``ELF`` is the network (``ELF.from_pretrained`` loads ours, the authors' checkpoints or Hub ids),
``generate`` samples text, ``Sampler`` is the sampling engine, ``TextEncoder`` is the frozen
embedding space, ``load_config`` reads a run's YAML; ``ElflmError`` is the base of the errors
raised for bad input (:mod:`elflm.errors`).
"""

from .config import Config, ModelConfig, ObjectiveConfig, SampleConfig, load_config, model_preset
from .encoder import TextEncoder
from .errors import ElflmError
from .generate import generate
from .model import ELF
from .sampling import Sampler
from .version import __version__

__all__ = [
    "ELF",
    "Config",
    "ElflmError",
    "ModelConfig",
    "ObjectiveConfig",
    "SampleConfig",
    "Sampler",
    "TextEncoder",
    "__version__",
    "generate",
    "load_config",
    "model_preset",
]
