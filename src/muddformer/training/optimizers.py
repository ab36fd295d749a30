"""The optimizers of a run: AdamW for every parameter group, or Muon for the 2-D matrices that a recipe gives it
(`optimizer="muon"`: the blocks' matrices; `generator_optimizer="muon"`: the connection's) and AdamW for the rest.

Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalises each matrix's momentum with Newton-Schulz steps. Its
learning rate is scaled by 0.2 sqrt(max(A, B)) ("match_rms_adamw", Moonshot's Moonlight), so that its updates have
AdamW's RMS and a recipe's AdamW learning rate and weight decay serve for both. Embeddings, the output head, the
experts' stacked (3-D) matrices and every vector stay on AdamW, as in the speedrun and Moonlight.
"""

from __future__ import annotations

import torch

from muddformer.errors import ConfigError


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
        optimizers.append(torch.optim.Muon(muon, lr=lr, adjust_lr_fn="match_rms_adamw"))
    return OptimizerSet(optimizers)
