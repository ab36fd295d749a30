"""Run by test_distributed.py under torchrun in place of `-m muddformer`: the `mudd` command with every call of
FSDPModule.set_requires_gradient_sync printed at the end, so that a test sees when gradients are reduce-scattered."""

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
    print("gradient sync:", " ".join(map(str, calls)))
sys.exit(code)
