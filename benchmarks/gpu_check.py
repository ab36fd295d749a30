"""The GPU check: every measurement of MUDD's cost on one CUDA GPU, in one call, into one report.

    python benchmarks/gpu_check.py OUT              on a CUDA machine (under 8 minutes on one H100/H200)
    python benchmarks/gpu_check.py OUT --dry-run    the same steps on the CPU at the nano shape

Steps, each a subprocess with its own time limit, so that one failing or slow step still leaves the others'
figures in the report:
  kernels     the Triton depth-mix kernel tests and the GPU tests (float32, bfloat16, float16; values and
              gradients against the reference)
  bench       `mudd bench` of the 405M MUDD against Transformer++ in bfloat16 with --compile: train step
              ratio, MFU, peak memory ratio, decode ratio with the compiled static cache, and the depth mix
              through Triton, the compiled formulas and the batched matmul
  recompute   the same bench eager with recompute_mix: the memory ratio with recompute
  train       50 steps of `mudd train` of the 405M MUDD in bfloat16 under FSDP2 on one GPU (torchrun)
The dry run keeps every step's code path but the compiles (on a CPU they take minutes; the compiled paths
have their own tests): no --compile, no compiled mix, and of the kernel tests only the GPU file, which skips.
Writes OUT/gpu_check.json, OUT/gpu_check.md and OUT/gpu_check.log (every step's output), the benches' JSON and
the training run's metrics.jsonl; the run's checkpoints stay in a temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUDD = [sys.executable, "-m", "muddformer"]
# Targets of the GPU check (docs/benchmarks.md): MUDD / Transformer++ at the 405M shape in bfloat16.
TARGETS = {
    "train_step_ratio": ("<=", 1.03, "bench"),
    "decode_ratio": (">=", 0.97, "bench"),
    "memory_ratio": ("<=", 1.08, "recompute"),
}


def steps(out: Path, work: Path, dry: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of every step."""
    if dry:
        shape = ["--preset", "nano", "--device", "cpu", "--dtype", "float32"]
        bench = [*shape, "--batch-size", "2", "--seq-len", "32", "--reps", "1", "--warmup", "1"]
        bench += ["--prompt-len", "4", "--decode-tokens", "4", "--mix-impl", "matmul"]
        train = ["--preset", "nano", "--set", "vocab_size=8192", "--device", "cpu", "--max-steps", "3"]
        train += ["--batch-size", "2", "--seq-len", "32", "--sample-tokens", "8"]
        kernels = ["tests/test_gpu.py"]
        compile_flag: list[str] = []
    else:
        shape = ["--preset", "muddformer-405m", "--device", "cuda", "--dtype", "bfloat16"]
        bench = [*shape, "--batch-size", "4", "--seq-len", "2048", "--reps", "5", "--warmup", "2"]
        bench += ["--decode-tokens", "64", "--mix-impl", "triton,compiled,matmul"]
        train = ["--preset", "muddformer-405m", "--device", "cuda", "--dtype", "bfloat16", "--max-steps", "50"]
        train += ["--batch-size", "8", "--seq-len", "1024"]
        kernels = ["tests/test_triton_kernel.py", "tests/test_gpu.py"]
        compile_flag = ["--compile"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "muddformer"]
    return [
        ("kernels", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *kernels], 100),
        ("bench", [*MUDD, "bench", *bench, *compile_flag, "--out", str(out / "bench.json")], 210),
        (
            "recompute",
            [*MUDD, "bench", *bench, "--set", "recompute_mix=true", "--out", str(out / "recompute.json")],
            70,
        ),
        (
            "train",
            [*torchrun, "train", *train, "--parallel", "fsdp", "--eval-every", "25", "--eval-windows", "8"]
            + ["--save-every", "1000", "--no-tensorboard", "--no-progress", "--out", str(work / "train")],
            100,
        ),
    ]


def run_step(name: str, command: list[str], limit: int, log: Path, env: dict) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc, output = (
            "timeout",
            "".join(o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (err.stdout, err.stderr)),
        )
    seconds = round(time.perf_counter() - start, 1)
    status = "ok" if rc == 0 else f"failed ({rc})"
    print(f"{name}: {status} in {seconds} s", flush=True)
    with log.open("a") as f:
        f.write(f"===== {name}: {' '.join(command)}\n{output}\n===== {name}: {status} in {seconds} s\n")
    tail = output.splitlines()[-3:]
    return {"status": status, "seconds": seconds, "limit_s": limit, "command": " ".join(command[1:]), "tail": tail}


def train_figures(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    figures = (
        {"steps": train[-1]["step"], "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"]} if train else {}
    )
    for key in ("tokens_per_s", "mfu"):
        if train and key in train[-1]:
            figures[key] = train[-1][key]
    if val:
        figures["val_loss"] = val[-1]["val_loss"]
    return figures


def environment(dry: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.platform()}
    try:
        env["triton"] = __import__("triton").__version__  # ships under several names (pytorch-triton, ...)
    except Exception:  # not installed, or broken: the kernels step reports it
        env["triton"] = None
    try:  # from the install's metadata: importing transformers takes seconds
        env["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        env["transformers"] = None
    if not dry and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def targets(report: dict) -> list[dict]:
    rows = []
    for key, (op, bound, step) in TARGETS.items():
        figures = report["figures"].get(step, {})
        value = figures.get(key)
        # The bench's spread over its rounds, where the figure is a time ratio (memory is exact).
        quartiles = figures.get("models", {}).get(figures.get("headline"), {}).get(f"{key}_iqr")
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        rows.append(
            {"figure": key, "from": step, "target": f"{op} {bound}", "value": value, "quartiles": quartiles, "met": met}
        )
    return rows


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check{' (dry run on the CPU: not GPU figures)' if report['dry_run'] else ''}",
        "",
        f"{env.get('gpu', 'no GPU')}; torch {env['torch']}, triton {env['triton']}, transformers "
        f"{env['transformers']}, Python {env['python']}; {report['seconds']} s in all.",
        "",
        "| step | status | seconds (limit) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s['status']} | {s['seconds']} ({s['limit_s']}) |" for name, s in report["steps"].items()]
    lines += ["", "| figure | step | target | value [quartiles] | met |", "|---|---|---|---|---|"]
    for row in report["targets"]:
        value = "not measured" if row["value"] is None else f"{row['value']:.3f}"
        if row["quartiles"]:
            value += " [{:.3f}, {:.3f}]".format(*row["quartiles"])
        met = "" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['figure']} | {row['from']} | {row['target']} | {value} | {met} |")
    bench = report["figures"].get("bench", {})
    if bench:
        mfu = {n: m["mfu"] for n, m in bench.get("models", {}).items() if "mfu" in m}
        lines += ["", f"MFU: {', '.join(f'{n} {v:.1%}' for n, v in mfu.items()) or 'not measured'}."]
        mixes = {"naive": bench["mix_naive_s"], **bench.get("mix_impls_s", {})}
        lines.append(
            "Depth mix of one training step (fwd+bwd): "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in mixes.items())
            + "."
        )
    train = report["figures"].get("train", {})
    if train:
        lines.append(
            "Train: "
            + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in train.items())
            + "."
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at the nano shape")
    parser.add_argument("--only", default="", help="comma-separated steps to run (default all)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run it on a GPU machine, or with --dry-run on the CPU", file=sys.stderr)
            return 2
    wanted = set(filter(None, args.only.split(",")))
    start = time.perf_counter()
    report: dict = {"dry_run": args.dry_run, "environment": environment(args.dry_run), "steps": {}, "figures": {}}
    log = out / "gpu_check.log"
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name, command, limit in steps(out, Path(work), args.dry_run):
            if wanted and name not in wanted:
                continue
            report["steps"][name] = run_step(name, command, limit, log, env)
            source = out / f"{name}.json"
            if source.exists():
                report["figures"][name] = json.loads(source.read_text())
        metrics = Path(work) / "train" / "metrics.jsonl"
        if metrics.exists():
            shutil.copyfile(metrics, out / "train_metrics.jsonl")
            report["figures"]["train"] = train_figures(metrics)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["targets"] = targets(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
