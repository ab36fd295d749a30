"""`mudd train`: the training loop, from one CPU to many GPUs under torchrun.

    mudd train --preset tiny --max-steps 30                      # bundled corpus, CPU
    torchrun --nproc_per_node=8 -m muddformer.train --preset muddformer-405m --data DIR --parallel fsdp

How it trains comes from a recipe (recipes.py): the preset's default, or --recipe NAME, with any of
its fields overridden by a flag. Re-running the same command resumes from the newest readable
checkpoint in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoints import atomic_path, write_json_atomic
from .config import CONNECTIONS, MuddConfig
from .data import DataError, TokenData, bundled_data_dir, eval_windows, iter_eval_batches, load_tokenizer, sample_batch
from .errors import ConfigError, MuddError
from .model import MuddModel, count_parameters, next_token_loss
from .parallel import DistInfo, all_reduce_mean, close_distributed, init_distributed, parallelize
from .plotting import pyplot, save_png
from .presets import PRESET_RECIPES
from .recipes import OVERRIDABLE, PRECISIONS, SCHEDULES, Recipe, get_recipe, gradient_accumulation, param_groups
from .run_checkpoints import list_checkpoints, resume_latest, save_checkpoint
from .telemetry import SpikeWatch, group_grad_norms

# Dense bf16 tensor-core peak per GPU: MFU is reported against it (also for float32 runs).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


class TrainingDiverged(MuddError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Every option of a training run (the `mudd train` flags)."""

    preset: str = "tiny"
    config: str | None = None
    set: list[str] = field(default_factory=list)
    connection: str | None = None
    data: str | None = None
    out: str | None = None
    max_steps: int = 450
    grad_accum: int | None = None  # None: from the recipe's global batch (1 without one)
    # How it trains: the recipe (default: the preset's) and overrides of its fields (None: the recipe's).
    recipe: str | None = None
    batch_size: int | None = None
    global_batch: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    warmup: float | None = None
    schedule: str | None = None
    min_lr_ratio: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    dtype: str | None = None
    generator_lr_mult: float | None = None
    generator_beta1: float | None = None
    generator_beta2: float | None = None
    generator_weight_decay: float | None = None
    prior_lr_mult: float | None = None
    eval_every: int = 50
    eval_windows: int = 64
    save_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "none"
    device: str = "auto"
    sample_tokens: int = 200
    sample_prompt: str = "ROMEO:\n"
    tensorboard: bool = True
    progress: bool = True
    telemetry: bool = True  # dense-weight statistics and per-group gradient norms at each log step

    def resolved(self) -> tuple["TrainConfig", Recipe]:
        """The recipe with this config's overrides, and this config with every recipe field filled in."""
        base = get_recipe(self.recipe or PRESET_RECIPES.get(self.preset, "cpu"))
        recipe = base.replace(**{k: getattr(self, k) for k in OVERRIDABLE if getattr(self, k) is not None})
        return dataclasses.replace(self, recipe=recipe.name, **{k: getattr(recipe, k) for k in OVERRIDABLE}), recipe


# ---- configuration ------------------------------------------------------------------------------
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


def parse_set(items: list[str]) -> dict:
    """`key=value` overrides; values are read as JSON where they parse (numbers, true/false), else strings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def model_config(tc: TrainConfig) -> MuddConfig:
    overrides = read_overrides(tc.config) if tc.config else {}
    overrides.update(parse_set(tc.set))
    if tc.connection:
        overrides["connection"] = tc.connection
    return MuddConfig.from_preset(tc.preset, **overrides)


def validate(tc: TrainConfig, cfg: MuddConfig, data: TokenData) -> int:
    """Check options against the model and data before anything is written; returns seq_len."""
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_windows"):
        if getattr(tc, name) is not None and getattr(tc, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(tc, name)}")
    if tc.parallel not in ("none", "ddp", "fsdp"):
        raise ConfigError(f"--parallel {tc.parallel!r} is unknown; choose none, ddp or fsdp")
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


# ---- optimisation -------------------------------------------------------------------------------
def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up over warmup*max_steps steps, then the schedule from the peak to min_lr_ratio*peak
    (cosine or linear), or the peak (constant). `tc` is resolved (TrainConfig.resolved)."""
    peak = tc.lr
    warmup = max(1, round(tc.warmup * tc.max_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, tc.max_steps - warmup))
    if tc.schedule == "constant":
        return peak
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.schedule == "cosine" else 1 - progress
    return peak * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * shape)


def flops_per_token(cfg: MuddConfig, params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters plus attention (PaLM appendix B)."""
    return 6 * (params - cfg.vocab_size * cfg.dim) + 12 * cfg.n_layer * cfg.dim * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---- logging ------------------------------------------------------------------------------------
class RunLog:
    """metrics.jsonl, TensorBoard events and the loss-curve PNG of a run folder (rank 0 only)."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool, enabled: bool):
        self.out, self.enabled = out, enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self._truncate_after(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step or None)
            except ImportError:
                print("tensorboard is not installed: TensorBoard events are skipped", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        # A resumed run rewrites history after its checkpoint, so drop records from the lost steps.
        if not self.path.exists():
            return
        keep = [
            line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
        ]
        with atomic_path(str(self.path)) as tmp:
            Path(tmp).write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def text(self, tag: str, text: str) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], path: Path, title: str) -> None:
    """Training and validation loss against step, as a PNG (written atomically)."""
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def environment(device: torch.device, world: int = 1) -> dict:
    """Versions and hardware, recorded with every run and benchmark."""
    env = {
        "muddformer": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ---- the loop -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: TokenData, seq_len: int, batch_size: int, windows: list[int], info: DistInfo, autocast
) -> float:
    model.eval()
    total = torch.zeros((), device=info.device)
    for x, y in iter_eval_batches(data.split("val", seq_len), seq_len, batch_size, windows):
        with autocast():
            logits = model(x.to(info.device)).logits
        total += next_token_loss(logits, y.to(info.device)) * x.shape[0]
    model.train()
    return (total / len(windows)).item()


def train(tc: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics."""
    tc, recipe = tc.resolved()
    cfg = model_config(tc)
    info = init_distributed(tc.device)
    try:
        if tc.grad_accum is None:
            tc = dataclasses.replace(tc, grad_accum=gradient_accumulation(recipe, info.world))
        data = TokenData(tc.data) if tc.data else TokenData(shared_bundled_data(info))
        seq_len = validate(tc, cfg, data)
        if cfg.eos_token_id is None and data.eot_id is not None:  # generation stops at the data's end-of-text
            cfg = cfg.replace(eos_token_id=data.eot_id, bos_token_id=data.eot_id)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs use TF32 tensor cores
            torch.backends.cudnn.allow_tf32 = True
        return _train(tc, recipe, cfg, data, seq_len, info)
    finally:
        close_distributed()


def shared_bundled_data(info: DistInfo) -> Path:
    """The bundled corpus, prepared once per machine: local rank 0 first, then the others find it ready."""
    first = info.local_rank == 0
    folder = bundled_data_dir() if first else None
    if info.distributed:
        torch.distributed.barrier()
    return folder if first else bundled_data_dir()


def _train(tc: TrainConfig, recipe: Recipe, cfg: MuddConfig, data: TokenData, seq_len: int, info: DistInfo) -> dict:
    out = Path(tc.out or f"runs/{tc.preset}-{cfg.connection}")
    ckpt_root = out / "checkpoints"
    say = print if info.is_main else (lambda *a, **k: None)
    torch.manual_seed(tc.seed)
    core = MuddModel(cfg).to(info.device)
    counts = count_parameters(core)
    lowp = tc.dtype == "bfloat16"
    model = parallelize(
        core,
        info,
        tc.parallel,
        tc.activation_checkpointing,
        tc.compile,
        mixed_precision=torch.bfloat16 if lowp and tc.parallel == "fsdp" else None,
    )
    use_autocast = lowp and tc.parallel != "fsdp"

    def autocast():
        return torch.autocast(info.device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()

    fused = {"fused": True} if info.device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(param_groups(core, recipe), lr=tc.lr, eps=tc.eps, **fused)
    resumed = resume_latest(ckpt_root, model, optimizer, cfg, report=say)
    start = resumed.step if resumed else 0
    if resumed:
        say(f"resuming from {resumed.folder} (step {start})")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run_info = {
            "model_config": cfg.to_dict(),
            "train_config": dataclasses.asdict(tc),
            "recipe": dataclasses.asdict(recipe),
            "seq_len": seq_len,
            "data": str(data.folder),
            "data_meta": {k: data.meta[k] for k in ("vocab_size", "source")},
            "parameters": counts,
            "environment": environment(info.device, info.world),
        }
        write_json_atomic(str(out / "config.json"), cfg.to_dict())
        write_json_atomic(str(out / "run.json"), run_info)
    log = RunLog(out, start, tc.tensorboard, enabled=info.is_main)
    if info.is_main and not resumed:
        log.text("run", "```\n" + json.dumps(run_info, indent=2) + "\n```")

    train_split = data.split("train", seq_len)
    windows = eval_windows(data.split("val", seq_len), seq_len, tc.eval_windows)
    tokens_per_step = tc.batch_size * seq_len * tc.grad_accum * info.world
    fpt = flops_per_token(cfg, counts["total"], seq_len)
    peak = peak_flops(info.device)
    params = [p for p in model.parameters() if p.requires_grad]
    last: dict = {}

    from tqdm import tqdm

    bar = tqdm(
        total=tc.max_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not (info.is_main and tc.progress),
        dynamic_ncols=True,
    )
    window_start, window_tokens = time.perf_counter(), 0
    watch = SpikeWatch()
    model.train()
    for step in range(start, tc.max_steps):
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        done = step + 1
        logging = done % tc.log_every == 0 or done == tc.max_steps or done == start + 1
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(tc.grad_accum):
            # Dense-weight statistics come from the first micro-batch of a log step.
            core.connection.telemetry = {} if logging and tc.telemetry and micro == 0 else None
            x, y = sample_batch(
                train_split, seq_len, tc.batch_size, tc.seed, step, info.rank, info.world, micro, tc.grad_accum
            )
            sync = micro == tc.grad_accum - 1 or not hasattr(model, "no_sync")
            with nullcontext() if sync else model.no_sync(), autocast():
                loss = next_token_loss(model(x.to(info.device)).logits, y.to(info.device)) / tc.grad_accum
            loss.backward()
            loss_sum += loss.detach()
            if micro == 0:
                dense_stats = core.connection.telemetry or {}
        core.connection.telemetry = None
        group_norms = group_grad_norms(optimizer) if logging and tc.telemetry else {}
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_mean = all_reduce_mean(loss_sum, info)
        if not (torch.isfinite(loss_mean) and torch.isfinite(grad_norm)):
            bar.close()
            kept = list_checkpoints(ckpt_root)
            where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss became {loss_mean.item()} at step {step + 1} (grad norm {grad_norm.item()}); "
                f"{where}; lower --lr or raise --warmup"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        bar.update(1)
        if logging:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed if elapsed > 0 else 0.0
            record = {
                "step": done,
                "loss": loss_mean.item(),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens": done * tokens_per_step,
                "tokens_per_s": tps,
            }
            if peak:
                record["mfu"] = tps * fpt / (peak * info.world)
            if info.device.type == "cuda":
                record["max_memory_gb"] = torch.cuda.max_memory_allocated(info.device) / 1e9
            record.update(group_norms)
            record.update(dense_stats)
            warning = watch.check(done, record)
            if warning and info.is_main:
                bar.write(f"warning: {warning}", file=sys.stderr)
            log.log(record)
            last.update(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if done % tc.eval_every == 0 or done == tc.max_steps:
            val = evaluate(model, data, seq_len, tc.batch_size, windows, info, autocast)
            log.log({"step": done, "val_loss": val})
            last["val_loss"] = val
            if info.is_main and tc.progress:
                bar.write(f"step {done}: val_loss {val:.4f}")
            if info.is_main:
                plot_losses(log.records(), out / "loss.png", f"{tc.preset} ({cfg.connection})")
        if done % tc.save_every == 0 or done == tc.max_steps:
            save_checkpoint(
                ckpt_root,
                done,
                model,
                cfg,
                optimizer,
                {
                    "seed": tc.seed,
                    "tokens": done * tokens_per_step,
                    "data_position": {"step": done, "micro_batches_per_step": tc.grad_accum},
                },
                data.tokenizer_path,
                info.is_main,
                tc.keep_checkpoints,
            )
            window_start = time.perf_counter()  # do not count checkpoint time as training time
    bar.close()
    # Under FSDP every rank takes part in each forward; otherwise rank 0 samples alone.
    if tc.sample_tokens > 0 and data.tokenizer_path.is_file() and (info.is_main or tc.parallel == "fsdp"):
        sample = write_sample(core, data, tc, out if info.is_main else None, info)
        log.text("sample", sample)
        say("--- sample ---\n" + sample)
    log.close()
    if info.is_main and start < tc.max_steps:
        plot_losses(log.records(), out / "loss.png", f"{tc.preset} ({cfg.connection})")
    say(f"run folder: {out}")
    return last


def write_sample(core: MuddModel, data: TokenData, tc: TrainConfig, out: Path | None, info: DistInfo) -> str:
    """Sample text from the prompt (temperature 0.8, top-k 50, seeded) and write sample.txt into `out`."""
    from .generation import sample_generate

    tok = load_tokenizer(data.tokenizer_path)
    ids = tok.encode(tc.sample_prompt).ids or [data.eot_id or 0]
    ids = ids[-(core.config.block_size - 1) :]
    g = torch.Generator().manual_seed(tc.seed)
    core.eval()
    budget = min(tc.sample_tokens, core.config.block_size - len(ids))
    with torch.compiler.set_stance("force_eager"):  # decode shapes change every step: no recompiles
        new = sample_generate(
            core, torch.tensor([ids], device=info.device), budget, temperature=0.8, top_k=50, generator=g
        )
    text = tok.decode(new[0].tolist())
    if out is not None:
        with atomic_path(str(out / "sample.txt")) as tmp:
            Path(tmp).write_text(text + "\n")
    return text


# ---- command line -------------------------------------------------------------------------------
def add_recipe_arguments(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--recipe and one override flag per Recipe field (default None: the recipe's value). `mudd compare`
    shares them, less the fields in `skip` that it declares itself."""
    group = p.add_argument_group(
        "recipe",
        "how the run trains: a named recipe (`mudd recipes`; default: the preset's) and overrides of its fields",
    )

    def add(flag: str, **kw) -> None:
        if flag[2:].replace("-", "_") not in skip:
            group.add_argument(flag, **kw)

    add("--recipe", help="training recipe (default: the preset's, e.g. cpu, paper-405m)")
    add("--batch-size", type=int, help="sequences per rank per micro-batch")
    add("--global-batch", type=int, help="sequences per optimizer step over all ranks (sets --grad-accum)")
    add("--seq-len", type=int, help="tokens per sequence (recipe default: min(256, block_size))")
    add("--lr", type=float, help="peak learning rate")
    add("--warmup", type=float, help="linear warm-up as a share of --max-steps")
    add("--schedule", choices=SCHEDULES, help="decay after warm-up")
    add("--min-lr-ratio", type=float, help="final learning rate / peak")
    add("--beta1", type=float)
    add("--beta2", type=float)
    add("--eps", type=float, help="AdamW epsilon")
    add("--weight-decay", type=float, help="on matrices (norms, biases and static priors never)")
    add("--grad-clip", type=float, help="global gradient-norm clip (0: off)")
    add("--dtype", choices=PRECISIONS, help="compute dtype (bfloat16: autocast / FSDP mixed precision)")
    add(
        "--generator-lr-mult",
        type=float,
        help="learning-rate multiplier of the connection's own parameters (MUDD's weight generators, ...)",
    )
    add("--generator-beta1", type=float, help="their AdamW beta1 (default: --beta1)")
    add("--generator-beta2", type=float, help="their AdamW beta2 (default: --beta2)")
    add("--generator-weight-decay", type=float, help="their weight decay on matrices (default: --weight-decay)")
    add("--prior-lr-mult", type=float, help="learning-rate multiplier of the static priors (MUDD's dense_bs, ...)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--preset", default=d.preset, help="model preset (see `mudd presets`; default tiny)")
    p.add_argument("--config", help="YAML or JSON file of MuddConfig fields overriding the preset")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override one MuddConfig field (repeatable)"
    )
    p.add_argument("--connection", choices=CONNECTIONS, help="override the preset's connection")
    p.add_argument("--data", help="prepared data folder (`mudd prepare`); default: the bundled Shakespeare corpus")
    p.add_argument("--out", help="run folder (default runs/PRESET-CONNECTION); re-running resumes from it")
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument(
        "--grad-accum",
        type=int,
        help="micro-batches per optimizer step (default: those that make the recipe's --global-batch, else 1)",
    )
    add_recipe_arguments(p)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="validation sequences per evaluation")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument(
        "--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest checkpoints kept (default 3)"
    )
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument(
        "--parallel", choices=["none", "ddp", "fsdp"], default=d.parallel, help="data parallelism under torchrun"
    )
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument(
        "--sample-tokens", type=int, default=d.sample_tokens, help="tokens of text sampled at the end (0: none)"
    )
    p.add_argument("--sample-prompt", default=d.sample_prompt)
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--no-telemetry",
        dest="telemetry",
        action="store_false",
        help="log no dense-weight statistics or per-group gradient norms",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m muddformer.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cmd_train(args)
    except MuddError as e:
        print(f"mudd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
