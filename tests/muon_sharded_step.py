"""Run by test_muon.py under torchrun (2 ranks, gloo): Muon steps on matrices sharded by FSDP2 (one with an uneven
split of its rows) equal, bit for bit, torch.optim.Muon's steps on the whole matrices, with one collective per matrix
and step: the update is gathered and orthogonalised whole (torch's own step communicates in every Newton-Schulz
product, and its bfloat16 rounding then depends on the layout)."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from muddformer.training.optimizers import WholeMatrixMuon


def matrices():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 15, bias=False), torch.nn.Linear(15, 24, bias=False))


def muon(module, optimizer_class):
    settings = dict(lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    return optimizer_class(module.parameters(), **settings)


dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
sharded, whole, torch_sharded = matrices(), matrices(), matrices()
before = [p.detach().clone() for p in whole.parameters()]
fully_shard(sharded, mesh=mesh)
fully_shard(torch_sharded, mesh=mesh)
optimizers = {
    "sharded": muon(sharded, WholeMatrixMuon),
    "whole": muon(whole, torch.optim.Muon),
    "torch_sharded": muon(torch_sharded, torch.optim.Muon),
}
collectives = {}
for step in range(3):
    grads = [torch.randn(p.shape) for p in before]
    for module in (sharded, torch_sharded):
        for p, g in zip(module.parameters(), grads):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
    for p, g in zip(whole.parameters(), grads):
        p.grad = g.clone()
    for name, optimizer in optimizers.items():
        with CommDebugMode() as comm:
            optimizer.step()
        collectives[name] = comm.get_total_counts()
for got, want, start in zip(sharded.parameters(), whole.parameters(), before):
    assert (want.detach() - start).abs().max() > 1e-2  # moved
    assert torch.equal(got.full_tensor(), want.detach()), (got.full_tensor() - want).abs().max()
assert collectives["sharded"] == 2, collectives  # one all-gather per matrix
assert collectives["torch_sharded"] > 10 * collectives["sharded"], collectives
if dist.get_rank() == 0:
    print(f"sharded steps equal the whole ones; collectives per step: {collectives}")
dist.destroy_process_group()
