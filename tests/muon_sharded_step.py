"""Run by test_muon.py under torchrun (2 ranks, gloo): one Muon step on a matrix sharded by FSDP2 equals the step on
the whole matrix. torch's Newton-Schulz runs in bfloat16, whose rounding differs between the two layouts; a float32
copy of it is swapped in so that the comparison is exact up to float32 rounding."""

import torch
import torch.distributed as dist
import torch.optim._muon as muon
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor


def newton_schulz_float32(grad, coefficients, steps, eps):
    a, b, c = coefficients
    wide = grad.size(0) <= grad.size(1)
    x = (grad if wide else grad.T).float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


muon._zeropower_via_newtonschulz = newton_schulz_float32
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(0)
sharded, whole = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=False)
whole.load_state_dict(sharded.state_dict())
before = whole.weight.detach().clone()
grad = torch.randn(16, 8)
fully_shard(sharded, mesh=mesh)
sharded.weight.grad = distribute_tensor(grad, mesh, [Shard(0)])
whole.weight.grad = grad.clone()
for module in (sharded, whole):
    torch.optim.Muon(module.parameters(), lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
got, want = sharded.weight.full_tensor(), whole.weight.detach()
assert (want - before).abs().max() > 1e-2 and (got - before).abs().max() > 1e-2  # both moved
torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
if dist.get_rank() == 0:
    print("sharded step equals the whole one")
dist.destroy_process_group()
