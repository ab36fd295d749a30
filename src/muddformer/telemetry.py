"""Training telemetry: dense-weight statistics per layer and stream, gradient norms per parameter group,
and loss-spike / weight blow-up reports that name the layer and the option that would help.

Cheap enough to leave on: the dense-weight statistics are read from the forward pass of the first
micro-batch on the first rank at each log step (eager runs; a compiled model records none), the
experts' load and router loss are averaged over all the step's forwards and ranks, and the gradient
norms are one pass over the gradients at those steps.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch
import torch.distributed as dist

# A dynamic dense weight above this magnitude is reported as a blow-up (the static prior starts at 1). Healthy
# 6-layer runs (docs/results/evidence) reach 35-51, mostly on the embedding in the r stream, where the weight makes
# up for the embedding's small scale; an unstable 24-layer run can stay under 40, so the gradient norm watches it.
BLOWUP = 100.0
# A gradient norm (before clipping) this many times the median of the recent logged ones is reported as a spike.
# The 24-layer runs of docs/results/stability-depth, logged every step: the stable ones stay under 10.3x, every
# unstable one passes 20x by its step 32 (and up to 1e6x later).
GRAD_SPIKE = 20.0
FIXES = "try --set dense_cap=10, --generator-lr-mult 0.25 or --set dense_norm=prepost"


def weight_stats(layer: int, streams: str, weights: torch.Tensor) -> dict[str, float]:
    """`dense/{layer}/{stream}/{mean_abs,max_abs,token_std}` of weights (B, T, C, n) or (1, 1, C, n):
    the mean and max |weight| over tokens and sources, and the spread over tokens (std over the B*T
    tokens of each weight, averaged over sources; 0 for static weights)."""
    w = weights.detach().float().flatten(0, 1)  # (tokens, C, n)
    spread = w.std(0, unbiased=False).mean(-1) if w.shape[0] > 1 else torch.zeros(w.shape[1])
    stats = torch.stack([w.abs().mean((0, 2)), w.abs().amax((0, 2)), spread]).tolist()  # 3 x C
    out = {}
    for c, stream in enumerate(streams):
        for k, name in enumerate(("mean_abs", "max_abs", "token_std")):
            out[f"dense/{layer}/{stream}/{name}"] = stats[k][c]
    return out


def group_grad_norms(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`grad_norm/{group}`: the L2 norm of each named parameter group's gradients (before clipping). Under
    FSDP2 each rank sums the squares of its shards and one all-reduce adds them up for every group."""
    names: list[str] = []
    sharded: list[torch.Tensor] = []  # per group: the sum of squares over this rank's shards
    whole: list[torch.Tensor] = []  # per group: the sum of squares over gradients every rank holds in full
    mesh = None
    for group in optimizer.param_groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            continue
        names.append(f"grad_norm/{group.get('name', len(names))}")
        shards = [g for g in grads if is_sharded(g)]
        for g in shards:
            if g.device_mesh.ndim != 1 or not all(p.is_shard() for p in g.placements):
                raise NotImplementedError(f"gradient norms of DTensor placements {g.placements}")
            mesh = g.device_mesh
        sharded.append(sum_of_squares([g.to_local() for g in shards], grads[0].device))
        whole.append(sum_of_squares([g for g in grads if not is_sharded(g)], grads[0].device))
    if not names:
        return {}
    shard_total = torch.stack(sharded)
    if mesh is not None:
        dist.all_reduce(shard_total, group=mesh.get_group())
    return dict(zip(names, (shard_total + torch.stack(whole)).sqrt().tolist()))


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2's parameters and gradients); checked by its methods, so that the model's import of this
    module needs no torch.distributed."""
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the squared entries of every tensor, in float32 at least (a 0-d tensor on `device`)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([torch.linalg.vector_norm(t.float()).square() for t in tensors]).sum()


class ExpertTally:
    """The router loss and each mixture-of-experts layer's expert load over a log step's forwards (every
    micro-batch, every rank): `moe/router_loss`, `moe/{layer}/load/{expert}` (an expert's share of the
    assignments times the number of experts: 1 = balanced) and `moe/{layer}/max_load`, the busiest expert's."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # router loss, then each layer's shares, summed over forwards
        self.layers: list[tuple[int, int]] = []  # (layer, experts)
        self.forwards = 0

    def add(self, model, router_loss: torch.Tensor) -> None:
        """Count the last forward of `model` (a MuddModel), whose weighted router losses were `router_loss`."""
        loads = [
            (layer, b.feed_forward.load)
            for layer, b in enumerate(model.layers)
            if getattr(b.feed_forward, "load", None) is not None
        ]
        flat = torch.cat([router_loss.detach().float().reshape(1), *(load.float() for _, load in loads)])
        self.layers = [(layer, load.numel()) for layer, load in loads]
        self.sums = flat if self.sums is None else self.sums + flat
        self.forwards += 1

    def read(self, mean_over_ranks=lambda t: t) -> dict[str, float]:
        """The means over the counted forwards, then over the ranks (`mean_over_ranks`, a collective: every rank
        must call it); {} when nothing was counted."""
        if self.sums is None:
            return {}
        values = mean_over_ranks(self.sums / self.forwards).tolist()
        out, at = {"moe/router_loss": values[0]}, 1
        for layer, experts in self.layers:
            scaled = [share * experts for share in values[at : at + experts]]
            at += experts
            out.update({f"moe/{layer}/load/{e}": share for e, share in enumerate(scaled)})
            out[f"moe/{layer}/max_load"] = max(scaled)
        return out


class SpikeWatch:
    """Flags a logged step whose loss is more than max(0.5, 4 std) above the mean of the recent ones, whose
    gradient norm is GRAD_SPIKE times their median (naming the parameter group that grew most), or whose dense
    weights pass BLOWUP; each report names the layer and stream holding the largest dense weight."""

    def __init__(self, window: int = 20):
        self.recent: deque[float] = deque(maxlen=window)
        self.grads: dict[str, deque[float]] = {}  # "grad_norm" and each "grad_norm/<group>": recent values

    def check(self, step: int, record: dict) -> str | None:
        loss = record["loss"]
        largest = max(((v, k) for k, v in record.items() if k.endswith("/max_abs")), default=None)
        where = ""
        if largest is not None:
            _, layer, stream, _ = largest[1].split("/")
            where = f"; the largest dense weight is {largest[0]:.3g} after block {layer}, stream {stream}"
        message = None
        if len(self.recent) >= 5:
            mean = sum(self.recent) / len(self.recent)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
            if loss > mean + max(0.5, 4 * std):  # tiny-batch noise stays inside; a jump of a nat does not
                message = f"loss spike at step {step}: {loss:.3f} after {mean:.3f} on average{where}"
        growth = self.grad_growth(record)
        if message is None and growth.get("grad_norm", 0.0) > GRAD_SPIKE:
            group = max((g for g in growth if g != "grad_norm"), key=growth.__getitem__, default=None)
            most = f", most of all {group.split('/', 1)[1]} ({growth[group]:.0f}x)" if group else ""
            message = (
                f"gradient norm spike at step {step}: {record['grad_norm']:.3g}, {growth['grad_norm']:.0f}x the "
                f"median of the recent logged ones{most}{where}"
            )
        if message is None and largest is not None and largest[0] > BLOWUP:
            message = f"dense weights blowing up at step {step}{where}"
        self.recent.append(loss)
        return None if message is None else f"{message}; {FIXES}" if where else message

    def grad_growth(self, record: dict) -> dict[str, float]:
        """Each logged gradient norm over the median of its recent values (once 5 are known; a non-finite norm
        counts as infinite growth), then adds the norms to those values."""
        growth = {}
        for key, value in record.items():
            if key != "grad_norm" and not key.startswith("grad_norm/"):
                continue
            recent = self.grads.setdefault(key, deque(maxlen=self.recent.maxlen))
            if len(recent) >= 5:
                median = statistics.median(recent)
                growth[key] = value / median if math.isfinite(value) and median > 0 else math.inf
            if math.isfinite(value):
                recent.append(value)
        return growth
