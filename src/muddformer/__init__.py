"""muddformer: MUDD connections (MUltiway Dynamic Dense, Xiao et al., ICML 2025) in PyTorch.

Importing it registers the model with transformers' AutoConfig / AutoModelForCausalLM / AutoTokenizer.
"""

__version__ = "0.1.0"

from muddformer.adapters.hf import MuddForCausalLM, MuddHFConfig  # noqa: E402
from muddformer.config import MuddConfig  # noqa: E402
from muddformer.errors import CheckpointError, ConfigError, InputError, MuddError  # noqa: E402
from muddformer.model import CausalLMOutput, MuddModel, copy_shared_weights, count_parameters  # noqa: E402

__all__ = [
    "MuddConfig",
    "MuddModel",
    "MuddForCausalLM",
    "MuddHFConfig",
    "CausalLMOutput",
    "count_parameters",
    "copy_shared_weights",
    "MuddError",
    "ConfigError",
    "CheckpointError",
    "InputError",
    "__version__",
]
