"""muddformer: MUDD connections (MUltiway Dynamic Dense, Xiao et al., ICML 2025) in PyTorch."""

from .config import MuddConfig
from .errors import CheckpointError, ConfigError, InputError, MuddError
from .model import CausalLMOutput, MuddModel, copy_shared_weights, count_parameters

__version__ = "0.1.0"

__all__ = ["MuddConfig", "MuddModel", "MuddForCausalLM", "CausalLMOutput", "count_parameters", "copy_shared_weights",
           "MuddError", "ConfigError", "CheckpointError", "InputError", "__version__"]


def __getattr__(name):
    # The Hugging Face face imports transformers; load it only when asked for.
    if name in ("MuddForCausalLM", "MuddHFConfig"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'muddformer' has no attribute {name!r}")
