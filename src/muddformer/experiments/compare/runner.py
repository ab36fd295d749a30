"""`mudd compare`: several connections trained on the same data, tokens, optimizer and seeds.

    mudd compare --preset tiny --connections residual,mudd,hc --seeds 3 --steps 450 --out runs/compare

Every run is an ordinary `mudd train` run folder, DIR/runs/<connection>/seed<k>/, trained by the
same loop. For a given seed all connections start from the same RNG seed and read the same batches
in the same order; every run sees the same number of tokens. Re-running the command skips the
finished runs and resumes the others from their checkpoints; DIR/compare.json holds the settings
and a different command on the same DIR is refused.

Written into DIR: results.json (every figure), results.md (the table and the command),
loss_vs_step.png and loss_vs_flops.png (mean validation curve per connection, min-max band over
seeds). Statistics are computed here without SciPy: Welch's t-test of each connection's final
validation losses against the baseline's, and the compute multiplier, how many times more steps
the baseline needs to reach a connection's final loss.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from muddformer._utils import exclusive_folder
from muddformer.data.shards import TokenData, bundled_data_dir
from muddformer.errors import InputError, MuddError
from muddformer.experiments.compare.report import collect_results, write_outputs
from muddformer.experiments.compare.runs import final_val_loss, read_records, run_folder, train_config
from muddformer.experiments.compare.settings import (
    CompareConfig,
    check_options,
    check_or_write_settings,
    command_line,
    stored_settings,
)
from muddformer.training.checkpointing import list_checkpoints
from muddformer.training.config import model_config, validate
from muddformer.training.trainer import train

# ---- runs ---------------------------------------------------------------------------------------


def preflight(cc: CompareConfig, data: str) -> None:
    """Every connection's model config against the data, before anything is written."""
    tokens = TokenData(data)
    for connection in cc.connections:
        tc = train_config(cc, connection, cc.seeds[0], data, Path("."), progress=False).resolved()[0]
        validate(tc, model_config(tc), tokens)


def release_memory(device: str, compiled: bool) -> None:
    """Free the previous run's tensors and restart the CUDA peak so each run's peak is its own."""
    if compiled:  # every run compiles a new model: clear the old graphs before the recompile limit is hit
        torch.compiler.reset()
    gc.collect()
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_all(cc: CompareConfig, data: str, out: Path, progress: bool) -> dict[str, int]:
    """Train every (connection, seed) that has not finished; returns how many were trained and skipped."""
    plan = [(connection, seed, False) for seed in cc.seeds for connection in cc.connections]
    if cc.baseline_steps:
        plan += [(cc.baseline, seed, True) for seed in cc.seeds]
    counts = {"trained": 0, "skipped": 0}
    for i, (connection, seed, long) in enumerate(plan, 1):
        steps = cc.baseline_steps if long else cc.steps
        tag = f"[{i}/{len(plan)}] {connection} seed {seed}" + (f" ({steps} steps)" if long else "")
        folder = run_folder(out, connection, seed, steps if long else None)
        done = final_val_loss(read_records(folder), steps)
        if done is not None:
            print(f"{tag}: finished before, skipped (val loss {done:.4f})", flush=True)
            counts["skipped"] += 1
            continue
        kept = list_checkpoints(folder / "checkpoints")
        print(f"{tag}: " + (f"resuming from step {kept[-1][0]}" if kept else "started"), flush=True)
        release_memory(cc.device, cc.compile)
        start = time.perf_counter()
        try:
            train(train_config(cc, connection, seed, data, out, progress, long))
        except MuddError as e:
            raise type(e)(f"{connection} seed {seed} ({folder}): {e}") from None
        val = final_val_loss(read_records(folder), steps)
        print(f"{tag}: finished in {time.perf_counter() - start:.1f} s, val loss {val:.4f}", flush=True)
        counts["trained"] += 1
    return counts


# ---- report -------------------------------------------------------------------------------------


def run_compare(cc: CompareConfig, out: Path, progress: bool = True) -> dict:
    """Check, train what is missing, and write the results; returns the results dict."""
    cc = cc.resolved()
    check_options(cc)
    data = cc.data or str(bundled_data_dir())
    preflight(cc, data)
    with exclusive_folder(out, InputError):  # two compares of one folder would train the same runs twice
        check_or_write_settings(out, cc)
        counts = run_all(cc, data, out, progress)
        results = collect_results(cc, data, out)
        results["runs"] = counts
        write_outputs(results, out)
    return results


def report_compare(out: Path) -> dict:
    """The results of a compare folder from its small files alone; refuses while a run is unfinished."""
    cc = stored_settings(out)
    runs = [(c, seed, None) for seed in cc.seeds for c in cc.connections]
    runs += [(cc.baseline, seed, cc.baseline_steps) for seed in cc.seeds if cc.baseline_steps]
    missing = [
        str(run_folder(out, c, seed, steps))
        for c, seed, steps in runs
        if final_val_loss(read_records(run_folder(out, c, seed, steps)), steps or cc.steps) is None
    ]
    if missing:
        raise InputError(
            f"{len(missing)} runs of {out} have not finished ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); run `{command_line(cc, out)}` to finish them"
        )
    results = collect_results(cc, cc.data or str(bundled_data_dir()), out)
    results["runs"] = {"trained": 0, "skipped": len(runs)}
    write_outputs(results, out)
    return results
