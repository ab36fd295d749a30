"""The trainer, from one CPU to many GPUs under torchrun, in components that can be run on their own.

    trainer = Trainer(tc, recipe, cfg, data, seq_len, info)   # setup: model, optimizer, resume, run folder
    result = trainer.train_step(step, logging)                 # one optimizer step over the micro-batches
    trainer.evaluate()                                         # validation loss on the fixed windows
    trainer.save(step)                                         # a checkpoint (atomic; the newest kept)
    trainer.record(step, result)                               # tokens/s, MFU, memory, telemetry -> RunLog
    trainer.run()                                              # all of them in the loop

`train(tc)` resolves the recipe, sets up the process group and runs the trainer. Re-running the same
config resumes from the newest readable checkpoint in its run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from muddformer._utils import atomic_path, exclusive_folder, write_json_atomic
from muddformer.adapters.folders import load_model, read_folder_raw_config
from muddformer.adapters.transformers_checkpoints import is_transformers_checkpoint, load_transformers_model
from muddformer.config import MuddConfig
from muddformer.data.batches import eval_windows, iter_eval_batches, sample_batch
from muddformer.data.shards import TokenData, bundled_data_dir
from muddformer.data.tokenizers import load_tokenizer
from muddformer.errors import CheckpointError, MuddError
from muddformer.inference.generation import sample_generate
from muddformer.model import MuddModel, copy_body_weights, count_parameters, next_token_loss
from muddformer.telemetry import ExpertTally, SpikeWatch, group_grad_norms
from muddformer.training.checkpointing import list_checkpoints, remove_unfinished, resume_latest, save_checkpoint
from muddformer.training.config import TrainConfig, model_config, training_identity, validate
from muddformer.training.metrics import RunLog, environment, flops_per_token, peak_flops, plot_losses
from muddformer.training.optimizers import build_optimizers
from muddformer.training.parallel import DistInfo, all_reduce_mean, close_distributed, init_distributed, parallelize
from muddformer.training.recipes import Recipe, param_groups
from muddformer.training.schedule import lr_at


class TrainingDiverged(MuddError):
    """The loss became NaN or infinite."""


@dataclass
class StepResult:
    """One optimizer step: the loss (mean over micro-batches and ranks), the gradient norm before clipping,
    the learning rate, and on log steps the per-group gradient norms and dense-weight statistics."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    telemetry: dict = field(default_factory=dict)


def start_from(core: MuddModel, folder: str) -> None:
    """The weights of a model folder; with another connection (or dense options) the body weights only."""
    raw = read_folder_raw_config(folder)
    src = load_transformers_model(folder) if is_transformers_checkpoint(raw) else load_model(folder)
    with torch.no_grad():
        if src.config.architecture() == core.config.architecture():
            core.load_state_dict(src.state_dict())
        else:
            copy_body_weights(src, core)


def train(tc: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics."""
    info = init_distributed(tc.device, tc.parallel)
    try:
        tc, recipe = tc.resolved(info.world)
        cfg = model_config(tc)
        data = TokenData(tc.data) if tc.data else TokenData(shared_bundled_data(info))
        seq_len = validate(tc, cfg, data)
        if cfg.eos_token_id is None and data.eot_id is not None:  # generation stops at the data's end-of-text
            cfg = cfg.replace(eos_token_id=data.eot_id, bos_token_id=data.eot_id)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs use TF32 tensor cores
            torch.backends.cudnn.allow_tf32 = True
        # One process per run folder: a second one would interleave checkpoints and metrics with the first.
        with exclusive_folder(output_folder(tc, cfg), CheckpointError) if info.is_main else nullcontext():
            return Trainer(tc, recipe, cfg, data, seq_len, info).run()
    finally:
        close_distributed()


def output_folder(tc: TrainConfig, cfg: MuddConfig) -> Path:
    return Path(tc.out or f"runs/{tc.preset}-{cfg.connection}")


def shared_bundled_data(info: DistInfo) -> Path:
    """The bundled corpus, prepared once per machine: local rank 0 first, then the others find it ready."""
    first = info.local_rank == 0
    folder = bundled_data_dir() if first else None
    if info.distributed:
        torch.distributed.barrier()
    return folder if first else bundled_data_dir()


class Trainer:
    """One training run: everything it holds is built here (the setup); the methods are its components."""

    def __init__(self, tc: TrainConfig, recipe: Recipe, cfg: MuddConfig, data: TokenData, seq_len: int, info: DistInfo):
        self.tc, self.recipe, self.cfg, self.data, self.seq_len, self.info = tc, recipe, cfg, data, seq_len, info
        self.out = output_folder(tc, cfg)
        self.ckpt_root = self.out / "checkpoints"
        self.say = print if info.is_main else (lambda *a, **k: None)
        torch.manual_seed(tc.seed)
        self.core = MuddModel(cfg).to(info.device)
        if tc.init_from:  # a resumed run's checkpoint overrides these below
            start_from(self.core, tc.init_from)
        self.counts = count_parameters(self.core)
        lowp = tc.dtype == "bfloat16"
        self.model = parallelize(
            self.core,
            info,
            tc.parallel,
            tc.activation_checkpointing,
            tc.compile,
            mixed_precision=torch.bfloat16 if lowp and tc.parallel == "fsdp" else None,
        )
        self.use_autocast = lowp and tc.parallel != "fsdp"  # FSDP casts through its own policy
        fused = {"fused": True} if info.device.type == "cuda" else {}
        self.optimizer = build_optimizers(param_groups(self.core, recipe), tc.lr, fused)
        self.identity = training_identity(tc, recipe, seq_len, info.world, data)
        if info.is_main:  # it holds the run folder's lock (train)
            remove_unfinished(self.ckpt_root)
        resumed = resume_latest(self.ckpt_root, self.model, self.optimizer.optimizers, cfg, self.say, self.identity)
        self.start = resumed.step if resumed else 0
        if resumed:
            self.say(f"resuming from {resumed.folder} (step {self.start})")
            self.say_if_schedule_changed(resumed.state.get("max_steps"))
        run_info = self.write_run_info() if info.is_main else {}
        self.log = RunLog(self.out, self.start, tc.tensorboard, enabled=info.is_main)
        if info.is_main and not resumed:
            self.log.text("run", "```\n" + json.dumps(run_info, indent=2) + "\n```")
        self.train_split = data.split("train", seq_len)
        self.windows = eval_windows(data.split("val", seq_len), seq_len, tc.eval_windows)
        self.tokens_per_step = tc.batch_size * seq_len * tc.grad_accum * info.world
        self.flops_per_token = flops_per_token(cfg, self.counts["total"], seq_len)
        self.peak_flops = peak_flops(info.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.watch = SpikeWatch()

    def say_if_schedule_changed(self, saved_max_steps: int | None) -> None:
        """--max-steps may change on resume; the schedule then spans the new length, so the learning rate jumps
        (up for a longer run): say by how much, from the checkpoint's max_steps (absent in older checkpoints)."""
        if saved_max_steps is None or saved_max_steps == self.tc.max_steps:
            return
        before = lr_at(self.start, dataclasses.replace(self.tc, max_steps=saved_max_steps))
        self.say(
            f"--max-steps {self.tc.max_steps} (the checkpoint's run had {saved_max_steps}): the schedule now spans "
            f"{self.tc.max_steps} steps, so the learning rate at step {self.start} is {lr_at(self.start, self.tc):.3g} "
            f"instead of {before:.3g}"
        )

    def write_run_info(self) -> dict:
        """run.json (everything that decides the run, and the environment) and the model's config.json."""
        self.out.mkdir(parents=True, exist_ok=True)
        run_info = {
            "model_config": self.cfg.to_dict(),
            "train_config": dataclasses.asdict(self.tc),
            "recipe": dataclasses.asdict(self.recipe),
            "seq_len": self.seq_len,
            "data": str(self.data.folder),
            "data_meta": {k: self.data.meta[k] for k in ("vocab_size", "source")},
            "parameters": self.counts,
            "environment": environment(self.info.device, self.info.world),
        }
        write_json_atomic(str(self.out / "config.json"), self.cfg.to_dict())
        write_json_atomic(str(self.out / "run.json"), run_info)
        return run_info

    def autocast(self) -> AbstractContextManager:
        if self.use_autocast:
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- components -----------------------------------------------------------------------------
    def train_step(self, step: int, logging: bool, check: bool = True) -> StepResult:
        """Forward and backward over the micro-batches of `step`, clipping, the optimizer step.

        With `check`, raises TrainingDiverged before the update when the loss or the gradient norm is not
        finite. Reading them waits for the accelerator, so the loop checks only the steps that log,
        evaluate or save: a divergence stops the run there, before any checkpoint holds it."""
        tc, info, core = self.tc, self.info, self.core
        lr = lr_at(step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        loss_sum = torch.zeros((), device=info.device)
        dense_stats: dict = {}
        experts = ExpertTally()
        for micro in range(tc.grad_accum):
            # Dense-weight statistics come from the first micro-batch of a log step.
            core.connection.telemetry = {} if logging and tc.telemetry and micro == 0 else None
            x, y = sample_batch(
                self.train_split,
                self.seq_len,
                tc.batch_size,
                tc.seed,
                step,
                info.rank,
                info.world,
                micro,
                tc.grad_accum,
            )
            last = micro == tc.grad_accum - 1
            if tc.fsdp_defer_grad_sync:  # FSDP2: gradients stay unsharded and accumulate until the last micro-batch
                cast(FSDPModule, self.model).set_requires_gradient_sync(last)
            sync = last or not hasattr(self.model, "no_sync")  # DDP: all-reduce on the last micro-batch only
            with nullcontext() if sync else self.model.no_sync(), self.autocast():
                out = self.model(x.to(info.device))
                loss = next_token_loss(out.logits, y.to(info.device)) / tc.grad_accum
            # Experts add their weighted router losses to what is trained; the logged loss stays the LM loss.
            (loss if out.aux_loss is None else loss + out.aux_loss / tc.grad_accum).backward()
            loss_sum += loss.detach()
            if micro == 0:
                dense_stats = core.connection.telemetry or {}
            if logging and out.aux_loss is not None:
                experts.add(core, out.aux_loss)
        core.connection.telemetry = None
        dense_stats.update(experts.read(lambda t: all_reduce_mean(t, info)))
        group_norms = group_grad_norms(self.optimizer) if logging and tc.telemetry else {}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_mean = all_reduce_mean(loss_sum, info)
        if check and not (torch.isfinite(loss_mean) and torch.isfinite(grad_norm)):
            kept = list_checkpoints(self.ckpt_root)
            where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss became {loss_mean.item()} at step {step + 1} (grad norm {grad_norm.item()}); "
                f"{where}; lower --lr or raise --warmup"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_mean, grad_norm, lr, {**group_norms, **dense_stats})

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the run's fixed windows, each rank scoring its share of them."""
        model, info, batch = self.model, self.info, self.tc.batch_size
        model.eval()
        total = torch.zeros((), device=info.device)
        val = self.data.split("val", self.seq_len)
        share = -(-len(self.windows) // info.world)
        mine = self.windows[info.rank * share : (info.rank + 1) * share]
        real = len(mine)
        # Every rank runs as many forwards (they are collective under FSDP2 and DDP): a short share is filled with
        # repeats whose targets are ignored.
        mine += self.windows[: share - real]
        for i, (x, y) in enumerate(iter_eval_batches(val, self.seq_len, batch, mine)):
            rows = min(x.shape[0], max(0, real - i * batch))
            if rows < x.shape[0]:
                y = y.clone()  # a view of the same windows as x
                y[rows:] = -100
            with self.autocast():
                logits = model(x.to(info.device)).logits
            if rows:
                total += next_token_loss(logits, y.to(info.device)) * rows
        model.train()
        return (all_reduce_mean(total, info) * info.world / len(self.windows)).item()

    def save(self, done: int) -> None:
        """The checkpoint after `done` steps: model, optimizer, RNG and data position."""
        tc = self.tc
        position = {"step": done, "micro_batches_per_step": tc.grad_accum}
        meta = {"seed": tc.seed, "tokens": done * self.tokens_per_step, "data_position": position}
        meta["training"], meta["max_steps"] = self.identity, tc.max_steps
        save_checkpoint(
            self.ckpt_root,
            done,
            self.model,
            self.cfg,
            self.optimizer.optimizers,
            meta,
            self.data.tokenizer_path,
            self.info.is_main,
            tc.keep_checkpoints,
        )

    def record(self, done: int, result: StepResult, seconds: float, tokens: int) -> dict:
        """The metrics of a log step (throughput over the `tokens` of the last `seconds`), logged."""
        tps = tokens / seconds if seconds > 0 else 0.0
        record = {
            "step": done,
            "loss": result.loss.item(),
            "lr": result.lr,
            "grad_norm": result.grad_norm.item(),
            "tokens": done * self.tokens_per_step,
            "tokens_per_s": tps,
        }
        if self.peak_flops:
            record["mfu"] = tps * self.flops_per_token / (self.peak_flops * self.info.world)
        if self.info.device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.info.device) / 1e9
        record.update(result.telemetry)
        self.log.log(record)
        return record

    def sample(self) -> str:
        """Text sampled from the prompt (temperature 0.8, top-k 50, seeded), written to sample.txt."""
        tc, core, data = self.tc, self.core, self.data
        tok = load_tokenizer(data.tokenizer_path)
        ids = tok.encode(tc.sample_prompt).ids or [data.eot_id or 0]
        ids = ids[-(core.config.block_size - 1) :]
        g = torch.Generator().manual_seed(tc.seed)
        core.eval()
        budget = min(tc.sample_tokens, core.config.block_size - len(ids))
        with torch.compiler.set_stance("force_eager"):  # decode shapes change every step: no recompiles
            prompt = torch.tensor([ids], device=self.info.device)
            new = sample_generate(core, prompt, budget, temperature=0.8, top_k=50, generator=g)
        text = tok.decode(new[0].tolist())
        if self.info.is_main:
            with atomic_path(str(self.out / "sample.txt")) as tmp:
                Path(tmp).write_text(text + "\n")
        return text

    def plot(self) -> None:
        if self.info.is_main:
            plot_losses(self.log.records(), self.out / "loss.png", f"{self.tc.preset} ({self.cfg.connection})")

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        tc, info = self.tc, self.info
        last: dict = {}
        bar = tqdm(
            total=tc.max_steps,
            initial=self.start,
            desc="train",
            unit="step",
            disable=not (info.is_main and tc.progress),
            dynamic_ncols=True,
        )
        window_start, window_tokens = time.perf_counter(), 0
        self.model.train()
        for step in range(self.start, tc.max_steps):
            done = step + 1
            logging = done % tc.log_every == 0 or done == tc.max_steps or done == self.start + 1
            evaluating = done % tc.eval_every == 0 or done == tc.max_steps
            saving = done % tc.save_every == 0 or done == tc.max_steps
            try:
                result = self.train_step(step, logging, check=logging or evaluating or saving)
            except TrainingDiverged:
                bar.close()
                raise
            window_tokens += self.tokens_per_step
            bar.update(1)
            if logging:
                record = self.record(done, result, time.perf_counter() - window_start, window_tokens)
                warning = self.watch.check(done, record)
                if warning and info.is_main:
                    bar.write(f"warning: {warning}", file=sys.stderr)
                last.update(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            paused = time.perf_counter()
            if evaluating:
                val = self.evaluate()
                self.log.log({"step": done, "val_loss": val})
                last["val_loss"] = val
                if info.is_main and tc.progress:
                    bar.write(f"step {done}: val_loss {val:.4f}")
                self.plot()
            if saving:
                self.save(done)
            window_start += time.perf_counter() - paused  # evaluation and checkpoints are not training time
        bar.close()
        # Under FSDP every rank takes part in each forward; otherwise rank 0 samples alone.
        if tc.sample_tokens > 0 and self.data.tokenizer_path.is_file() and (info.is_main or tc.parallel == "fsdp"):
            text = self.sample()
            self.log.text("sample", text)
            self.say("--- sample ---\n" + text)
        self.log.close()
        if self.start < tc.max_steps:
            self.plot()
        self.say(f"run folder: {self.out}")
        return last
