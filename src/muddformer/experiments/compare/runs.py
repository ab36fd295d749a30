"""One run of a compare: its folder, its TrainConfig, its logged records."""

from __future__ import annotations

from pathlib import Path

from muddformer.experiments.compare.settings import CompareConfig
from muddformer.training.config import TrainConfig
from muddformer.training.metrics import RunLog


def run_folder(out: Path, connection: str, seed: int, steps: int | None = None) -> Path:
    """DIR/runs/<connection>/seed<k>, or .../seed<k>-steps<N> for a longer baseline run."""
    return out / "runs" / connection / (f"seed{seed}" if steps is None else f"seed{seed}-steps{steps}")


def train_config(
    cc: CompareConfig, connection: str, seed: int, data: str, out: Path, progress: bool, long: bool = False
):
    """The TrainConfig of one run. Logging, evaluation and checkpoints share one period so that every
    throughput window starts after the previous evaluation and checkpoint (neither is timed)."""

    return TrainConfig(
        preset=cc.preset,
        init_from=cc.init_from,
        set=list(cc.set),
        connection=connection,
        data=data,
        out=str(run_folder(out, connection, seed, cc.baseline_steps if long else None)),
        max_steps=cc.baseline_steps if long else cc.steps,
        batch_size=cc.batch_size,
        seq_len=cc.seq_len,
        lr=cc.lr_for.get(connection, cc.lr),
        recipe=cc.recipe,
        **cc.recipe_overrides,
        eval_every=cc.eval_every,
        eval_windows=cc.eval_windows,
        save_every=cc.eval_every,
        log_every=cc.eval_every,
        keep_checkpoints=2,
        seed=seed,
        compile=cc.compile,
        dtype=cc.dtype,
        device=cc.device,
        sample_tokens=0,
        tensorboard=False,
        progress=progress,
    )


def read_records(folder: Path) -> list[dict]:
    return RunLog(folder, 0, tensorboard=False, enabled=False).records()


def final_val_loss(records: list[dict], steps: int) -> float | None:
    """The validation loss at `steps`, or None while the run has not got there."""
    return next((r["val_loss"] for r in records if r["step"] == steps and "val_loss" in r), None)
