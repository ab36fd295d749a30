"""Dense cross-layer connections: MUDD and the variants the paper compares it with.

After block l, the inputs of block l+1 are weighted sums of every stored state X_0..X_{l+1}
(X_0 = embedding, X_{j+1} = output of block j). The weights are a static prior a_l (`dense_bs`),
plus, for dynamic variants, a per-token MLP of the newest state (architecture §2.2):

    dw = W2 @ GELU(W1 @ RMSNormNoScale(X_{l+1})) + a_l      # (C, B, T, l+2)
    stream c = sum_j dw[c, ..., j] * X_j

C = 4 streams (q, k, v, r) for multiway variants, 1 for single-way; the last layer is always
R only. Initialisation (architecture §2.8): W2 = 0 and a_l one-hot on the newest state, so a fresh model
computes exactly what a residual model computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from muddformer.config import MuddConfig
from muddformer.connections.base import Connection
from muddformer.kernels.depth_mix import DepthBuffer, depth_mix_buffered, depth_mix_reference
from muddformer.layers import Block, BlockInput, RMSNorm, Streams, ValueAdded, residual_input, rms_norm_no_scale


def generator_width(n_streams: int, n_states: int, last: bool, expand_last: bool, round64: bool) -> int:
    """Hidden width K_l of the weight generator (architecture §2.2); round64 always adds a block (64 -> 128)."""
    width = n_streams * n_states
    if last and expand_last:
        width *= 4
    if round64:
        width = (width // 64 + 1) * 64
    return width


class WeightGenerator(nn.Module):
    """The per-token MLP that makes dense weights from the newest state: W2 @ GELU(W1 @ norm(x))."""

    def __init__(self, dim: int, hidden: int, n_out: int, eps: float, scaled_norm: bool, input_norm: bool = True):
        super().__init__()
        self.eps, self.input_norm = eps, input_norm
        self.norm = RMSNorm(dim, eps) if scaled_norm else None
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(x)
        else:
            h = rms_norm_no_scale(x, self.eps) if self.input_norm else x
        # Tokens flattened and the weights used directly rather than through the Linear modules: a decode
        # step pays per operation, and a 2-D linear is two (transpose, mm) where a 3-D one is four.
        h = h.reshape(-1, h.shape[-1])
        return F.linear(F.gelu(F.linear(h, self.w1.weight)), self.w2.weight).view(*x.shape[:-1], -1)


@dataclass(frozen=True)
class Aggregation:
    """What the aggregation after one block mixes: stream positions of the next block's input and source states."""

    streams: tuple[int, ...]  # positions in (q, k, v, r), or (0,) for a single input
    sources: tuple[int, ...]  # state indices, ascending (the newest state last where it is read)


def aggregation_plan(cfg: MuddConfig, n_streams: int) -> list[Aggregation | None]:
    """The aggregation after each block l, or None where block l+1 just takes block l's output.

    The sparse options (config `dense_*`) select layers (`dense_layers`, `dense_period`: kept when
    (l+1) % p == 0), source states (`dense_sources`, `dense_dilation`: states l+1, l+1-k, ...) and
    multiway streams (`dense_streams`); the defaults select everything, the paper's full MUDD.
    """
    L, layers = cfg.n_layer, cfg.dense_layer_set
    plan: list[Aggregation | None] = []
    for layer in range(L):
        newest, sources = layer + 1, cfg.dense_sources_for(layer)
        keep = (layers is None or layer in layers) and newest % cfg.dense_period == 0
        streams: tuple[int, ...]
        if n_streams == 1:
            streams = (0,)
        elif layer == L - 1:  # the last aggregation feeds the output norm: the R stream only
            streams = (0,) if "r" in cfg.dense_streams else ()
        else:
            streams = tuple(i for i, name in enumerate("qkvr") if name in cfg.dense_streams)
        src = tuple(
            j for j in range(newest) if (sources is None or j in sources) and (newest - j) % cfg.dense_dilation == 0
        )
        # Replacing the inputs needs the newest state among the sources (the residual start); adding to it does not.
        if cfg.dense_mix == "replace" or sources is None or newest in sources:
            src += (newest,)
        plan.append(Aggregation(streams, src) if keep and streams and src else None)
    return plan


class DenseConnection(Connection):
    """Dense connection over depth; subclasses fix the number of streams and whether it is dynamic."""

    n_streams = 4
    dynamic = True

    def __init__(self, cfg: MuddConfig):
        super().__init__(cfg)
        L = cfg.n_layer
        self.prepost = cfg.dense_norm == "prepost"
        self.additive, self.v_after_proj = cfg.dense_mix == "add", cfg.dense_v_after_proj
        self.plan = aggregation_plan(cfg, self.n_streams)
        # The additive form's factor on each aggregation's mix, per stream position (q, k, v, r).
        self.add_scales = [
            None
            if agg is None
            else [
                cfg.dense_add_scale
                / (len(agg.sources) ** 0.5 if cfg.dense_add_scale_by_sources else 1.0)
                * (cfg.dense_v_gain if c == 2 and self.input_streams(layer) == 4 else 1.0)
                for c in range(4)
            ]
            for layer, agg in enumerate(self.plan)
        ]
        kept = {layer: agg for layer, agg in enumerate(self.plan) if agg is not None}
        # The streams each aggregation mixes ([4, 4, ..., 1] for full MUDD; 0 where none).
        self.streams = [len(agg.streams) if agg else 0 for agg in self.plan]
        # Keyed by layer, so full MUDD keeps the published names dense_bs.{l} and dynamic_dense.{l}.
        self.dense_bs = nn.ParameterDict(
            {str(layer): nn.Parameter(torch.zeros(len(agg.streams), len(agg.sources))) for layer, agg in kept.items()}
        )
        if self.dynamic:

            def width(layer: int, agg: Aggregation) -> int:
                if cfg.dense_hidden:
                    return cfg.dense_hidden
                return generator_width(
                    len(agg.streams), len(agg.sources), layer == L - 1, cfg.dense_expand_last, cfg.dense_round64
                )

            self.dynamic_dense = nn.ModuleDict(
                {
                    str(layer): WeightGenerator(
                        cfg.dim,
                        width(layer, agg),
                        len(agg.streams) * len(agg.sources),
                        cfg.norm_eps,
                        scaled_norm=self.prepost,
                        input_norm=cfg.dense_gen_norm,
                    )
                    for layer, agg in kept.items()
                }
            )
        if self.prepost:
            # PrePostDANorm (paper Eq. 10): every stored state is normalised; the R stream's sum is
            # normalised again with a small scale and added to the newest state.
            self.pre_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in range(L + 1))
            self.post_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in range(L))
        self.dim = cfg.dim
        self.cap, self.gen_scale = cfg.dense_cap, cfg.dense_gen_scale
        self.mix_impl = cfg.mix_impl
        self.recompute = cfg.recompute_mix
        self.reset_parameters()

    def static_prior_names(self) -> list[str]:
        return [f"dense_bs.{layer}" for layer in self.dense_bs]

    def mix_flops(self) -> int:
        # Each kept aggregation: every stream a weighted sum of its sources (the paper's FLOP ratio counts it).
        return sum(2 * len(agg.streams) * len(agg.sources) * self.dim for agg in self.plan if agg is not None)

    def input_streams(self, layer: int) -> int:
        """How many stream tensors the aggregation after block `layer` hands on: 4 (q, k, v, r) or 1."""
        return 4 if self.n_streams == 4 and layer < self.n_layer - 1 else 1

    def multiway_input(self, layer: int) -> bool:
        return (
            layer >= 1
            and self.plan[layer - 1] is not None
            and self.input_streams(layer - 1) == 4
            and not self.v_after_proj
        )

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for bias in self.dense_bs.values():
                bias.zero_()
                if not (self.prepost or self.additive):  # one-hot on the newest state: the residual start
                    bias[:, -1] = 1.0
            if self.dynamic:
                for gen in self.generators():
                    nn.init.normal_(gen.w1.weight, std=self.dim**-0.5)
                    nn.init.zeros_(gen.w2.weight)
                    if gen.norm is not None:
                        nn.init.ones_(gen.norm.weight)
            if self.prepost:
                for norm in self.pre_norms:
                    nn.init.ones_(cast(RMSNorm, norm).weight)
                for norm in self.post_norms:
                    nn.init.constant_(cast(RMSNorm, norm).weight, 1e-3)

    def uses_buffer(self) -> bool:
        # Eager runs write states into one buffer and mix it in place (kernels/depth_mix.py); under
        # torch.compile the reference formula is what inductor fuses best; "reference" keeps bit-parity.
        return self.mix_impl != "reference" and not torch.compiler.is_compiling()

    def begin(self, x0: torch.Tensor) -> DenseState:
        state = DenseState(next_input=x0, buffer=DepthBuffer(x0, self.n_layer + 1) if self.uses_buffer() else None)
        self.store(state, self.pre_norms[0](x0) if self.prepost else x0)
        return state

    def store(self, state: DenseState, x: torch.Tensor) -> torch.Tensor:
        state.stored.append(state.buffer.store(x) if state.buffer is not None else x)
        return state.stored[-1]

    def block_input(self, state: DenseState, layer: int) -> BlockInput:
        assert not isinstance(state.next_input, _Pending), "a recomputed input exists only inside run_block"
        return state.next_input

    def output(self, state: DenseState) -> torch.Tensor:
        out = state.next_input
        final = out[-1] if isinstance(out, tuple) else out
        assert isinstance(final, torch.Tensor), "the last aggregation gives the output norm one state"
        return final

    def aggregation(self, layer: int) -> Aggregation:
        """The aggregation after block `layer` (one that a sparse model keeps)."""
        agg = self.plan[layer]
        assert agg is not None, f"no aggregation after block {layer}"
        return agg

    def generators(self) -> list[WeightGenerator]:
        return [cast(WeightGenerator, gen) for gen in self.dynamic_dense.values()]

    def dense_weights(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """Weights (B, T, C, n) over `plan[layer].sources` after block `layer`; static ones are (1, 1, C, n)."""
        bias = self.dense_bs[str(layer)]
        if not self.dynamic:
            weights = bias[None, None]
        else:
            B, T, _ = out.shape
            dynamic = self.dynamic_dense[str(layer)](out)
            if self.gen_scale != 1.0:
                dynamic = dynamic * self.gen_scale
            if self.cap:  # soft cap: near-identity for small weights, bounded by +-cap
                dynamic = self.cap * torch.tanh(dynamic / self.cap)
            weights = dynamic.view(B, T, *bias.shape) + bias
        self.record_weights(layer, weights)
        return weights

    def stream_names(self, layer: int) -> str:
        """Names of the streams the aggregation after block `layer` mixes: letters of qkvr, or x (single-way)."""
        if self.n_streams == 1:
            return "x"
        if self.input_streams(layer) == 1:
            return "r"
        return "".join("qkvr"[c] for c in self.aggregation(layer).streams)

    def advance(self, state: DenseState, layer: int, out: torch.Tensor) -> None:
        stored = self.store(state, self.pre_norms[layer + 1](out) if self.prepost else out)
        # The generator reads the stored slot rather than `out`, so `out` is not kept for backward.
        gen_input = out if self.prepost else stored
        if self.plan[layer] is None:  # a sparse model skips this aggregation: a plain residual step
            state.next_input = gen_input
        elif self.recompute and layer < self.n_layer - 1 and torch.is_grad_enabled():
            state.next_input = _Pending(gen_input, len(state.stored))  # made inside the next block
        else:
            state.next_input = self.next_inputs(state.buffer, state.stored, layer, gen_input)

    def next_inputs(
        self, buffer: DepthBuffer | None, states: list[torch.Tensor], layer: int, gen_input: torch.Tensor
    ) -> BlockInput:
        """The inputs of block layer+1: the mix of the stored states with the weights made from block layer's output."""
        agg = self.aggregation(layer)
        weights = self.dense_weights(layer, gen_input)
        if buffer is not None and agg.sources == tuple(range(len(states))):
            mixed = depth_mix_buffered(buffer, states, weights, self.mix_impl)
        else:  # the reference formula over the chosen states
            mixed = depth_mix_reference([states[j] for j in agg.sources], weights)
        by_position = dict(zip(agg.streams, mixed))
        n_out = self.input_streams(layer)
        if self.prepost:  # gen_input is the block output itself; the R stream's sum is normalised again
            streams = [
                gen_input
                if c not in by_position
                else gen_input + (self.post_norms[layer](by_position[c]) if c == n_out - 1 else by_position[c])
                for c in range(n_out)
            ]
        elif self.additive:  # the newest state plus the scaled mix (the speedrun's form)
            scales = self.add_scales[layer]
            assert scales is not None
            if self.v_after_proj and n_out == 4:  # q, k, v read the R stream; the V mix joins after W_v
                r = gen_input + scales[3] * by_position[3] if 3 in by_position else gen_input
                return ValueAdded(r, scales[2] * by_position[2])
            streams = [gen_input + scales[c] * by_position[c] if c in by_position else gen_input for c in range(n_out)]
        elif isinstance(mixed, Streams) and agg.streams == (0, 1, 2, 3):  # all four mixed, as one tensor
            return mixed
        else:  # streams that are not mixed take the newest state, as in a residual model
            streams = [by_position.get(c, gen_input) for c in range(n_out)]
        return cast(BlockInput, tuple(streams)) if n_out == 4 else streams[0]

    def run_block(self, state: DenseState, layer: int, block: Block, ctx) -> None:
        pending = state.next_input
        if isinstance(pending, _Pending):
            # Inside the block call, so that activation checkpointing of the block covers it too.
            out = block((state.buffer, state.stored[: pending.n_states], pending), ctx, around=self)
        else:
            out = block(pending, ctx)
        self.advance(state, layer, out)

    def through_block(self, block: Block, pending: tuple, ctx) -> torch.Tensor:
        """Block inputs recomputed in backward: only the stored states and the generator input are kept,
        not the mixed streams, their normalised copies or the generator's activations (architecture §5 memory)."""
        buffer, states, p = pending
        # The aggregation after the previous block, read off the block: under a per-block compile an int carried
        # in the input becomes symbolic once blocks differ, and the generators' module keys need a plain int.
        layer = block.layer_idx - 1

        def normed_inputs(gen_input: torch.Tensor, *states: torch.Tensor):
            x = self.next_inputs(buffer, list(states), layer, gen_input)
            value = (x.value,) if isinstance(x, ValueAdded) else ()
            return (*block.attention_inputs(x), residual_input(x), *value)

        nq, nk, nv, xr, *value = checkpoint(normed_inputs, p.gen_input, *states, use_reentrant=False)
        return block.finish(xr, block.attention(nq, nk, nv, ctx, value_add=value[0] if value else None))


@dataclass
class _Pending:
    """A block's output is stored; the next block makes its inputs from the first n_states states."""

    gen_input: torch.Tensor
    n_states: int


class MuddConnection(DenseConnection):
    """MUDD: multiway (q, k, v, r) dynamic dense connections."""

    n_streams, dynamic = 4, True


class DDFormerConnection(DenseConnection):
    """DDFormer: single-way dynamic dense; one aggregate feeds q, k, v and the residual."""

    n_streams, dynamic = 1, True


class DenseFormerConnection(DenseConnection):
    """DenseFormer (Pagliardini et al. 2024): single-way static depth-weighted average."""

    n_streams, dynamic = 1, False


class StaticMultiwayConnection(DenseConnection):
    """Static multiway: MUDD's four streams with static weights only (paper Table 5)."""

    n_streams, dynamic = 4, False


@dataclass
class DenseState:
    """What the dense family keeps while the body runs.

    stored: the states the aggregations mix: the embedding, then each block's output (PrePostDANorm:
        their pre-norms);
    buffer: the DepthBuffer that holds `stored` contiguously, when the mix uses one;
    next_input: the next block's input: one tensor, the four streams (q, k, v, r) or a ValueAdded; or a
        _Pending when it is recomputed inside the next block.
    """

    next_input: BlockInput | _Pending
    stored: list[torch.Tensor] = field(default_factory=list)
    buffer: DepthBuffer | None = None
