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

import argparse
import gc
import json
import math
import shlex
import statistics
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoints import atomic_path, write_json_atomic
from .config import CONNECTIONS
from .errors import InputError
from .plotting import pyplot, save_png
from .recipes import OVERRIDABLE
from .train import add_recipe_arguments

DEFAULT_CONNECTIONS = ("residual", "denseformer", "ddformer", "mudd", "hc", "mhc", "attnres")
SETTINGS_NAME = "compare.json"
COMPARE_OWN = ("batch_size", "seq_len", "lr", "dtype")  # recipe fields compare declares itself
EXTENSIBLE = ("baseline_steps",)  # settings a later command may change: they add runs, never alter finished ones
FORMAT = "mudd-compare"
FORMAT_VERSION = 1


# ---- statistics ---------------------------------------------------------------------------------
def _beta_continued_fraction(a: float, b: float, x: float, eps: float = 1e-15, max_terms: int = 10_000) -> float:
    """The continued fraction 1/(1+ d1/(1+ d2/(1+ ...))) of the incomplete beta function, by Lentz's method.

    d(2m+1) = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)),  d(2m) = m(b-m)x / ((a+2m-1)(a+2m)).
    """
    tiny = 1e-300
    f, c, d = tiny, tiny, 0.0
    for j in range(1, max_terms + 1):
        n = j - 1  # index of the partial numerator d_n; the first numerator is 1
        if n == 0:
            num = 1.0
        elif n % 2:
            m = (n - 1) // 2
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            m = n // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return f


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # The fraction converges quickly below the mean (a+1)/(a+b+2); above it use I_x(a,b) = 1 - I_(1-x)(b,a).
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / a * _beta_continued_fraction(a, b, x)


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_(df/(df+t^2))(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return min(1.0, regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t)))


def welch_t_test(a: list[float], b: list[float]) -> dict:
    """Welch's unequal-variance t-test of mean(a) - mean(b): t, Welch-Satterthwaite df, two-sided p.

    With fewer than 2 values in either sample the variances are unknown: t, df and p are None.
    With zero variance in both samples t is +-inf and p is 0 when the means differ, t = 0 and p = 1
    when they are equal (df is None in both cases).
    """
    if len(a) < 2 or len(b) < 2:
        return {"t": None, "df": None, "p": None}
    diff = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        return {"t": math.copysign(math.inf, diff) if diff else 0.0, "df": None, "p": 0.0 if diff else 1.0}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return {"t": t, "df": df, "p": student_t_two_sided_p(t, df)}


def cohen_d(a: list[float], b: list[float]) -> float | None:
    """Effect size of mean(a) - mean(b) in units of the pooled standard deviation (None below 2 values each,
    or with no spread at all)."""
    if len(a) < 2 or len(b) < 2:
        return None
    pooled = ((len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)) / (len(a) + len(b) - 2)
    return (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(pooled) if pooled > 0 else None


def difference_test(a: list[float], b: list[float]) -> dict:
    """Welch's test and Cohen's d of mean(a) - mean(b): {t, df, p, d}."""
    return {**welch_t_test(a, b), "d": cohen_d(a, b)}


def compute_multiplier(
    base_steps: list[float], base_losses: list[float], method_final_loss: float, method_steps: float
) -> dict:
    """How many times more steps the baseline needs to reach a method's final loss.

    The baseline's curve is made monotone (running minimum) and interpolated linearly in step
    between its evaluations; s* is the first step where it reaches `method_final_loss`, and the
    multiplier is s* / method_steps. Returns a dict with `multiplier`, `step` (s*),
    `lower_bound` and `upper_bound`:
    - the baseline never gets there: multiplier None, lower_bound = last baseline step / method_steps;
    - the method's loss is above the baseline's first evaluation (reached before the curve starts):
      multiplier None, upper_bound = first baseline step / method_steps.
    """
    result = {"multiplier": None, "step": None, "lower_bound": None, "upper_bound": None}
    if not base_steps or len(base_steps) != len(base_losses) or method_steps <= 0:
        raise ValueError("compute_multiplier needs a non-empty baseline curve and method_steps > 0")
    best = list(base_losses)
    for i in range(1, len(best)):
        best[i] = min(best[i], best[i - 1])
    if method_final_loss > best[0]:
        result["upper_bound"] = base_steps[0] / method_steps
        return result
    for i, loss in enumerate(best):
        if loss <= method_final_loss:
            if i == 0:
                step = float(base_steps[0])
            else:  # best[i-1] > method_final_loss >= best[i], so the segment falls strictly
                frac = (best[i - 1] - method_final_loss) / (best[i - 1] - best[i])
                step = base_steps[i - 1] + frac * (base_steps[i] - base_steps[i - 1])
            result.update(multiplier=step / method_steps, step=step)
            return result
    result["lower_bound"] = base_steps[-1] / method_steps
    return result


# ---- settings -----------------------------------------------------------------------------------
@dataclass
class CompareConfig:
    """Every option that decides what the runs compute (stored in DIR/compare.json)."""

    preset: str = "tiny"
    connections: list[str] = field(default_factory=lambda: list(DEFAULT_CONNECTIONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 450
    data: str | None = None
    batch_size: int = 8
    seq_len: int | None = None
    lr: float | None = None
    lr_for: dict[str, float] = field(default_factory=dict)  # per-connection peak LR (each at its own best)
    recipe: str | None = None  # None: the preset's
    recipe_overrides: dict = field(default_factory=dict)  # other Recipe fields, e.g. {"generator_lr_mult": 0.25}
    eval_every: int | None = None  # None: max(1, steps // 10)
    eval_windows: int = 64
    set: list[str] = field(default_factory=list)
    device: str = "auto"
    compile: bool = False
    dtype: str = "float32"
    baseline: str = "residual"
    # Longer baseline runs (same seeds) whose curve the compute multiplier reads: a connection that
    # beats the baseline's equal-steps run can then be placed on a curve that reaches its loss.
    baseline_steps: int | None = None

    def resolved(self) -> CompareConfig:
        """A copy with eval_every filled in."""
        every = max(1, self.steps // 10) if self.eval_every is None else self.eval_every
        return CompareConfig(**{**asdict(self), "eval_every": every})


def parse_list(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise InputError(f"{option} is empty; give a comma-separated list")
    return list(dict.fromkeys(items))  # drop repeats, keep the order


def parse_seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in parse_list(text, "--seed-list")]
    except ValueError:
        raise InputError(f"--seed-list {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise InputError(f"--seed-list {text!r} holds a negative seed")
    return seeds


def parse_lr_for(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--lr-for {item!r} must look like CONNECTION=LR, e.g. mudd=1e-3") from None
        if not out[name.strip()] > 0:
            raise InputError(f"--lr-for {item!r}: the learning rate must be positive")
    return out


def check_options(cc: CompareConfig) -> None:
    """The options compare itself owns; the training options are checked by train's own validation."""
    for name in cc.connections:
        if name not in CONNECTIONS:
            raise InputError(f"unknown connection {name!r} in --connections; choose from {', '.join(CONNECTIONS)}")
    for name in cc.lr_for:
        if name not in cc.connections:
            raise InputError(f"--lr-for names {name!r}, which is not among --connections {','.join(cc.connections)}")
    if cc.baseline not in cc.connections:
        raise InputError(f"--baseline {cc.baseline!r} is not among --connections {','.join(cc.connections)}; add it")
    if not cc.seeds:
        raise InputError("--seeds must be at least 1")
    if cc.steps <= 0:
        raise InputError(f"--steps must be positive, got {cc.steps}")
    if cc.baseline_steps is not None and cc.baseline_steps <= cc.steps:
        raise InputError(
            f"--baseline-steps {cc.baseline_steps} must exceed --steps {cc.steps} (it extends the "
            "baseline's curve for the compute multiplier)"
        )


def settings_record(cc: CompareConfig) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "settings": asdict(cc)}


def read_settings(path: Path, fix: str) -> dict:
    """The settings stored in a compare.json, a setting added since then at its default; `fix` ends the error."""
    try:
        stored = json.loads(path.read_text())["settings"]
        return {**asdict(CompareConfig()), **stored}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path} is unreadable ({e}); {fix}") from None


def check_or_write_settings(out: Path, cc: CompareConfig) -> None:
    """Write DIR/compare.json for a new compare; refuse a DIR that holds another compare or anything else."""
    path = out / SETTINGS_NAME
    if path.is_file():
        stored = read_settings(path, "remove it or use another --out")
        current = asdict(cc)
        diffs = [
            f"{k} {current.get(k)!r} here, {stored.get(k)!r} there"
            for k in sorted(set(current) | set(stored))
            if current.get(k) != stored.get(k) and k not in EXTENSIBLE
        ]
        if diffs:
            raise InputError(
                f"{out} holds a compare with different settings ({'; '.join(diffs)}); "
                "use another --out or the same options"
            )
        if any(current.get(k) != stored.get(k) for k in EXTENSIBLE):  # only adds runs: record the new value
            write_json_atomic(str(path), settings_record(cc))
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and holds no {SETTINGS_NAME}; use a new or empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(path), settings_record(cc))


def command_line(cc: CompareConfig, out: Path) -> str:
    """The command that reproduces (or resumes) this compare."""
    args = ["mudd", "compare", "--preset", cc.preset, "--connections", ",".join(cc.connections)]
    if cc.seeds == list(range(len(cc.seeds))):
        args += ["--seeds", str(len(cc.seeds))]
    else:
        args += ["--seed-list", ",".join(map(str, cc.seeds))]
    args += ["--steps", str(cc.steps), "--out", str(out)]
    if cc.data:
        args += ["--data", cc.data]
    args += ["--batch-size", str(cc.batch_size)]
    if cc.seq_len:
        args += ["--seq-len", str(cc.seq_len)]
    if cc.lr is not None:
        args += ["--lr", repr(cc.lr)]
    for name, lr in cc.lr_for.items():
        args += ["--lr-for", f"{name}={lr!r}"]
    if cc.recipe:
        args += ["--recipe", cc.recipe]
    for name, value in cc.recipe_overrides.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    args += ["--eval-every", str(cc.eval_every), "--eval-windows", str(cc.eval_windows)]
    for item in cc.set:
        args += ["--set", item]
    args += ["--device", cc.device, "--dtype", cc.dtype, "--baseline", cc.baseline]
    if cc.baseline_steps:
        args += ["--baseline-steps", str(cc.baseline_steps)]
    if cc.compile:
        args.append("--compile")
    return shlex.join(args)


# ---- runs ---------------------------------------------------------------------------------------
def run_folder(out: Path, connection: str, seed: int, steps: int | None = None) -> Path:
    """DIR/runs/<connection>/seed<k>, or .../seed<k>-steps<N> for a longer baseline run."""
    return out / "runs" / connection / (f"seed{seed}" if steps is None else f"seed{seed}-steps{steps}")


def train_config(
    cc: CompareConfig, connection: str, seed: int, data: str, out: Path, progress: bool, long: bool = False
):
    """The TrainConfig of one run. Logging, evaluation and checkpoints share one period so that every
    throughput window starts after the previous evaluation and checkpoint (neither is timed)."""
    from .train import TrainConfig

    return TrainConfig(
        preset=cc.preset,
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
    from .train import RunLog

    return RunLog(folder, 0, tensorboard=False, enabled=False).records()


def final_val_loss(records: list[dict], steps: int) -> float | None:
    """The validation loss at `steps`, or None while the run has not got there."""
    return next((r["val_loss"] for r in records if r["step"] == steps and "val_loss" in r), None)


def preflight(cc: CompareConfig, data: str) -> None:
    """Every connection's model config against the data, before anything is written."""
    from .data import TokenData
    from .train import model_config, validate

    tokens = TokenData(data)
    for connection in cc.connections:
        tc = train_config(cc, connection, cc.seeds[0], data, Path("."), progress=False).resolved()[0]
        validate(tc, model_config(tc), tokens)


def release_memory(device: str, compiled: bool) -> None:
    """Free the previous run's tensors and restart the CUDA peak so each run's peak is its own."""
    import torch

    if compiled:  # every run compiles a new model: clear the old graphs before the recompile limit is hit
        torch.compiler.reset()
    gc.collect()
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_all(cc: CompareConfig, data: str, out: Path, progress: bool) -> dict[str, int]:
    """Train every (connection, seed) that has not finished; returns how many were trained and skipped."""
    from .errors import MuddError
    from .run_checkpoints import list_checkpoints
    from .train import train

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


# ---- results ------------------------------------------------------------------------------------
def tokens_per_second(records: list[dict]) -> float | None:
    """Training throughput of one run: logged tokens over logged time, without the first step (warm-up)."""
    logs = sorted((r for r in records if "tokens_per_s" in r), key=lambda r: r["step"])
    tokens = seconds = 0.0
    for prev, rec in zip(logs, logs[1:]):
        delta = rec["tokens"] - prev["tokens"]
        if rec["tokens_per_s"] > 0:
            tokens, seconds = tokens + delta, seconds + delta / rec["tokens_per_s"]
    if seconds > 0:
        return tokens / seconds
    return logs[0]["tokens_per_s"] if logs else None


def activation_bytes(cc: CompareConfig, connection: str, data: str, seq_len: int) -> int:
    """Bytes of activations saved for backward by one training batch (CPU, the run's dtype)."""
    import torch

    from .bench import saved_activation_bytes
    from .data import TokenData, sample_batch
    from .model import MuddModel, next_token_loss
    from .train import model_config

    cfg = model_config(train_config(cc, connection, 0, data, Path("."), progress=False))
    torch.manual_seed(0)
    model = MuddModel(cfg)
    x, y = sample_batch(TokenData(data).split("train", seq_len), seq_len, cc.batch_size, seed=0, step=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def loss() -> torch.Tensor:
        low = torch.autocast("cpu", dtype=torch.bfloat16) if cc.dtype == "bfloat16" else nullcontext()
        with low:
            logits = model(x).logits
        return next_token_loss(logits, y)

    return saved_activation_bytes(loss, params)


def val_curve(runs: list[list[dict]]) -> dict:
    """Mean, min and max validation loss over seeds at the evaluation steps all runs share."""
    per_run = [{r["step"]: r["val_loss"] for r in records if "val_loss" in r} for records in runs]
    steps = sorted(set.intersection(*(set(v) for v in per_run)))
    values = [[v[s] for v in per_run] for s in steps]
    return {
        "step": steps,
        "mean": [statistics.fmean(v) for v in values],
        "min": [min(v) for v in values],
        "max": [max(v) for v in values],
    }


def connection_results(cc: CompareConfig, connection: str, data: str, out: Path) -> dict:
    """One connection's figures from its run folders: losses over seeds, curve, speed, memory, size."""
    from .train import flops_per_token, model_config

    runs = [read_records(run_folder(out, connection, seed)) for seed in cc.seeds]
    first = json.loads((run_folder(out, connection, cc.seeds[0]) / "run.json").read_text())
    finals = [final_val_loss(records, cc.steps) for records in runs]
    params, seq_len = first["parameters"]["total"], first["seq_len"]
    cfg = model_config(train_config(cc, connection, 0, data, out, progress=False))
    cuda_peaks = [r["max_memory_gb"] for records in runs for r in records if "max_memory_gb" in r]
    if cuda_peaks:
        memory = {"kind": "cuda_max_memory_allocated", "bytes": round(max(cuda_peaks) * 1e9)}
    else:
        memory = {"kind": "saved_activations_one_batch", "bytes": activation_bytes(cc, connection, data, seq_len)}
    speeds = [s for s in (tokens_per_second(records) for records in runs) if s is not None]
    return {
        "parameters": params,
        "seq_len": seq_len,
        "seeds": list(cc.seeds),
        "final_val_loss": finals,
        "mean": statistics.fmean(finals),
        "std": statistics.stdev(finals) if len(finals) > 1 else None,
        "tokens_per_s": statistics.fmean(speeds) if speeds else None,
        "memory": memory,
        "flops_per_token": flops_per_token(cfg, params, seq_len),
        "curve": val_curve(runs),
    }


def collect_results(cc: CompareConfig, data: str, out: Path) -> dict:
    """Every connection's figures plus the comparisons with the baseline (Welch test, compute multiplier)."""
    per = {name: connection_results(cc, name, data, out) for name in cc.connections}
    base = per[cc.baseline]
    first = json.loads((run_folder(out, cc.baseline, cc.seeds[0]) / "run.json").read_text())
    final_record = [r for r in read_records(run_folder(out, cc.baseline, cc.seeds[0])) if r.get("tokens")][-1]
    tokens_per_step = final_record["tokens"] // final_record["step"]
    curve = base["curve"]
    long = None
    if cc.baseline_steps:
        curve = val_curve([read_records(run_folder(out, cc.baseline, seed, cc.baseline_steps)) for seed in cc.seeds])
        long = {"steps": cc.baseline_steps, "curve": curve}
    for name, r in per.items():
        r["delta_vs_baseline"] = r["mean"] - base["mean"]
        r["welch"] = difference_test(r["final_val_loss"], base["final_val_loss"]) if name != cc.baseline else None
        r["compute_multiplier"] = compute_multiplier(curve["step"], curve["mean"], r["mean"], cc.steps)
    own = per[cc.baseline]["compute_multiplier"]["multiplier"]
    for r in per.values():  # on a longer baseline's curve: relative to where the baseline's own loss lies
        m = r["compute_multiplier"]
        m["relative"] = m["multiplier"] / own if long and own and m["multiplier"] is not None else None
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "command": command_line(cc, out),
        "settings": asdict(cc),
        "baseline": cc.baseline,
        "baseline_long": long,
        "connections_order": list(cc.connections),
        "steps": cc.steps,
        "tokens_per_step": tokens_per_step,
        "tokens_per_run": tokens_per_step * cc.steps,
        "data": first["data"],
        "environment": first["environment"],
        "connections": per,
        "pairwise_welch": pairwise_welch(per, cc.connections),
    }


def pairwise_welch(per: dict, names: list[str]) -> dict:
    """Welch's test of every pair (row minus column), for orderings among the connections themselves."""
    return {
        a: {b: difference_test(per[a]["final_val_loss"], per[b]["final_val_loss"]) for b in names if b != a}
        for a in names
    }


def pairwise_table(results: dict) -> str:
    """Welch p-values and Cohen's d of every pair, with the sign of the row's mean loss minus the column's."""
    names = results["connections_order"]
    rows = ["| row − column | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            w = results["pairwise_welch"][a].get(b)
            diff = results["connections"][a]["mean"] - results["connections"][b]["mean"]
            cells.append("—" if w is None else f"{diff:+.3f} (p {format_p(w)}, d {format_d(w)})")
        rows.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def finite_or_none(obj: object) -> object:
    """JSON has no infinities or NaN: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


# ---- report -------------------------------------------------------------------------------------
def format_multiplier(m: dict) -> str:
    if m["multiplier"] is not None:
        return f"{m['multiplier']:.2f}×" + (f" ({m['relative']:.2f}× rel.)" if m.get("relative") is not None else "")
    if m["lower_bound"] is not None:
        return f">{m['lower_bound']:.2f}×"
    return f"<{m['upper_bound']:.2f}×"


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_p(welch: dict | None) -> str:
    if welch is None or welch["p"] is None:
        return "—"
    return f"{welch['p']:.3g}" if welch["p"] >= 1e-4 else f"{welch['p']:.1e}"


def format_d(test: dict | None) -> str:
    return "—" if test is None or test.get("d") is None else f"{test['d']:+.2f}"


def markdown_table(results: dict) -> str:
    base = results["baseline"]
    rows = [
        "| connection | params | val loss mean ± std | Δ vs baseline | p (Welch) | d (Cohen) | compute multiplier "
        "| tokens/s | memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["connections_order"]:
        r = results["connections"][name]
        std = f" ± {r['std']:.4f}" if r["std"] is not None else ""
        delta = "—" if name == base else f"{r['delta_vs_baseline']:+.4f}"
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        label = f"{name} (baseline)" if name == base else name
        rows.append(
            f"| {label} | {r['parameters']:,} | {r['mean']:.4f}{std} | {delta} | {format_p(r['welch'])} | "
            f"{format_d(r['welch'])} | "
            f"{format_multiplier(r['compute_multiplier'])} | {speed} | {format_bytes(r['memory']['bytes'])} |"
        )
    return "\n".join(rows)


def markdown_report(results: dict) -> str:
    s = results["settings"]
    kinds = {r["memory"]["kind"] for r in results["connections"].values()}
    if kinds == {"cuda_max_memory_allocated"}:
        memory_note = "peak CUDA memory allocated during training"
    elif kinds == {"saved_activations_one_batch"}:
        memory_note = "bytes of activations saved for backward by one training batch"
    else:
        memory_note = "CUDA peak where trained on CUDA, else activations saved for backward by one batch"
    lines = [
        f"# mudd compare: {s['preset']}, {len(s['seeds'])} seeds, {results['steps']} steps",
        "",
        f"{results['tokens_per_run']:,} training tokens per run ({results['tokens_per_step']:,} per step), "
        f"data {results['data']}, device {results['environment'].get('device')}.",
        "",
        markdown_table(results),
        "",
        f"- Validation loss: final mean over seeds {', '.join(map(str, s['seeds']))} (std with ddof=1), nats/token.",
        f"- Δ, p and d: against {results['baseline']}; p is the two-sided Welch t-test of the final losses, d "
        "the difference of the means in pooled standard deviations (Cohen's d).",
        f"- Compute multiplier: steps {results['baseline']} needs to reach the connection's final mean loss "
        "(its mean curve, running minimum, interpolated) divided by the connection's steps"
        + (
            f", read on the baseline's {results['baseline_long']['steps']}-step runs (their own learning-rate "
            'schedule; the baseline\'s own entry shows what that schedule alone gives, and "rel." divides by it)'
            if results.get("baseline_long")
            else ""
        )
        + "; "
        "> marks a lower bound (never reached), < an upper bound (reached before the first evaluation).",
        f"- tokens/s: mean over seeds of the training throughput; memory: {memory_note}.",
        "",
        "Every pair: mean final loss of the row minus the column's, the Welch p-value and Cohen's d.",
        "",
        pairwise_table(results),
        "",
        "Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def plot_curves(results: dict, path: Path, flops: bool) -> None:
    """Mean validation curve per connection with a min-max band over seeds, against step or FLOPs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in results["connections_order"]:
        r = results["connections"][name]
        scale = results["tokens_per_step"] * r["flops_per_token"] if flops else 1.0
        x = [s * scale for s in r["curve"]["step"]]
        (line,) = ax.plot(x, r["curve"]["mean"], "o-" if len(x) < 30 else "-", markersize=3, linewidth=1.4, label=name)
        ax.fill_between(x, r["curve"]["min"], r["curve"]["max"], color=line.get_color(), alpha=0.18, linewidth=0)
    long = results.get("baseline_long")
    if long:  # the longer baseline runs the compute multiplier reads
        r = results["connections"][results["baseline"]]
        scale = results["tokens_per_step"] * r["flops_per_token"] if flops else 1.0
        ax.plot(
            [s * scale for s in long["curve"]["step"]],
            long["curve"]["mean"],
            ":",
            color="black",
            linewidth=1.2,
            label=f"{results['baseline']} ({long['steps']} steps)",
        )
    ax.set_xlabel("training FLOPs" if flops else "step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{results['settings']['preset']}: mean of {len(results['settings']['seeds'])} seeds, min-max band")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def write_outputs(results: dict, out: Path) -> None:
    write_json_atomic(str(out / "results.json"), finite_or_none(results))
    with atomic_path(str(out / "results.md")) as tmp:
        Path(tmp).write_text(markdown_report(results))
    plot_curves(results, out / "loss_vs_step.png", flops=False)
    plot_curves(results, out / "loss_vs_flops.png", flops=True)


def run_compare(cc: CompareConfig, out: Path, progress: bool = True) -> dict:
    """Check, train what is missing, and write the results; returns the results dict."""
    from .data import bundled_data_dir

    cc = cc.resolved()
    check_options(cc)
    data = cc.data or str(bundled_data_dir())
    preflight(cc, data)
    check_or_write_settings(out, cc)
    counts = run_all(cc, data, out, progress)
    results = collect_results(cc, data, out)
    results["runs"] = counts
    write_outputs(results, out)
    return results


def stored_settings(out: Path) -> CompareConfig:
    """The CompareConfig recorded in DIR/compare.json (settings added since then take their defaults)."""
    path = out / SETTINGS_NAME
    if not path.is_file():
        raise InputError(f"{out} holds no {SETTINGS_NAME}: --report reads a folder written by `mudd compare`")
    stored = read_settings(path, "restore it from the compare that wrote it")
    try:
        return CompareConfig(**stored)
    except TypeError as e:
        raise InputError(f"{path} is unreadable ({e}); restore it from the compare that wrote it") from None


def report_compare(out: Path) -> dict:
    """The results of a compare folder from its small files alone; refuses while a run is unfinished."""
    from .data import bundled_data_dir

    cc = stored_settings(out)
    missing = [
        str(run_folder(out, c, seed))
        for seed in cc.seeds
        for c in cc.connections
        if final_val_loss(read_records(run_folder(out, c, seed)), cc.steps) is None
    ]
    if missing:
        raise InputError(
            f"{len(missing)} runs of {out} have not finished ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); run `{command_line(cc, out)}` to finish them"
        )
    results = collect_results(cc, cc.data or str(bundled_data_dir()), out)
    results["runs"] = {"trained": 0, "skipped": len(cc.seeds) * len(cc.connections)}
    write_outputs(results, out)
    return results


# ---- command line -------------------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    d = CompareConfig()
    p.add_argument("--preset", default=d.preset, help="model shape shared by every connection (default tiny)")
    p.add_argument(
        "--connections",
        default=",".join(DEFAULT_CONNECTIONS),
        help=f"comma-separated connections (default {','.join(DEFAULT_CONNECTIONS)}); "
        f"choices: {', '.join(CONNECTIONS)}",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=3, help="train seeds 0..S-1 of each connection (default 3)")
    seeds.add_argument("--seed-list", help="explicit comma-separated seeds instead, e.g. 0,1,2")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps of every run (default {d.steps})")
    p.add_argument("--out", help="compare folder (default runs/compare-PRESET); re-running resumes it")
    p.add_argument("--data", help="prepared data folder (`mudd prepare`); default: the bundled Shakespeare corpus")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default min(256, block_size))")
    p.add_argument("--lr", type=float, help="peak learning rate (default as `mudd train`)")
    p.add_argument(
        "--lr-for",
        action="append",
        default=[],
        metavar="CONNECTION=LR",
        help="peak learning rate of one connection, e.g. mudd=1e-3 (repeatable; the others take --lr)",
    )
    p.add_argument("--eval-every", type=int, help="steps between validation points (default max(1, steps // 10))")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="validation sequences per evaluation")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="MuddConfig override for every connection (repeatable)",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype, help="compute dtype")
    p.add_argument("--baseline", default=d.baseline, help="connection the others are tested against (default residual)")
    p.add_argument(
        "--baseline-steps",
        type=int,
        help="also train the baseline this many steps (same seeds); the compute multiplier reads that "
        "longer curve (added to an existing compare without retraining the rest)",
    )
    add_recipe_arguments(p, skip=COMPARE_OWN)
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: recompute the results of --out from its compare.json and each run's "
        "metrics.jsonl and run.json (no checkpoints needed), e.g. a folder under docs/results",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no training progress bars")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    if args.seed_list is not None:
        seeds = parse_seed_list(args.seed_list)
    elif args.seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {args.seeds}")
    else:
        seeds = list(range(args.seeds))
    return CompareConfig(
        preset=args.preset,
        connections=parse_list(args.connections, "--connections"),
        seeds=seeds,
        steps=args.steps,
        data=args.data,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        lr_for=parse_lr_for(args.lr_for),
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        set=list(args.set),
        device=args.device,
        compile=args.compile,
        dtype=args.dtype,
        baseline=args.baseline,
        baseline_steps=args.baseline_steps,
        recipe=args.recipe,
        recipe_overrides={
            k: getattr(args, k) for k in OVERRIDABLE if k not in COMPARE_OWN and getattr(args, k) is not None
        },
    )


def cmd_compare(args: argparse.Namespace) -> int:
    cc = config_from_args(args)
    out = Path(args.out or f"runs/compare-{cc.preset}")
    # With --json, stdout carries the JSON alone: progress lines go to stderr.
    with redirect_stdout(sys.stderr) if args.json else nullcontext():
        results = report_compare(out) if args.report else run_compare(cc, out, progress=args.progress)
    if args.json:
        print(json.dumps(finite_or_none(results), indent=2))
    else:
        print(markdown_table(results))
        print(
            f"{results['runs']['trained']} runs trained, {results['runs']['skipped']} skipped; "
            f"results in {out / 'results.md'}, {out / 'results.json'}, {out / 'loss_vs_step.png'}, "
            f"{out / 'loss_vs_flops.png'}"
        )
    return 0
