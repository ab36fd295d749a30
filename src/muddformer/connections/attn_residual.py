"""Attention residuals (Kimi Team, Moonshot AI, arXiv 2603.15031): each sub-layer reads a softmax mix
over depth instead of the residual sum.

Sources are the embedding and the outputs of earlier sub-layers (attention and FFN separately; the
pythia block's parallel pair is one sub-layer, f(h) = Attn(h) + FFN(h)). Sub-layer s reads

    h_s = sum_i softmax_i(w_s . RMSNorm_s(v_i)) v_i

with one learned pseudo-query w_s (D,) and one key RMSNorm per sub-layer: the query does not depend
on the input, the keys do. The final norm reads one more such mix with its own query.

Block AttnRes groups the layers: inside a group outputs are summed as in a residual stream (the
partial sum), and the mix runs over the embedding, the sums of completed groups and the current
partial sum, so O(groups) states are kept instead of O(layers). Full AttnRes is the case where
every sub-layer is its own group. Every weight is per token, so decoding keeps only the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from muddformer.config import MuddConfig
from muddformer.connections.base import Connection
from muddformer.layers import Block, RMSNorm

Sources = tuple[torch.Tensor, ...]


@dataclass
class AttnResState:
    """The completed sources (the embedding first, then each closed group's sum) and the open group's
    partial sum (None before the group's first sub-layer)."""

    completed: list[torch.Tensor]
    partial: torch.Tensor | None = None


class AttentionResidualConnection(Connection):
    """Full attention residuals, AttnRes (Kimi Team, arXiv 2603.15031).

    Init (the paper's): pseudo-queries 0 and key norms 1, so every mix starts as the uniform average
    of its sources. The sources add up to the residual stream, so each mix is the residual stream
    divided by the number of sources; every reader of a mix (the sub-layers' pre-norms, the final
    norm) is scale invariant up to its eps, so a fresh model computes the residual model up to the
    norms' eps: not bitwise (logits differ by ~1e-4 at eps 1e-6 in the small test models, ~1e-6
    at eps 1e-12).
    """

    def __init__(self, cfg: MuddConfig):
        super().__init__(cfg)
        self.sites_per_block = 1 if cfg.block == "pythia" else 2
        n_sites = cfg.n_layer * self.sites_per_block
        self.groups = self.site_groups(cfg, n_sites)
        # A query and key norm for sub-layers 1.. and then the output head's; sub-layer 0 sees only the
        # embedding, so its mix is the identity whatever the weights.
        self.queries = nn.ParameterList(nn.Parameter(torch.empty(cfg.dim)) for _ in range(n_sites))
        self.key_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in range(n_sites))
        self.reset_parameters()

    def mix_flops(self) -> int:
        # Each mix over S sources: S dot products with the query (the query counts once), S norms, the weighted sum.
        dim, total, completed, partial = self.queries[0].shape[0], 0, 1, False
        for site in range(1, len(self.groups)):  # as `read` goes: site 0 reads the embedding unmixed
            partial = True  # the previous sub-layer's output
            if self.groups[site] != self.groups[site - 1]:
                completed, partial = completed + 1, False
            total += 6 * dim * (completed + partial)
        return total + 6 * dim * (completed + 1)  # the output mixes every source, the last group's open sum too

    def site_groups(self, cfg: MuddConfig, n_sites: int) -> list[int]:
        """The group of each sub-layer: its own one in full AttnRes."""
        return list(range(n_sites))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for query in self.queries:
                query.zero_()
            for norm in self.key_norms:
                cast(RMSNorm, norm).weight.fill_(1.0)

    def begin(self, x0: torch.Tensor) -> AttnResState:
        return AttnResState(completed=[x0])

    def run_block(self, state: AttnResState, layer: int, block: Block, ctx) -> None:
        completed, state.partial = block((tuple(state.completed), state.partial), ctx, around=self)
        state.completed = list(completed)

    def through_block(
        self, block: Block, sources: tuple[Sources, torch.Tensor | None], ctx
    ) -> tuple[Sources, torch.Tensor | None]:
        """Block `block.layer_idx` on (completed sources, partial sum); a pure function, so checkpointing can
        rerun it."""
        completed, partial = sources
        first = block.layer_idx * self.sites_per_block
        completed, partial, h = self.read(first, completed, partial)
        if block.parallel_residual:
            return completed, accumulate(partial, block.attention_part(h, ctx) + block.ffn_part(h))
        partial = accumulate(partial, block.attention_part(h, ctx))
        completed, partial, h = self.read(first + 1, completed, partial)
        return completed, accumulate(partial, block.ffn_part(h))

    def read(
        self, site: int, completed: Sources, partial: torch.Tensor | None
    ) -> tuple[Sources, torch.Tensor | None, torch.Tensor]:
        """Close the open group when sub-layer `site` starts a new one, then mix the sources for it."""
        if partial is not None and self.groups[site] != self.groups[site - 1]:
            completed, partial = (*completed, partial), None
        sources = completed if partial is None else (*completed, partial)
        return completed, partial, sources[0] if site == 0 else self.mix(site - 1, sources)

    def output(self, state: AttnResState) -> torch.Tensor:
        sources = tuple(state.completed) if state.partial is None else (*state.completed, state.partial)
        return self.mix(len(self.queries) - 1, sources)

    def mix(self, index: int, sources: Sources) -> torch.Tensor:
        """sum_i softmax_i(w . RMSNorm(v_i)) v_i over the sources (each (B, T, D)) with query and key norm `index`."""
        norm = cast(RMSNorm, self.key_norms[index])
        # w . (v / rms(v) * gamma) = (v . (w * gamma)) / rms(v): no normalised copy of any source is made.
        query = self.queries[index] * norm.weight
        logits = torch.stack([depth_logit(v, query, norm.eps) for v in sources], dim=-1)  # (B, T, S)
        weights = torch.softmax(logits, dim=-1).to(sources[0].dtype)
        out = weights[..., 0, None] * sources[0]
        for j in range(1, len(sources)):
            out = out + weights[..., j, None] * sources[j]
        return out


def depth_logit(v: torch.Tensor, query: torch.Tensor, eps: float) -> torch.Tensor:
    """(v . query) / rms(v) (B, T) in float32 at least; only v itself is kept for backward, never a wider copy."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    dot = (v @ query.to(v.dtype)).to(dtype)
    mean_square = torch.linalg.vector_norm(v, dim=-1, dtype=dtype).square() / v.shape[-1]
    return dot * torch.rsqrt(mean_square + eps)


def accumulate(partial: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    return out if partial is None else partial + out


class BlockAttentionResidualConnection(AttentionResidualConnection):
    """Block AttnRes (Kimi Team, arXiv 2603.15031): layers in `attnres_blocks` groups (the paper's
    about 8; fewer when there are fewer layers), residual sums inside a group, attention over the
    embedding, the group sums and the open group's partial sum.

    Init: as full AttnRes, uniform averages over those sources, which again sum to the residual
    stream: the residual model up to the norms' eps, not bitwise.
    """

    def site_groups(self, cfg: MuddConfig, n_sites: int) -> list[int]:
        # Balanced contiguous groups of whole layers: layer l goes to group l * G // L.
        n_groups = min(cfg.attnres_blocks, cfg.n_layer)
        return [(site // self.sites_per_block) * n_groups // cfg.n_layer for site in range(n_sites)]
