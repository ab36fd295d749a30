"""Muon (torch.optim.Muon) for the blocks' matrices and, optionally, the connection's: which parameters it takes,
that its steps are orthogonalised updates, resume, and a sharded matrix under FSDP2 stepped as the whole one."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build, nano_run
from test_train import assert_same_weights

from muddformer.errors import ConfigError
from muddformer.training import optimizers as optimizer_module
from muddformer.training.optimizers import build_optimizers
from muddformer.training.recipes import get_recipe, param_groups
from muddformer.training.trainer import train

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


@pytest.mark.parametrize("generator_optimizer", ["adamw", "muon"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(generator_optimizer):
    experts = dict(moe_experts=4, moe_top_k=2, moe_intermediate_size=24, moe_layers="1", ffn_schedule="constant")
    model = build(connection="mudd", n_layer=3, **experts)
    recipe = get_recipe("cpu").replace(optimizer="muon", generator_optimizer=generator_optimizer)
    groups = param_groups(model, recipe)
    group_of = {id(p): g for g in groups for p in g["params"]}
    assert len(group_of) == sum(1 for _ in model.parameters())  # each parameter once
    priors = {"connection." + n for n in model.connection.static_prior_names()}  # 2-D, but a prior: AdamW
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        in_blocks, connection = name.startswith("layers."), name.startswith("connection.") and name not in priors
        muon = p.dim() == 2 and (in_blocks or (connection and generator_optimizer == "muon"))
        assert g["optimizer"] == ("muon" if muon else "adamw"), name
        if muon:
            assert g["name"] == ("generator_muon_matrices" if connection else "muon_matrices")
            assert g["momentum"] == 0.95 and g["weight_decay"] == (0.1 if in_blocks else recipe.generator_decay)
    names = {n for n, p in model.named_parameters() if group_of[id(p)]["optimizer"] == "adamw" and p.dim() >= 2}
    assert {"tok_embeddings.weight", "output.weight", "layers.1.feed_forward.w1"} <= names  # and 3-D experts
    optimizers = build_optimizers(groups, 1e-3, {})
    assert [type(o).__name__ for o in optimizers.optimizers] == ["AdamW", "WholeMatrixMuon"]
    assert optimizers.param_groups == [g for o in optimizers.optimizers for g in o.param_groups]


def test_muon_without_matrices_to_train_or_without_torch_muon_is_a_clear_error(monkeypatch):
    recipe = get_recipe("cpu").replace(generator_optimizer="muon")
    with pytest.raises(ConfigError, match="the 'residual' connection has no learned matrices for Muon to train"):
        param_groups(build(connection="residual"), recipe)
    groups = param_groups(build(connection="mudd"), recipe)
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match=r"Muon needs torch >= 2.9 \(torch.optim.Muon\), this is .*; use AdamW"):
        build_optimizers(groups, 1e-3, {})


@pytest.mark.parametrize("nesterov", [True, False])
def test_whole_matrix_muon_steps_unsharded_matrices_exactly_as_torch_muon(nesterov):
    """The library's Muon differs from torch's only for sharded matrices; a torch release that changes its step (or
    the private helpers it reuses) fails here."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=g) for shape in ((12, 8), (8, 20), (16, 16))]
    models = [[torch.nn.Parameter(t.clone()) for t in start] for _ in range(2)]
    groups = [
        [dict(params=ps[:2], lr=0.02, weight_decay=0.1), dict(params=ps[2:], lr=0.05, weight_decay=0.0)]
        for ps in models
    ]
    settings = dict(lr=0.01, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    ours, theirs = optimizer_module.WholeMatrixMuon(groups[0], **settings), torch.optim.Muon(groups[1], **settings)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=g) for t in start]
        for ps in models:
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
        ours.step()
        theirs.step()
    for a, b, s in zip(*models, start):
        assert (a - s).abs().max() > 1e-3 and torch.equal(a, b)
    assert ours.state_dict()["state"][0]["momentum_buffer"].equal(theirs.state_dict()["state"][0]["momentum_buffer"])


def test_a_muon_step_is_an_orthogonalised_update():
    model = build(connection="mudd", n_layer=2, dim=64, n_head=2)
    recipe = get_recipe("cpu").replace(optimizer="muon", weight_decay=0.0)
    optimizers = build_optimizers(param_groups(model, recipe), 0.01, {})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    optimizers.step()
    for name in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight"):
        step = before[name] - dict(model.named_parameters())[name].detach()
        rows, cols = step.shape
        singular = torch.linalg.svdvals(step / (0.01 * 0.2 * max(rows, cols) ** 0.5))  # Muon's RMS-matching scale
        # Newton-Schulz's quintic moves the singular values into about [0.7, 1.2], all but those nearest zero (a square
        # random matrix has some); the gradient's own spread from 0 to twice their mean.
        assert singular.max() < 1.5 and (singular > 0.5).float().mean() > 0.9, (name, singular)
    embed = before["tok_embeddings.weight"] - model.tok_embeddings.weight.detach()
    assert embed.abs().max() == pytest.approx(0.01, rel=1e-3)  # AdamW's first step: lr x sign(gradient)


def test_muon_runs_resume_bit_identically(play_data, tmp_path):
    settings = dict(max_steps=4, save_every=2, eval_every=2, optimizer="muon", generator_optimizer="muon")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(nano_run(play_data, full, **settings))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    train(nano_run(play_data, resumed, **settings))
    assert_same_weights(full / "checkpoints" / "step_000004", resumed / "checkpoints" / "step_000004")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_muon_steps_matrices_sharded_by_fsdp2_as_the_whole_ones_with_one_gather_each():
    script = Path(__file__).parent / "muon_sharded_step.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "sharded steps equal the whole ones" in proc.stdout
