"""Feature tests for the dependency APIs that have changed between releases.

Each function reads what the installed package offers (a signature, a dataclass field, a config
attribute), not its version number, and raises DependencyError naming the package and the fix when
none of the known forms is there: an upstream change then shows as a clear error, never as a
silently wrong result. docs/dependencies.md lists every dependency API we call and its test.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from muddformer.errors import DependencyError

LOCK_HINT = "install the tested versions with `make install` (requirements.lock) or report the new release"


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
