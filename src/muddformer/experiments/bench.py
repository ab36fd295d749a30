"""`mudd bench`: MUDD's real cost against Transformer++ of the same shape, measured in one run.

Every figure is a ratio to the baseline measured in the same process, interleaving the models
(A B, B A, ...) after warm-up, because absolute times on a shared machine are noise: a time ratio is
the median over rounds of that round's ratio, with its quartiles (`*_ratio_iqr`) as the spread.
Measured per connection: a training step (forward, backward, AdamW), prefill, cached decode, memory
(CUDA: peak allocated; everywhere: the exact bytes of activations saved for backward, counted with
saved-tensor hooks), and the depth mixing alone: one training step's worth of mixes, forward and
backward, ours against the naive per-state loop of the reference (architecture §2.6).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from muddformer.config import MIX_IMPLS, MuddConfig
from muddformer.errors import InputError
from muddformer.inference.generation import generate
from muddformer.inference.kv_cache import KVCache
from muddformer.kernels.depth_mix import DepthBuffer, depth_mix_buffered, depth_mix_reference
from muddformer.kernels.depth_mix_triton import triton_available
from muddformer.model import MuddModel, count_parameters, training_loss
from muddformer.options import DTYPES, option
from muddformer.training.config import parse_set_item
from muddformer.training.metrics import environment, flops_per_token, peak_flops

BASELINE = "residual"
FAST_MIXES = [impl for impl in MIX_IMPLS if impl != "reference"]  # the naive loop is the reference


@dataclass
class BenchConfig:
    """What `mudd bench` measures; each field with a flag is one of its options (muddformer.options)."""

    preset: str = option("tiny", help="model shape (default tiny); every connection gets this shape")
    device: str = option("cpu", help="cpu or cuda")
    dtype: str | None = option(None, choices=DTYPES, help="default float32 on CPU, bfloat16 on CUDA")
    connections: list[str] = option(
        factory=lambda: ["mudd"],
        flag="--connection",
        help="connection to compare with residual (repeatable or comma-separated; default mudd)",
    )
    batch_size: int = option(8)
    seq_len: int | None = option(None, help="training/prefill length (default the preset's block_size)")
    reps: int = option(7, help="timed repetitions per measurement (median)")
    warmup: int = option(2)
    prompt_len: int = option(16)
    decode_tokens: int = option(64)
    decode_batch: int = option(1)
    compile: bool = option(False, help="torch.compile the training step; static-cache compiled decode")
    overrides: dict = option(  # MuddConfig fields for every model, e.g. mix_impl, recompute_mix
        factory=dict,
        flag="--set",
        parse=parse_set_item,
        metavar="FIELD=VALUE",
        help="MuddConfig override for every model, e.g. --set mix_impl=reference --set recompute_mix=false",
    )
    mix_impls: list[str] = option(
        factory=list,
        flag="--mix-impl",
        help="also time the depth mix with each of these implementations (repeatable or comma-separated, "
        f"of {', '.join(FAST_MIXES)})",
    )
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        self.connections = [c for item in self.connections for c in item.split(",") if c]  # "a,b" as two
        self.mix_impls = [c for item in self.mix_impls for c in item.split(",") if c]
        unknown = [impl for impl in self.mix_impls if impl not in FAST_MIXES]
        if unknown:
            raise InputError(f"--mix-impl {unknown[0]!r} is not a fast depth mix; choose from {', '.join(FAST_MIXES)}")
        least = {"reps": 1, "warmup": 0, "batch_size": 1, "prompt_len": 1, "decode_tokens": 2, "decode_batch": 1}
        for name, low in least.items():  # decode is timed per token after the first (which ends the prefill)
            if getattr(self, name) < low:
                raise InputError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if "triton" in self.mix_impls and not triton_available(torch.device(self.device)):
            raise InputError(
                "--mix-impl triton needs the triton package and a CUDA device (or TRITON_INTERPRET=1 on the CPU)"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        name = self.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        return getattr(torch, name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device, self_timed: bool = False
) -> dict[str, list[float]]:
    """Seconds of each callable per round; every round runs all of them, in alternating order. `self_timed`
    callables return their own measurement (e.g. seconds per decoded token) instead of their wall time."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            own = fns[name]()
            _sync(device)
            times[name].append(own if self_timed else time.perf_counter() - start)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each callable over interleaved rounds (`interleaved_times`)."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, reps, warmup, device).items()}


def paired_ratio(times: list[float], baseline: list[float]) -> tuple[float, list[float]]:
    """The median and quartiles of time / baseline time, round by round: each round ran both back to back,
    so a machine that slows down for a while slows both sides of a pair and the ratio keeps."""
    ratios = [t / b for t, b in zip(times, baseline)]
    if len(ratios) == 1:
        return ratios[0], [ratios[0], ratios[0]]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, [q1, q3]


def saved_activation_bytes(fn: Callable[[], torch.Tensor], params: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn runs (parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().backward()
    return sum(storages.values())


def training_activation_bytes(model: MuddModel, ids: torch.Tensor) -> int:
    """Bytes of activations one training forward of `model` on `ids` saves for backward (its parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = saved_activation_bytes(lambda: training_loss(model(ids, labels=ids)), params)
    model.zero_grad(set_to_none=True)
    return saved


def build(cfg: MuddConfig, bc: BenchConfig, device: torch.device) -> MuddModel:
    torch.manual_seed(bc.seed)
    return MuddModel(cfg).to(device=device, dtype=bc.torch_dtype)


def train_step_fn(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One AdamW step on `ids`; the optimizer is the function's `optimizer` attribute."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        training_loss(model(ids, labels=ids)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a model keeps between steps: its weights and its optimizer's state (gradients are freed)."""
    tensors = list(model.parameters()) + [t for state in optimizer.state.values() for t in state.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def decode_seconds_per_token(model: MuddModel, prompt: torch.Tensor, tokens: int, compile: bool) -> Callable[[], float]:
    """A callable that generates `tokens` tokens and returns the mean time of the decode steps (prefill excluded)."""

    def run() -> float:
        stamps: list[float] = []

        def stream(_ids: torch.Tensor) -> None:
            _sync(prompt.device)
            stamps.append(time.perf_counter())

        generate(
            model,
            prompt,
            tokens,
            eos_token_id=None,
            streamer=stream,
            cache="static" if compile else "dynamic",
            compile=compile,
        )
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    return run


def fast_mix_impl(cfg: MuddConfig) -> str:
    """The implementation the bench calls "ours": the configured one, or "auto" for the reference."""
    return "auto" if cfg.mix_impl == "reference" else cfg.mix_impl


def mix_step_fns(
    cfg: MuddConfig, batch: int, seq: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """All depth mixes of one MUDD training step (forward and backward), ours and the naive loop;
    each callable returns the gradients of the states and weights."""
    g = torch.Generator(device="cpu").manual_seed(0)
    impl = fast_mix_impl(cfg)
    L, D = cfg.n_layer, cfg.dim
    states = [torch.randn(batch, seq, D, generator=g).to(device, dtype).requires_grad_() for _ in range(L + 1)]
    weights = [
        torch.randn(batch, seq, 4 if layer < L - 1 else 1, layer + 2, generator=g).to(device, dtype).requires_grad_()
        for layer in range(L)
    ]
    grads = [torch.randn(batch, seq, D, generator=g).to(device, dtype) for _ in range(4)]

    def run(fast: bool) -> list[torch.Tensor]:
        outs = []
        buffered = fast and impl != "reference"
        if buffered:
            buffer = DepthBuffer(states[0], L + 1)
            stored = [buffer.store(states[0])]
        for layer in range(L):
            if buffered:
                stored.append(buffer.store(states[layer + 1]))
                outs += depth_mix_buffered(buffer, stored, weights[layer], impl)
            else:
                outs += depth_mix_reference(states[: layer + 2], weights[layer])
        torch.autograd.backward(outs, [grads[i % 4] for i in range(len(outs))])
        computed = [t.grad for t in states + weights]
        for t in states + weights:
            t.grad = None
        return computed

    return {"naive": lambda: run(False), "ours": lambda: run(True)}


def run_bench(bc: BenchConfig) -> dict:
    device = torch.device(bc.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA device is available; use --device cpu")
    base = MuddConfig.from_preset(bc.preset).replace(**bc.overrides)
    seq = bc.seq_len or base.block_size
    if seq > base.block_size:
        raise InputError(f"--seq-len {seq} exceeds the preset's block_size {base.block_size}")
    names = [BASELINE] + [c for c in bc.connections if c != BASELINE]
    configs = {name: base.replace(connection=name) for name in names}
    models = {name: build(cfg, bc, device) for name, cfg in configs.items()}
    g = torch.Generator().manual_seed(bc.seed)
    ids = torch.randint(0, base.vocab_size, (bc.batch_size, seq), generator=g).to(device)
    prompt = torch.randint(0, base.vocab_size, (bc.decode_batch, bc.prompt_len), generator=g).to(device)
    if bc.prompt_len + bc.decode_tokens > base.block_size:
        raise InputError(f"--prompt-len + --decode-tokens exceed the preset's block_size {base.block_size}")

    results: dict = {name: {"parameters": count_parameters(m)["total"]} for name, m in models.items()}
    # Memory first, on fresh models: activations saved for backward (exact), and CUDA peak.
    for name, model in models.items():
        results[name]["saved_bytes"] = training_activation_bytes(model, ids)
    compiled = {name: torch.compile(m) if bc.compile else m for name, m in models.items()}
    steps = {name: train_step_fn(m, ids) for name, m in compiled.items()}
    if device.type == "cuda":
        for step in steps.values():
            step()  # every optimizer's state exists before any peak is taken
        for name, step in steps.items():
            # Every model stays on the device: a step's peak is its rise over what is held before it, plus this
            # model's own weights and optimizer state (the other models' are not its cost).
            torch.cuda.synchronize(device)
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            rise = torch.cuda.max_memory_allocated(device) - held
            results[name]["peak_bytes"] = rise + resident_bytes(models[name], step.optimizer)  # type: ignore[attr-defined]
    peak = peak_flops(device)
    rounds: dict[str, dict[str, list[float]]] = {"train_step": interleaved_times(steps, bc.reps, bc.warmup, device)}
    for name, times in rounds["train_step"].items():
        t = results[name]["train_step_s"] = statistics.median(times)
        results[name]["train_tokens_per_s"] = ids.numel() / t
        if peak:  # model FLOPs utilisation against the GPU's dense bf16 peak
            flops = flops_per_token(configs[name], results[name]["parameters"], seq) * ids.numel()
            results[name]["mfu"] = flops / t / peak

    def prefill(model):
        def run():
            with torch.no_grad():
                model(ids, cache=KVCache(model.config.n_layer, model.config.attn_windows))

        return run

    rounds["prefill"] = interleaved_times({n: prefill(m) for n, m in models.items()}, bc.reps, bc.warmup, device)
    decoders = {
        name: decode_seconds_per_token(m.eval(), prompt, bc.decode_tokens, bc.compile) for name, m in models.items()
    }
    # One warm-up round at least: it compiles the decode step.
    rounds["decode"] = interleaved_times(decoders, bc.reps, max(bc.warmup, 1), device, self_timed=True)
    for name in names:
        results[name]["prefill_s"] = statistics.median(rounds["prefill"][name])
        results[name]["decode_tokens_per_s"] = bc.decode_batch / statistics.median(rounds["decode"][name])

    mix_cfg = configs[names[1]] if len(names) > 1 else base
    mix_fns = mix_step_fns(mix_cfg, bc.batch_size, seq, device, bc.torch_dtype)
    for impl in bc.mix_impls:  # each named implementation, timed in the same interleaved rounds
        mix_fns[impl] = mix_step_fns(mix_cfg.replace(mix_impl=impl), bc.batch_size, seq, device, bc.torch_dtype)["ours"]
    mix = interleaved_medians(mix_fns, bc.reps, bc.warmup, device)
    report = {
        "preset": bc.preset,
        "device": str(device),
        "dtype": str(bc.torch_dtype).replace("torch.", ""),
        "batch_size": bc.batch_size,
        "seq_len": seq,
        "reps": bc.reps,
        "compile": bc.compile,
        "overrides": bc.overrides,
        "environment": environment(device),
        "models": results,
        "mix_impl": fast_mix_impl(mix_cfg),
        "mix_naive_s": mix["naive"],
        "mix_ours_s": mix["ours"],
        "mix_speedup": mix["naive"] / mix["ours"],
        "mix_impls_s": {impl: mix[impl] for impl in bc.mix_impls},
    }
    ref = results[BASELINE]
    memory_key = "peak_bytes" if device.type == "cuda" else "saved_bytes"
    for name in names[1:]:
        r = results[name]
        # Ratios of times paired by round (tokens/s: the baseline's time over this model's).
        r["train_step_ratio"], r["train_step_ratio_iqr"] = paired_ratio(
            rounds["train_step"][name], rounds["train_step"][BASELINE]
        )
        r["prefill_ratio"], r["prefill_ratio_iqr"] = paired_ratio(rounds["prefill"][name], rounds["prefill"][BASELINE])
        r["decode_ratio"], r["decode_ratio_iqr"] = paired_ratio(rounds["decode"][BASELINE], rounds["decode"][name])
        r["memory_ratio"] = r[memory_key] / ref[memory_key]
        r["saved_bytes_ratio"] = r["saved_bytes"] / ref["saved_bytes"]
    headline = names[1] if len(names) > 1 else BASELINE
    for key in ("train_step_ratio", "memory_ratio", "decode_ratio", "prefill_ratio"):
        report[key] = results[headline].get(key, 1.0)
    report["headline"] = headline
    return report


def format_report(report: dict) -> str:
    env = report["environment"]
    cpu_name = " ".join(filter(None, (env["processor"], env.get("cpu_capability"))))  # older reports lack the ISA
    lines = [
        f"mudd bench: preset {report['preset']}, {report['device']} {report['dtype']}, batch "
        f"{report['batch_size']} x {report['seq_len']} tokens, median of {report['reps']} interleaved reps"
        + (", compiled" if report["compile"] else ""),
        f"  torch {env['torch']}, {env.get('gpu', cpu_name)}, {env['torch_threads']} threads, {env['platform']}",
    ]
    if report["overrides"]:
        lines.append(f"  overrides: {report['overrides']}")
    header = (
        f"  {'connection':<14}{'params':>12}{'step ms':>10}{'tok/s':>10}{'prefill ms':>12}"
        f"{'decode tok/s':>14}{'saved MiB':>11}" + (f"{'peak MiB':>10}" if report["device"].startswith("cuda") else "")
    )
    lines.append(header)
    for name, r in report["models"].items():
        row = (
            f"  {name:<14}{r['parameters']:>12,}{r['train_step_s'] * 1e3:>10.1f}{r['train_tokens_per_s']:>10,.0f}"
            f"{r['prefill_s'] * 1e3:>12.1f}{r['decode_tokens_per_s']:>14.1f}{r['saved_bytes'] / 2**20:>11.1f}"
        )
        if "peak_bytes" in r:
            row += f"{r['peak_bytes'] / 2**20:>10.1f}"
        lines.append(row)
    lines.append("  ratios to residual (Transformer++ of the same shape):")
    for name, r in report["models"].items():
        if "train_step_ratio" in r:
            spread = {k: "[{:.3f}, {:.3f}]".format(*r[f"{k}_ratio_iqr"]) for k in ("train_step", "prefill", "decode")}
            lines.append(
                f"    {name:<12} train step {r['train_step_ratio']:.3f} {spread['train_step']}  memory "
                f"{r['memory_ratio']:.3f}  prefill {r['prefill_ratio']:.3f} {spread['prefill']}  "
                f"decode tok/s {r['decode_ratio']:.3f} {spread['decode']}"
            )
    lines.append("  (time ratios: median over interleaved rounds of the round's ratio [quartiles])")
    lines.append(
        "  MUDD's depth mixing (4 streams, per-token weights) of one training step at this shape (fwd+bwd): naive loop "
        f"{report['mix_naive_s'] * 1e3:.2f} ms, ours ({report['mix_impl']}) {report['mix_ours_s'] * 1e3:.2f} ms, "
        f"speedup {report['mix_speedup']:.2f}x"
    )
    for impl, t in report["mix_impls_s"].items():
        lines.append(f"    mix_impl={impl}: {t * 1e3:.2f} ms, speedup {report['mix_naive_s'] / t:.2f}x")
    if any("mfu" in r for r in report["models"].values()):
        lines.append("  MFU: " + ", ".join(f"{n} {r['mfu']:.1%}" for n, r in report["models"].items() if "mfu" in r))
    return "\n".join(lines)
