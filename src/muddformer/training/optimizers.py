"""The optimizers of a run: AdamW for every parameter group, or Muon for the 2-D matrices that a recipe gives it
(`optimizer="muon"`: the blocks' matrices; `generator_optimizer="muon"`: the connection's) and AdamW for the rest.

Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalises each matrix's momentum with Newton-Schulz steps. Its
learning rate is scaled by 0.2 sqrt(max(A, B)) ("match_rms_adamw", Moonshot's Moonlight), so that its updates have
AdamW's RMS and a recipe's AdamW learning rate and weight decay serve for both. Embeddings, the output head, the
experts' stacked (3-D) matrices and every vector stay on AdamW, as in the speedrun and Moonlight.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import distribute_tensor

from muddformer.errors import ConfigError
from muddformer.telemetry import is_sharded

try:  # torch's own Newton-Schulz and learning-rate scale, so that a step is torch.optim.Muon's (tests compare bits)
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
except ImportError:  # torch < 2.9, or a torch that moved them: torch.optim.Muon's own step
    _zeropower_via_newtonschulz = None


class OptimizerSet:
    """One or two optimizers the training loop treats as one: their groups in one list (the schedule sets each
    group's lr), one step, one zero_grad; `optimizers` for the checkpoint's state dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def build_optimizers(groups: list[dict], lr: float, fused: dict) -> OptimizerSet:
    """AdamW over the groups marked `optimizer="adamw"` and Muon over those marked "muon" (param_groups)."""
    adamw = [g for g in groups if g["optimizer"] == "adamw"]
    muon = [g for g in groups if g["optimizer"] == "muon"]
    optimizers: list[torch.optim.Optimizer] = []
    if adamw:
        optimizers.append(torch.optim.AdamW(adamw, lr=lr, **fused))
    if muon:
        if not hasattr(torch.optim, "Muon"):
            raise ConfigError(f"Muon needs torch >= 2.9 (torch.optim.Muon), this is {torch.__version__}; use AdamW")
        muon_class = WholeMatrixMuon if _zeropower_via_newtonschulz is not None else torch.optim.Muon
        optimizers.append(muon_class(muon, lr=lr, adjust_lr_fn="match_rms_adamw"))
    return OptimizerSet(optimizers)


if hasattr(torch.optim, "Muon"):

    class WholeMatrixMuon(torch.optim.Muon):
        """torch.optim.Muon whose Newton-Schulz iteration sees every matrix whole. Under FSDP2 a matrix's gradient
        and momentum are DTensors sharded by rows: torch's step runs each Newton-Schulz product on the shards and
        communicates for each (11 collectives per matrix and step in tests/muon_sharded_step.py), and its bfloat16
        rounding depends on the rank layout. Here the update is all-gathered once, orthogonalised whole on every
        rank (Moonlight's distributed Muon) and each rank keeps its own rows: one collective per matrix, and the
        update a single device computes, bit for bit. The momentum stays sharded. Unsharded matrices step exactly
        as in torch.optim.Muon."""

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                params: list[torch.Tensor] = []
                grads: list[torch.Tensor] = []
                buffers: list[torch.Tensor] = []
                self._init_group(group, params, grads, buffers)
                momentum, lr = group["momentum"], float(group["lr"])  # torch.optim takes a 1-element tensor too
                for param, grad, buffer in zip(params, grads, buffers):
                    buffer.lerp_(grad, 1 - momentum)
                    update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                    update = orthogonalised_whole(update, group)
                    param.mul_(1 - lr * group["weight_decay"])
                    param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
            return loss


def orthogonalised_whole(update: torch.Tensor, group: dict) -> torch.Tensor:
    """torch's Newton-Schulz orthogonalisation of `update`; a DTensor is gathered first and the result laid out as
    it was (each rank slices its own part: no second collective)."""
    settings = (group["ns_coefficients"], group["ns_steps"], group["eps"])
    if not is_sharded(update):
        return _zeropower_via_newtonschulz(update, *settings)
    # torch's iteration starts by rounding to bfloat16: gathering the rounded shards moves half the bytes, same bits
    whole = _zeropower_via_newtonschulz(update.bfloat16().full_tensor(), *settings)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)
