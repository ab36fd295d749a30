"""How a block's inputs are formed from earlier states: one class per variant, chosen by name."""

from __future__ import annotations

from muddformer.config import CONNECTIONS, MuddConfig
from muddformer.connections.attn_residual import AttentionResidualConnection, BlockAttentionResidualConnection
from muddformer.connections.base import Connection
from muddformer.connections.dense import (
    DDFormerConnection,
    DenseConnection,
    DenseFormerConnection,
    MuddConnection,
    StaticMultiwayConnection,
)
from muddformer.connections.hyper import HyperConnection, ManifoldHyperConnection
from muddformer.connections.residual import ResidualConnection
from muddformer.dense_options import DENSE_FAMILY

REGISTRY: dict[str, type[Connection]] = {
    "residual": ResidualConnection,
    "mudd": MuddConnection,
    "ddformer": DDFormerConnection,
    "denseformer": DenseFormerConnection,
    "mudd-static": StaticMultiwayConnection,
    "hc": HyperConnection,
    "mhc": ManifoldHyperConnection,
    "attnres": AttentionResidualConnection,
    "attnres-block": BlockAttentionResidualConnection,
}
assert set(REGISTRY) == set(CONNECTIONS), "config.CONNECTIONS and the registry must name the same variants"
assert {name for name, cls in REGISTRY.items() if issubclass(cls, DenseConnection)} == set(DENSE_FAMILY), (
    "config.DENSE_FAMILY (which the sparse options apply to) must name the DenseConnection variants"
)


def build_connection(cfg: MuddConfig) -> Connection:
    return REGISTRY[cfg.connection](cfg)


__all__ = [
    "Connection",
    "DenseConnection",
    "REGISTRY",
    "build_connection",
    *[c.__name__ for c in REGISTRY.values()],
]
