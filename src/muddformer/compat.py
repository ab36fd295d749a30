"""Feature tests for the dependency APIs that have changed between releases.

Each function reads what the installed package offers (a signature, a dataclass field, a config
attribute), not its version number, and raises DependencyError naming the package and the fix when
none of the known forms is there: an upstream change then shows as a clear error, never as a
silently wrong result. docs/dependencies.md lists every dependency API we call and its test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from typing import Any

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from muddformer.errors import DependencyError

LOCK_HINT = "install the tested versions with `make install` (requirements.lock) or report the new release"


def transformers_cache_name() -> str:
    """The name under which transformers' generation hands the KV cache to `forward` and reads it back
    from the output: `cache` from 5.24 on, `past_key_values` before. Read off the output class and the
    generation hook, which must agree."""

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    for name in ("cache", "past_key_values"):
        if name in fields and name in params:
            return name
    raise DependencyError(
        f"transformers passes the generation cache under a name muddformer does not know "
        f"(output fields {sorted(fields)}); {LOCK_HINT}"
    )


def is_cache_object(value: Any) -> bool:
    """A KV cache of any kind we decode with: a transformers Cache or one of ours (anything with update)."""
    return isinstance(value, Cache) or (hasattr(value, "update") and hasattr(value, "get_seq_length"))


def dynamo_recompile_limit(limit: int):
    """A context manager raising torch.compile's per-function recompile limit (renamed across releases)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            return config.patch(**{name: limit})
    raise DependencyError(
        f"torch._dynamo.config has neither recompile_limit nor cache_size_limit in torch "
        f"{torch.__version__}; {LOCK_HINT}"
    )


def without_duck_sizing():
    """A context in which torch.compile gives every dynamic size its own symbol even where two sizes are equal
    at the first call (`torch.fx.experimental._config.use_duck_shape`), so that the graph does not guard on,
    and recompile for, a coincidence such as batch == number of states. Where the option is gone the cost
    is at most one more graph, never a wrong result, so it is then left out."""
    try:
        config = importlib.import_module("torch.fx.experimental._config")
    except ImportError:
        return contextlib.nullcontext()
    return config.patch(use_duck_shape=False) if hasattr(config, "use_duck_shape") else contextlib.nullcontext()
