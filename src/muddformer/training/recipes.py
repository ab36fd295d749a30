"""Training recipes: named optimizer, schedule and batch settings, chosen with `mudd train --recipe NAME`.

A recipe says how a run trains, not what the model computes (that is MuddConfig): AdamW and its
parameter groups, the peak learning rate and its schedule, clipping, batch and precision. Every
preset names its default recipe (`presets.PRESET_RECIPES`); any field can be overridden from the
command line, and the resolved recipe is recorded in the run's run.json.

Parameter groups (`param_groups`): the body's matrices (embeddings, projections, head) with weight
decay; the body's vectors (norm weights, biases) without; the connection's own learned parameters
(MUDD's weight generators, HC's and mHC's dynamic projections, AttnRes's queries, the connections'
norms) with their own learning-rate multiplier, betas, epsilon and weight decay (vectors not decayed, except the
projections stored as vectors, such as HC's dynamic beta, which are decayed like matrices); its
static priors (MUDD's `dense_bs`, HC's and mHC's static mixing weights) never decayed, with their
own learning-rate multiplier. With `optimizer="muon"` the blocks' 2-D matrices train on Muon instead
(group `muon_matrices`), with `generator_optimizer="muon"` the connection's (`generator_muon_matrices`).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from torch import nn

from muddformer.errors import ConfigError
from muddformer.options import DECAY_SCOPES, OPTIMIZERS, PRECISIONS, SCHEDULES


@dataclass(frozen=True)
class Recipe:
    """How a run trains. `follows` names the published setting each value comes from."""

    name: str
    follows: str
    lr: float  # peak learning rate
    optimizer: str = "adamw"  # or "muon": Muon for the blocks' 2-D matrices, AdamW for the rest (optimizers.py)
    muon_momentum: float = 0.95
    warmup: float = 0.01  # linear warm-up, as a share of the run's steps
    schedule: str = "cosine"  # decay after warm-up: cosine or linear to min_lr_ratio x peak, or constant
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    weight_decay_on: str = "matrices"  # or "all": norm scales, biases and priors too (the official JAX code)
    grad_clip: float = 1.0  # global gradient norm; 0 = off
    batch_size: int = 8  # sequences per rank per micro-batch
    global_batch: int | None = None  # sequences per optimizer step over all ranks (sets gradient accumulation)
    seq_len: int | None = None  # None: min(256, block_size)
    dtype: str = "float32"  # compute dtype (bfloat16: autocast, or FSDP2 mixed precision)
    max_steps: int = 450  # optimizer steps: the published run's length (warm-up and decay are shares of it)
    # The connection's own parameters (see the module docstring); None takes the body's value.
    generator_lr_mult: float = 1.0
    generator_beta1: float | None = None
    generator_beta2: float | None = None
    generator_weight_decay: float | None = None
    generator_eps: float | None = None
    generator_optimizer: str = "adamw"  # or "muon": the connection's 2-D matrices (MUDD's W1, W2) on Muon
    prior_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        # Messages name the `mudd train` flag of each field, which is how a user sets it.
        def fail(field: str, rule: str) -> None:
            raise ConfigError(f"recipe {self.name!r}: --{field.replace('_', '-')} {rule}, got {getattr(self, field)!r}")

        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.dtype not in PRECISIONS:
            fail("dtype", f"must be one of {', '.join(PRECISIONS)}")
        if self.weight_decay_on not in DECAY_SCOPES:
            fail("weight_decay_on", f"must be one of {', '.join(DECAY_SCOPES)}")
        for field in ("optimizer", "generator_optimizer"):
            if getattr(self, field) not in OPTIMIZERS:
                fail(field, f"must be one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.muon_momentum < 1:
            fail("muon_momentum", "must be in [0, 1)")
        for field in ("lr", "eps", "batch_size", "generator_lr_mult", "max_steps"):
            if not getattr(self, field) > 0:
                fail(field, "must be positive")
        for field in ("warmup", "min_lr_ratio", "weight_decay", "grad_clip", "prior_lr_mult"):
            if not getattr(self, field) >= 0:
                fail(field, "must be >= 0")
        if not self.warmup < 1:
            fail("warmup", "must be a share of the steps below 1")
        if not self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "must be <= 1")
        for field in ("seq_len", "global_batch", "generator_eps"):
            if getattr(self, field) is not None and getattr(self, field) <= 0:
                fail(field, "must be positive")
        for field in ("beta1", "beta2", "generator_beta1", "generator_beta2"):
            value = getattr(self, field)
            if value is not None and not 0 <= value < 1:
                fail(field, "must be in [0, 1)")

    @property
    def generator_betas(self) -> tuple[float, float]:
        """The connection's parameters' betas (each None field: the body's)."""
        return (
            self.beta1 if self.generator_beta1 is None else self.generator_beta1,
            self.beta2 if self.generator_beta2 is None else self.generator_beta2,
        )

    @property
    def generator_decay(self) -> float:
        """The connection's parameters' weight decay (None: the body's)."""
        return self.weight_decay if self.generator_weight_decay is None else self.generator_weight_decay

    @property
    def generator_adam_eps(self) -> float:
        """The connection's parameters' AdamW epsilon (None: the body's)."""
        return self.eps if self.generator_eps is None else self.generator_eps

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


OVERRIDABLE = tuple(f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "follows"))

_PAPER = (
    "the MUDD paper's recipe (docs/architecture.md §5): AdamW (0.9, 0.95), wd 0.1, clip 1.0, 1 % warm-up, "
    "cosine to 10 %"
)
_PYTHIA_STEPS = 143_000  # Pythia's run: 300B tokens in 2M-token batches (Table 3's models)
RECIPES: dict[str, Recipe] = {
    # The paper's scaling runs: 0.5M-token batches of 2048-token sequences, bfloat16; each size's peak LR (Table 2).
    **{
        f"paper-{size}": Recipe(
            f"paper-{size}",
            f"{_PAPER}, lr {lr:g}, batch 256 x 2048, {tokens}B tokens ({steps:,} steps); weight decay on every "
            "parameter as in the official JAX code",
            lr=lr,
            seq_len=2048,
            global_batch=256,
            dtype="bfloat16",
            max_steps=steps,
            weight_decay_on="all",
        )
        for size, lr, tokens, steps in (
            ("405m", 3e-4, 7, 13_500),  # the official JAX configuration's step count
            ("834m", 2.5e-4, 15, 28_610),  # the others: Table 2's tokens / 524,288 tokens a step
            ("1.4b", 2e-4, 26, 49_591),
            ("deepnarrow-797m", 2.5e-4, 15, 28_610),
            ("deepnarrow-1.34b", 2e-4, 26, 49_591),
            ("moe-1.8b-a405m", 3e-4, 26, 49_591),  # the 405M model's compute per token, 26B tokens (§6)
        )
    },
    # The released checkpoints (architecture §5): MUDDFormer-2.8B cosine from 3.2e-4 to 3.2e-6; MUDDPythia at
    # Pythia's peak LRs; 2M-token batches (other Pythia settings are not in the spec: the paper's stand in).
    "muddformer-2.8b": Recipe(
        "muddformer-2.8b",
        "docs/architecture.md §5 MUDDFormer-2.8B: lr 3.2e-4 cosine to 3.2e-6; otherwise the paper's",
        lr=3.2e-4,
        min_lr_ratio=0.01,
        seq_len=2048,
        global_batch=1024,
        dtype="bfloat16",
        max_steps=_PYTHIA_STEPS,
    ),
    "pythia-1.4b": Recipe(
        "pythia-1.4b",
        "docs/architecture.md §5 MUDDPythia-1.4B: Pythia's peak lr 2e-4; otherwise the paper's",
        lr=2e-4,
        seq_len=2048,
        global_batch=1024,
        dtype="bfloat16",
        max_steps=_PYTHIA_STEPS,
    ),
    "pythia-2.8b": Recipe(
        "pythia-2.8b",
        "docs/architecture.md §5 MUDDPythia-2.8B: Pythia's peak lr 1.6e-4; otherwise the paper's",
        lr=1.6e-4,
        seq_len=2048,
        global_batch=1024,
        dtype="bfloat16",
        max_steps=_PYTHIA_STEPS,
    ),
    # Small models on the CPU (8k vocabulary, float32): the paper's recipe at a peak LR for their size.
    "cpu": Recipe("cpu", f"{_PAPER}, at lr 3e-3 for 1-10M-parameter models", lr=3e-3),
}
# The GPT-2 speedrun record's settings for the MUDD parameters (modded-nanogpt 2026-04-22 MuddFormer: W1, W2 and
# the priors on Adam at lr x 0.25, betas (0.9, 0.99); its Adam weight decay is lr^2 x 0.005, negligible: none
# here) on a size's own recipe; the rest of the record (NorMuon body, schedule) is not ours to follow.
for _base in ("cpu", "paper-405m"):
    RECIPES[f"{_base}-speedrun"] = dataclasses.replace(
        RECIPES[_base],
        name=f"{_base}-speedrun",
        generator_lr_mult=0.25,
        prior_lr_mult=0.25,
        generator_beta2=0.99,
        generator_weight_decay=0.0,
        generator_eps=1e-10,
        follows=RECIPES[_base].follows + "; the MUDD parameters as the GPT-2 speedrun's record: lr x 0.25, betas "
        "(0.9, 0.99), eps 1e-10, no weight decay",
    )


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint}; list them with `mudd recipes`")
    return RECIPES[name]


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Optimizer parameter groups of a MuddModel by role (module docstring). Each group carries `name`, `lr_mult`
    (the loop sets lr = schedule x lr_mult) and `optimizer` ("adamw" or "muon"); every trainable parameter is in
    exactly one group."""
    connection = model.connection
    priors = {"connection." + name for name in connection.static_prior_names()}
    projections = {"connection." + name for name in connection.projection_vector_names()}
    adamw = dict(optimizer="adamw", betas=(recipe.beta1, recipe.beta2), eps=recipe.eps)
    own = dict(optimizer="adamw", betas=recipe.generator_betas, eps=recipe.generator_adam_eps)  # the connection's
    muon = dict(optimizer="muon", momentum=recipe.muon_momentum)
    wd, gen_wd = recipe.weight_decay, recipe.generator_decay
    decay_all = recipe.weight_decay_on == "all"  # the official JAX code's AdamW decays every parameter
    settings = {
        "matrices": dict(lr_mult=1.0, weight_decay=wd, **adamw),
        "muon_matrices": dict(lr_mult=1.0, weight_decay=wd, **muon),
        "vectors": dict(lr_mult=1.0, weight_decay=wd if decay_all else 0.0, **adamw),
        "generator_matrices": dict(lr_mult=recipe.generator_lr_mult, weight_decay=gen_wd, **own),
        "generator_muon_matrices": dict(lr_mult=recipe.generator_lr_mult, weight_decay=gen_wd, **muon),
        "generator_vectors": dict(lr_mult=recipe.generator_lr_mult, weight_decay=gen_wd if decay_all else 0.0, **own),
        "priors": dict(lr_mult=recipe.prior_lr_mult, weight_decay=gen_wd if decay_all else 0.0, **own),
    }
    members: dict[str, list] = {name: [] for name in settings}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = parameter_role(name, p.dim(), priors, projections)
        if p.dim() == 2 and (
            (role == "matrices" and recipe.optimizer == "muon" and name.startswith("layers."))
            or (role == "generator_matrices" and recipe.generator_optimizer == "muon")
        ):
            role = role.replace("matrices", "muon_matrices")
        members[role].append(p)
    if recipe.generator_optimizer == "muon" and not members["generator_muon_matrices"]:
        raise ConfigError(
            f"--generator-optimizer muon: the {model.config.connection!r} connection has no learned matrices for "
            "Muon to train; leave it at adamw"
        )
    return [dict(name=name, params=members[name], **settings[name]) for name in settings if members[name]]


def parameter_role(name: str, ndim: int, priors: set[str], projections: set[str]) -> str:
    """The AdamW parameter group of one MuddModel parameter, from its name and number of dimensions; `projections`
    are vectors that count as matrices (a connection's projection_vectors)."""
    if name in priors:
        return "priors"
    matrix = ndim >= 2 or name in projections
    if name.startswith("connection."):
        return "generator_matrices" if matrix else "generator_vectors"
    return "matrices" if matrix else "vectors"


def gradient_accumulation(recipe: Recipe, world: int) -> int:
    """Micro-batches per optimizer step that make the recipe's global batch on `world` ranks (1 without one)."""
    if recipe.global_batch is None:
        return 1
    per_step = recipe.batch_size * world
    if recipe.global_batch % per_step:
        raise ConfigError(
            f"recipe {recipe.name!r}: --global-batch {recipe.global_batch} is not a multiple of --batch-size "
            f"{recipe.batch_size} x {world} rank(s); change --batch-size or pass --grad-accum"
        )
    return recipe.global_batch // per_step
