"""Run by test_distributed.py under torchrun in place of `-m muddformer`: the `mudd` command with every call of
FSDPModule.set_requires_gradient_sync printed at the end, so that a test sees when gradients are reduce-scattered."""

import os
import sys

from torch.distributed.fsdp import FSDPModule

from muddformer.cli import main

calls = []
original = FSDPModule.set_requires_gradient_sync


def recorded(self, requires_gradient_sync, **kwargs):
    calls.append(requires_gradient_sync)
    return original(self, requires_gradient_sync, **kwargs)


FSDPModule.set_requires_gradient_sync = recorded
try:
    code = main()
finally:
    # One write(2) of under PIPE_BUF bytes: atomic, so the other rank's output cannot land inside the line.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"gradient sync: {' '.join(map(str, calls))}\n".encode())
sys.exit(code)
