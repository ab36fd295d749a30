"""Mixture-of-experts feed-forward: the routed computation, router losses, counts, caches, compile, training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_causal, build, nano_run, randomize_connection

from muddformer import ConfigError, MuddConfig, copy_shared_weights, count_parameters
from muddformer.inference.kv_cache import KVCache
from muddformer.model import training_loss
from muddformer.moe import MoEFeedForward
from muddformer.training.metrics import flops_per_token
from muddformer.training.parallel import DistInfo, apply_activation_checkpointing, parallelize
from muddformer.training.trainer import train

MOE = dict(n_layer=3, dim=32, n_head=2, intermediate_size=256, ffn_schedule="constant")  # experts: one width
MOE |= dict(moe_experts=4, moe_top_k=2, moe_intermediate_size=48)


def ids(seed: int, shape=(2, 20)) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def explicit_moe(ffn: MoEFeedForward, x: torch.Tensor, norm_topk: bool) -> torch.Tensor:
    """Token by token: the gate-weighted sum of its top-k experts plus every shared expert."""
    out = torch.zeros_like(x)
    for t, token in enumerate(x):
        probs = torch.softmax(ffn.router(token), -1)
        gates, chosen = probs.topk(ffn.top_k)
        gates = gates / gates.sum() if norm_topk else gates
        for gate, e in zip(gates, chosen.tolist()):
            out[t] += gate.to(x.dtype) * ffn.expert(e, token[None])[0]
        for e in range(ffn.n_routed, ffn.w1.shape[0]):
            out[t] += ffn.expert(e, token[None])[0]
    return out


@pytest.mark.parametrize("block", ["llama", "pythia"])
@pytest.mark.parametrize("norm_topk, shared", [(True, 0), (False, 1)])
def test_the_mixture_is_the_gate_weighted_sum_of_each_tokens_experts(block, norm_topk, shared):
    model = build(**MOE, block=block, moe_norm_topk=norm_topk, moe_shared_experts=shared).double()
    ffn = model.layers[1].feed_forward
    with torch.no_grad():
        for p in ffn.parameters():  # biases too, so every term is live
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = explicit_moe(ffn, x.reshape(-1, 32), norm_topk).reshape(x.shape)
    torch.testing.assert_close(ffn(x), expected, atol=1e-12, rtol=1e-12)
    assert ffn.load.sum().item() == pytest.approx(1.0) and (ffn.load > 0).sum() >= 2  # dropless: all 36 assigned


def test_router_losses_at_a_uniform_router():
    # Equal probabilities: f_e sums to 1 whatever the assignment, so the balance loss is exactly 1; the
    # logits are 0, so the z-loss is log(E)^2. The model adds them with their weights over the 3 layers.
    model = build(**MOE, moe_aux_loss_weight=0.5, moe_z_loss_weight=0.25).double()
    for ffn in model.experts():
        torch.nn.init.zeros_(ffn.router.weight)
    out = model(ids(1))
    for ffn in model.experts():
        assert ffn.balance_loss.item() == pytest.approx(1.0, abs=1e-12)
        assert ffn.z_loss.item() == pytest.approx(math.log(4) ** 2, abs=1e-12)
    assert out.aux_loss.item() == pytest.approx(3 * (0.5 + 0.25 * math.log(4) ** 2), abs=1e-12)
    # A router that prefers experts 0 and 1 for every token: f = (1/2, 1/2, 0, 0) under top-2.
    ffn = model.experts()[0]
    with torch.no_grad():
        ffn.router.weight.zero_()
        ffn.router.weight[:2] = 0.1
        ffn(torch.ones(1, 5, 32, dtype=torch.float64))
    assert ffn.load.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_aux_loss_stays_out_of_the_language_model_loss_and_dense_models_have_none():
    model = build(**MOE)
    x = ids(2)
    out = model(x, labels=x)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert build(n_layer=3, dim=32, n_head=2)(x, labels=x).aux_loss is None
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1)))


@pytest.mark.parametrize("connection", ["mudd", "ddformer", "hc"])
def test_a_fresh_connection_computes_the_residual_model_with_experts(connection):
    residual = build(**MOE, connection="residual")
    other = build(seed=3, **MOE, connection=connection)
    copy_shared_weights(residual, other)
    x = ids(3)
    torch.testing.assert_close(other(x).logits, residual(x).logits, atol=1e-6, rtol=1e-6)


def test_experts_keep_the_model_causal():
    # Routing is per token: a later token never changes an earlier position's logits, only its own and later.
    model = build(**MOE, connection="mudd", moe_shared_experts=1).double()
    randomize_connection(model)
    assert_causal(model, ids(6), cut=12, atol=1e-12)  # exact although the expert batches differ in size


@pytest.mark.parametrize("block, connection", [("llama", "mudd"), ("pythia", "mudd"), ("llama", "attnres")])
def test_cached_decode_with_experts_equals_the_full_forward(block, connection):
    model = build(**MOE, block=block, connection=connection, moe_shared_experts=1, moe_layers="0,2").double()
    randomize_connection(model)
    x = ids(4)
    kv = KVCache(model.config.n_layer)
    with torch.no_grad():
        full = model(x).logits
        pieces = [model(x[:, :6], cache=kv).logits] + [model(x[:, t : t + 1], cache=kv).logits for t in range(6, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-11, rtol=1e-11)


def test_experts_compile_with_fullgraph_and_recompute_under_activation_checkpointing():
    model = build(**MOE, connection="mudd")
    x = ids(5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # inductor: test_model_pieces
    got, want = compiled(x, labels=x), model(x, labels=x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-5)
    (want.loss + want.aux_loss).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_activation_checkpointing(model)
    out = model(x, labels=x)
    (out.loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert plain["layers.0.feed_forward.router.weight"].abs().sum() > 0  # the router learns from both losses


@pytest.mark.parametrize("block", ["llama", "pythia"])
def test_total_and_active_parameters(block):
    model = build(**MOE, block=block, moe_shared_experts=1, moe_layers="1")
    cfg, counts = model.config, count_parameters(model)
    D, H, E, k = 32, 48, 4, 2
    expert = 3 * D * H if block == "llama" else 2 * D * H + H + D
    dense = build(**MOE | dict(moe_experts=0, moe_top_k=2, moe_intermediate_size=0), block=block)
    dense_ffn = sum(p.numel() for p in dense.layers[1].feed_forward.parameters())
    assert counts["total"] - count_parameters(dense)["total"] == (E + 1) * expert + D * E - dense_ffn
    assert counts["total"] - counts["active"] == (E - k) * expert
    attention = 12 * D * cfg.n_layer * 64
    mixing = 3 * model.connection.mix_flops()  # the connection's weighted sums, forward and backward
    assert flops_per_token(cfg, counts["total"], 64) == 6 * (counts["active"] - 97 * D) + attention + mixing


def test_paper_moe_preset_sizes():
    counts = count_parameters(build_meta_preset("muddformer-moe-1.8b-a405m"))
    assert 1.8e9 < counts["total"] < 1.9e9 and 4.0e8 < counts["active"] < 4.2e8


def build_meta_preset(name: str):
    from muddformer.model import build_meta

    return build_meta(MuddConfig.from_preset(name))


def test_training_reports_router_loss_and_per_expert_load(play_data, tmp_path):
    run = nano_run(
        play_data, tmp_path / "moe", set=["moe_experts=4", "moe_top_k=2", "ffn_schedule=constant"], log_every=1
    )
    train(run)
    rows = [json.loads(line) for line in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert logged and all(r["moe/router_loss"] > 0 for r in logged)
    for layer in range(2):
        loads = [logged[0][f"moe/{layer}/load/{e}"] for e in range(4)]
        assert sum(loads) == pytest.approx(4.0) and logged[0][f"moe/{layer}/max_load"] == max(loads)


def test_moe_refusals():
    with pytest.raises(ConfigError, match="moe_top_k=5 must be in"):
        MuddConfig(moe_experts=4, moe_top_k=5, ffn_schedule="constant")
    with pytest.raises(ConfigError, match="ffn_schedule='linear' re-allocates the FFN width over depth, which experts"):
        MuddConfig(moe_experts=4)
    with pytest.raises(ConfigError, match="set moe_experts"):
        MuddConfig(moe_layers="0")
    with pytest.raises(ConfigError, match="moe_layers: layer 9 is outside"):
        MuddConfig(n_layer=4, moe_experts=4, moe_layers="9", ffn_schedule="constant")
    with pytest.raises(ConfigError, match="moe_aux_loss_weight must be >= 0"):
        MuddConfig(moe_experts=4, moe_aux_loss_weight=-1.0, ffn_schedule="constant")


@pytest.mark.parametrize("gated", [True, False])
def test_the_grouped_experts_op_has_exact_gradients_and_a_consistent_registration(gated):
    from muddformer.moe import grouped_experts

    g = torch.Generator().manual_seed(9)
    E, D, H = 3, 4, 5

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)

    x, w1, w2 = rand(7, D), rand(E, H, D), rand(E, D, H)
    w3, b1, b2 = (rand(E, H, D), None, None) if gated else (None, rand(E, H), rand(E, D))
    sizes = torch.tensor([3, 0, 4])  # an expert may get no token
    args = (x, sizes, w1, w2, w3, b1, b2)
    assert torch.autograd.gradcheck(lambda *a: grouped_experts(*a), args)
    torch.library.opcheck(grouped_experts, args)


@pytest.mark.parametrize("ffn", ["dense", "experts"])
def test_compile_under_activation_checkpointing_equals_eager(ffn, request):
    # The trainer's setup for both options (training/parallel.py): the whole model compiled around its
    # checkpointed blocks, or, with experts, each block compiled on its own inside its checkpoint. The experts'
    # case is the one inductor backward through the grouped-experts op; the dense one checks the partition only.
    if ffn == "dense":
        request.getfixturevalue("aot_eager_compile")
    model = build(**(MOE if ffn == "experts" else dict(n_layer=3, dim=32, n_head=2)), connection="mudd")
    randomize_connection(model)
    x = ids(5)
    out = model(x, labels=x)
    training_loss(out).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    both = parallelize(model, DistInfo(), "none", activation_checkpointing=True, compile=True)
    got = both(x, labels=x)
    training_loss(got).backward()
    torch.testing.assert_close(got.loss, out.loss, atol=1e-5, rtol=1e-5)
    if ffn == "experts":
        torch.testing.assert_close(got.aux_loss, out.aux_loss, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():  # compiled float32 sums over tokens in another order: 1e-4 of the largest
        atol = 2e-4 * plain[name].abs().max().item()
        torch.testing.assert_close(p.grad, plain[name], atol=atol, rtol=1e-4, msg=name)
