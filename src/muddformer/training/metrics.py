"""What a run records: FLOPs and MFU, metrics.jsonl / TensorBoard (RunLog), the loss plot, the environment."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from muddformer import __version__
from muddformer._utils import atomic_path
from muddformer.config import MuddConfig
from muddformer.connections import build_connection
from muddformer.errors import DataError
from muddformer.moe import inactive_parameters
from muddformer.plotting import pyplot, save_png

# Dense bf16 tensor-core peak per GPU: MFU is reported against it (also for float32 runs).
# Matched against whole words of the device name, so that an L40S is not taken for an L4.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}


def flops_per_token(cfg: MuddConfig, params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the non-embedding parameters a token passes through (all but the routed
    experts it is not sent to) plus attention (PaLM appendix B), each layer's over at most its window, plus 3 x the
    connection's forward mixing (`Connection.mix_flops`: MUDD's weighted sums, which the paper's ratio counts)."""
    context = sum(min(seq_len, window) if window else seq_len for window in cfg.attn_windows)
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.dim  # a tied table is also the output head
    with torch.device("meta"):  # its plan, without memory
        mixing = build_connection(cfg).mix_flops()
    return 6 * (params - inactive_parameters(cfg) - lookup) + 12 * cfg.dim * context + 3 * mixing


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    """The peak of a GPU named like "NVIDIA A100-SXM4-80GB"; None for one not in PEAK_FLOPS (no MFU then)."""
    words = re.split(r"[\s_-]+", device_name.upper())
    return next((v for k, v in PEAK_FLOPS.items() if k in words), None)


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

                # Events past the start are from a run that stopped before its checkpoint: dropped (step 0 too).
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step)
            except ImportError:
                print("tensorboard is not installed: TensorBoard events are skipped", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        # A resumed run rewrites history after its checkpoint, so drop records from the lost steps.
        if not self.path.exists():
            return
        keep = [record for record in read_metrics(self.path) if record["step"] <= step]
        with atomic_path(str(self.path)) as tmp:
            Path(tmp).write_text("".join(json.dumps(record) + "\n" for record in keep))

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
        return read_metrics(self.path) if self.path.exists() else []


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (the process killed mid-append, a full disk) is dropped, as
    its step is redone on resume; an unreadable line before it is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DataError(f"{path} line {i + 1} is not JSON; repair or remove that line") from None
    return records


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
        # the vector ISA torch's CPU kernels use: float32 results of one run differ between AVX2 and AVX-512
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
