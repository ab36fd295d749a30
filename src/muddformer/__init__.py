"""muddformer: MUDD connections (MUltiway Dynamic Dense, Xiao et al., ICML 2025) in PyTorch.

Importing it registers the model with transformers' AutoConfig / AutoModelForCausalLM / AutoTokenizer
(adapters/registration.py: at once if transformers is loaded, else right after it loads). transformers
itself loads only when it is used: `MuddForCausalLM` and `MuddHFConfig` are imported on first access.
"""

__version__ = "0.1.0"

from muddformer.adapters.registration import register_with_transformers  # noqa: E402
from muddformer.config import MuddConfig  # noqa: E402
from muddformer.errors import CheckpointError, ConfigError, InputError, MuddError  # noqa: E402
from muddformer.model import CausalLMOutput, MuddModel, copy_shared_weights, count_parameters  # noqa: E402

register_with_transformers()

_FROM_TRANSFORMERS_ADAPTER = ("MuddForCausalLM", "MuddHFConfig")


def __getattr__(name: str):
    if name in _FROM_TRANSFORMERS_ADAPTER:
        import muddformer.adapters.hf as hf

        return getattr(hf, name)
    raise AttributeError(f"module 'muddformer' has no attribute {name!r}")


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
