"""Checks that need a CUDA GPU (marked `gpu`: skipped without one)."""

from __future__ import annotations

import pytest
import torch

from muddformer import MuddConfig, MuddModel
from muddformer.inference.generation import generate

pytestmark = pytest.mark.gpu


def tiny(connection: str = "mudd") -> MuddModel:
    torch.manual_seed(0)
    cfg = MuddConfig(vocab_size=97, n_layer=3, dim=64, n_head=4, block_size=64, connection=connection)
    return MuddModel(cfg)


@pytest.mark.parametrize("connection", ["residual", "mudd"])
def test_training_forward_and_backward_never_wait_for_the_gpu(connection):
    """No host synchronisation in a training step's forward and backward (no .item(), no id-range read)."""
    model = tiny(connection).cuda()
    x = torch.randint(0, 97, (2, 32), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), x.flatten())
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_forward_matches_the_cpu():
    model = tiny()
    x = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model(x).logits
        gpu = model.cuda()(x.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_compiled_static_cache_decode_with_cuda_graphs_equals_eager():
    model = tiny().cuda().eval()
    prompt = torch.randint(0, 97, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    eager = generate(model, prompt, max_new_tokens=12, cache="static")
    compiled = generate(model, prompt, max_new_tokens=12, cache="static", compile=True)
    assert torch.equal(eager, compiled)
