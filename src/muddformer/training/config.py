"""What a training run is: TrainConfig (every `mudd train` option), the model config it builds, their checks."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from muddformer.adapters.folders import load_config, read_folder_raw_config
from muddformer.adapters.transformers_checkpoints import config_from_transformers, is_transformers_checkpoint
from muddformer.config import CONNECTIONS, MuddConfig
from muddformer.data.shards import TokenData
from muddformer.errors import ConfigError, DataError
from muddformer.options import DECAY_SCOPES, OPTIMIZERS, PARALLELISMS, PRECISIONS, SCHEDULES, option
from muddformer.presets import PRESET_RECIPES
from muddformer.training.recipes import (
    OVERRIDABLE,
    Recipe,
    get_recipe,
    gradient_accumulation,
)


@dataclass
class TrainConfig:
    """Every option of a training run; each field is a `mudd train` flag (muddformer.options)."""

    preset: str = option("tiny", help="model preset (see `mudd presets`; default tiny)")
    init_from: str | None = option(
        None,
        help="start from a model folder's weights (ours, published or `mudd convert`ed); its config replaces the "
        "preset's, --set/--connection change it (a new connection starts at the identity)",
    )
    config: str | None = option(None, help="YAML or JSON file of MuddConfig fields overriding the preset")
    set: list[str] = option(factory=list, metavar="FIELD=VALUE", help="override one MuddConfig field (repeatable)")
    connection: str | None = option(None, choices=CONNECTIONS, help="override the preset's connection")
    data: str | None = option(
        None, help="prepared data folder (`mudd prepare`); default: the bundled Shakespeare corpus"
    )
    out: str | None = option(None, help="run folder (default runs/PRESET-CONNECTION); re-running resumes from it")
    max_steps: int | None = option(None, help="optimizer steps (default: the recipe's; cpu: 450)")
    grad_accum: int | None = option(
        None, help="micro-batches per optimizer step (default: those that make the recipe's --global-batch, else 1)"
    )
    # How it trains: the recipe (default: the preset's) and overrides of its fields (None: the recipe's).
    recipe: str | None = option(None, help="training recipe (default: the preset's, e.g. cpu, paper-405m)")
    batch_size: int | None = option(None, help="sequences per rank per micro-batch")
    global_batch: int | None = option(None, help="sequences per optimizer step over all ranks (sets --grad-accum)")
    seq_len: int | None = option(None, help="tokens per sequence (recipe default: min(256, block_size))")
    lr: float | None = option(None, help="peak learning rate")
    optimizer: str | None = option(
        None, choices=OPTIMIZERS, help="adamw, or muon: Muon for the blocks' matrices, AdamW for the rest"
    )
    muon_momentum: float | None = option(None, help="Muon's momentum (0.95)")
    warmup: float | None = option(None, help="linear warm-up as a share of --max-steps")
    schedule: str | None = option(None, choices=SCHEDULES, help="decay after warm-up")
    min_lr_ratio: float | None = option(None, help="final learning rate / peak")
    beta1: float | None = option(None)
    beta2: float | None = option(None)
    eps: float | None = option(None, help="AdamW epsilon")
    weight_decay: float | None = option(None, help="AdamW weight decay (on matrices, or see --weight-decay-on)")
    weight_decay_on: str | None = option(
        None, choices=DECAY_SCOPES, help="matrices, or all parameters (norm scales, biases, priors too)"
    )
    grad_clip: float | None = option(None, help="global gradient-norm clip (0: off)")
    dtype: str | None = option(
        None, choices=PRECISIONS, help="compute dtype (bfloat16: autocast / FSDP mixed precision)"
    )
    generator_lr_mult: float | None = option(
        None,
        help="learning-rate multiplier of the connection's own parameters (MUDD's weight generators, ...)",
    )
    generator_beta1: float | None = option(None, help="their AdamW beta1 (default: --beta1)")
    generator_beta2: float | None = option(None, help="their AdamW beta2 (default: --beta2)")
    generator_weight_decay: float | None = option(None, help="their weight decay on matrices (default: --weight-decay)")
    generator_eps: float | None = option(None, help="their AdamW epsilon (default: --eps)")
    generator_optimizer: str | None = option(
        None, choices=OPTIMIZERS, help="adamw, or muon for their matrices (MUDD's W1, W2)"
    )
    prior_lr_mult: float | None = option(
        None, help="learning-rate multiplier of the static priors (MUDD's dense_bs, ...)"
    )
    eval_every: int = option(50)
    eval_windows: int = option(64, help="validation sequences per evaluation")
    save_every: int = option(50)
    keep_checkpoints: int = option(3, help="newest checkpoints kept (default 3)")
    log_every: int = option(10)
    seed: int = option(0)
    compile: bool = option(False, help="torch.compile the model")
    activation_checkpointing: bool = option(False, help="recompute block activations in backward")
    parallel: str = option("none", choices=PARALLELISMS, help="data parallelism under torchrun")
    fsdp_defer_grad_sync: bool = option(
        False,
        help="with --parallel fsdp and --grad-accum > 1, reduce-scatter the gradients once a step instead of after "
        "every micro-batch: less communication, unsharded gradients held between micro-batches",
    )
    device: str = option("auto", help="auto, cpu or cuda")
    sample_tokens: int = option(200, help="tokens of text sampled at the end (0: none)")
    sample_prompt: str = option("ROMEO:\n")
    tensorboard: bool = option(True, help="write no TensorBoard events")
    progress: bool = option(True, help="no progress bar")
    telemetry: bool = option(True, help="log no dense-weight statistics or per-group gradient norms")

    def resolved(self, world: int = 1) -> tuple["TrainConfig", Recipe]:
        """The recipe with this config's overrides, and this config with every recipe field filled in, for a run
        on `world` ranks: --grad-accum from the global batch, or an explicit --grad-accum setting the global batch
        that run.json records (both given must agree)."""
        if world > 1 and self.parallel == "none":
            raise ConfigError(
                f"{world} ranks with --parallel none would train {world} separate models; "
                "pass --parallel ddp or --parallel fsdp"
            )
        if self.fsdp_defer_grad_sync and self.parallel != "fsdp":
            raise ConfigError(f"--fsdp-defer-grad-sync applies to --parallel fsdp, not --parallel {self.parallel}")
        base = get_recipe(self.recipe or PRESET_RECIPES.get(self.preset, "cpu"))
        recipe = base.replace(**{k: getattr(self, k) for k in OVERRIDABLE if getattr(self, k) is not None})
        grad_accum = self.grad_accum
        if grad_accum is None:
            grad_accum = gradient_accumulation(recipe, world)
        elif grad_accum > 0:
            sequences = recipe.batch_size * grad_accum * world
            if self.global_batch is not None and self.global_batch != sequences:
                raise ConfigError(
                    f"--global-batch {self.global_batch} disagrees with --batch-size {recipe.batch_size} x "
                    f"--grad-accum {grad_accum} x {world} rank(s) = {sequences}; pass only one of the two"
                )
            recipe = recipe.replace(global_batch=sequences)
        tc = dataclasses.replace(
            self, recipe=recipe.name, grad_accum=grad_accum, **{k: getattr(recipe, k) for k in OVERRIDABLE}
        )
        return tc, recipe


def read_overrides(path: str) -> dict:
    """MuddConfig fields from a YAML or JSON file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"cannot parse config file {path} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of MuddConfig fields")
    return data


def parse_set_item(item: str) -> tuple[str, object]:
    """One `key=value` override; the value is read as JSON where it parses (numbers, true/false), else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like key=value")
    key, value = item.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_set(items: list[str]) -> dict:
    """`key=value` overrides (parse_set_item), later ones winning."""
    return dict(parse_set_item(item) for item in items)


def model_config(tc: TrainConfig) -> MuddConfig:
    overrides = read_overrides(tc.config) if tc.config else {}
    overrides.update(parse_set(tc.set))
    if tc.connection:
        overrides["connection"] = tc.connection
    if tc.init_from:
        raw = read_folder_raw_config(tc.init_from)
        if is_transformers_checkpoint(raw):
            return config_from_transformers(raw, **overrides)
        return load_config(tc.init_from).replace(**overrides)
    return MuddConfig.from_preset(tc.preset, **overrides)


# Recipe fields a resumed run may change: names, how the batch is split and computed, the run length. The batch is in
# training_identity as the sequences per optimizer step.
NOT_IDENTITY = ("name", "follows", "batch_size", "global_batch", "seq_len", "dtype", "max_steps")


def training_identity(tc: TrainConfig, recipe: Recipe, seq_len: int, world: int, data: TokenData) -> dict:
    """What a resumed run must share with its checkpoint (saved in it): the optimizer's settings and schedule, the
    sequences and tokens of a step, the seed and the data. --max-steps may grow; how it computes may change."""
    fixed = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name not in NOT_IDENTITY}
    fixed["generator_eps"] = recipe.generator_adam_eps  # what the optimizer uses: None and --eps's value are one
    if "muon" not in (recipe.optimizer, recipe.generator_optimizer):
        del fixed["muon_momentum"]  # unused
    sequences = tc.batch_size * tc.grad_accum * world  # type: ignore[operator]  # both set once resolved
    return {
        **fixed,
        "sequences_per_step": sequences,
        "seq_len": seq_len,
        "seed": tc.seed,
        "data": data.meta.get("fingerprint"),
    }


def validate(tc: TrainConfig, cfg: MuddConfig, data: TokenData) -> int:
    """Check options against the model and data before anything is written; returns seq_len."""
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_windows"):
        if getattr(tc, name) is not None and getattr(tc, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(tc, name)}")
    if tc.parallel not in PARALLELISMS:
        raise ConfigError(f"--parallel {tc.parallel!r} is unknown; choose none, ddp or fsdp")
    if cfg.moe_experts and cfg.moe_top_k == 1 and cfg.moe_norm_topk:
        raise ConfigError(
            "moe_top_k=1 with moe_norm_topk=true gives every token a gate of exactly 1, so the language-model loss "
            "never trains the router; set moe_norm_topk=false (Switch Transformer's gate) or moe_top_k >= 2"
        )
    seq_len = tc.seq_len or min(256, cfg.block_size)
    if seq_len > cfg.block_size:
        raise ConfigError(
            f"--seq-len {seq_len} exceeds the model's context block_size={cfg.block_size}; "
            f"lower --seq-len or raise block_size (--set block_size={seq_len})"
        )
    if data.vocab_size > cfg.vocab_size:
        raise DataError(
            f"the data was tokenised with a {data.vocab_size}-token vocabulary but the model has vocab_size="
            f"{cfg.vocab_size}; use --set vocab_size={data.vocab_size} or prepare the data with a smaller tokenizer"
        )
    data.split("train", seq_len)
    data.split("val", seq_len)
    return seq_len
