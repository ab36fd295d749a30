"""The connection family: identity at init, an independent recomputation, causality, gradients, shapes."""

import pytest
import torch
from conftest import (
    ALL_CONNECTIONS,
    DENSE_CONNECTIONS,
    assert_causal,
    assert_grads_close,
    build,
    explicit_dense_forward,
    loss_and_grads,
    randomize_connection,
)

from muddformer import MuddConfig, copy_shared_weights
from muddformer.connections.dense import generator_width
from muddformer.kernels import depth_mix
from muddformer.kernels.depth_mix import depth_mix_reference

BLOCKS = ["llama", "pythia"]
# The dense family; the rivals (hc, mhc, attnres) have their init, formula and gradient tests in test_rivals.py.
VARIANTS = [(c, "none") for c in DENSE_CONNECTIONS] + [(c, "prepost") for c in DENSE_CONNECTIONS if c != "residual"]


def ids(batch=2, seq=11, seed=3, vocab=97):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection, dense_norm", VARIANTS)
def test_fresh_model_computes_exactly_the_residual_model(block, connection, dense_norm):
    residual = build(seed=5, block=block, connection="residual")
    model = build(seed=6, block=block, connection=connection, dense_norm=dense_norm)
    untouched = copy_shared_weights(residual, model)
    assert all(name.startswith("connection.") for name in untouched)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, residual(x).logits)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection", ["mudd", "ddformer", "denseformer", "mudd-static"])
def test_trained_connection_changes_the_output(block, connection):
    model = build(block=block, connection=connection)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        randomize_connection(model)
        assert (model(x).logits - before).abs().max() > 1e-3


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection, dense_norm", [v for v in VARIANTS if v[0] != "residual"])
def test_dense_variants_match_the_explicit_formula(block, connection, dense_norm):
    model = build(block=block, connection=connection, dense_norm=dense_norm)
    randomize_connection(model)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, explicit_dense_forward(model, x), atol=1e-5, rtol=1e-5)


def test_stream_layout_of_mudd():
    model = build(connection="mudd")
    conn = model.connection
    assert conn.streams == [4, 4, 1]
    assert [tuple(b.shape) for b in conn.dense_bs.values()] == [(4, 2), (4, 3), (1, 4)]
    assert [b.tolist() for b in conn.dense_bs.values()][0] == [[0, 1]] * 4  # one-hot on the newest state
    assert [g.w1.weight.shape[0] for g in conn.dynamic_dense.values()] == [64, 64, 64]
    assert all(bool((g.w2.weight == 0).all()) for g in conn.dynamic_dense.values())
    assert [model.connection.multiway_input(l) for l in range(3)] == [False, True, True]
    assert generator_width(4, 33, last=False, expand_last=True, round64=True) == 192  # 132 -> 192
    assert generator_width(1, 33, last=True, expand_last=True, round64=True) == 192  # 132 -> 192
    assert generator_width(4, 16, last=False, expand_last=True, round64=True) == 128  # 64 -> 128 (always adds)
    assert generator_width(4, 16, last=False, expand_last=True, round64=False) == 64


def test_depth_mix_reference_against_einsum():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    for weights in (torch.randn(2, 5, 3, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g)):
        full = weights.expand(2, 5, 3, 4)
        for impl in ("reference", "matmul", "auto"):
            mixed = depth_mix(states, weights, impl=impl)
            for c in range(3):
                torch.testing.assert_close(
                    mixed[c], torch.einsum("btj,jbtd->btd", full[..., c, :], torch.stack(states))
                )
    with pytest.raises(ValueError, match="3 weights per stream for 4 states"):
        depth_mix_reference(states, torch.randn(1, 1, 1, 3))
    with pytest.raises(ValueError, match="unknown depth_mix implementation"):
        depth_mix(states, weights, impl="magic")


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection", ALL_CONNECTIONS)
def test_causality(block, connection):
    model = build(block=block, connection=connection)
    randomize_connection(model)
    assert_causal(model, ids(seq=16), cut=9)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection, dense_norm", VARIANTS)
def test_every_parameter_gets_a_gradient_after_one_step(block, connection, dense_norm):
    model = build(block=block, connection=connection, dense_norm=dense_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids(seq=12)
    for _ in range(2):
        opt.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
    opt.zero_grad()
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_loss_is_mean_shifted_cross_entropy_with_ignore_index():
    model = build()
    x = ids(seq=10)
    labels = x.clone()
    labels[0, 4:7] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    manual = -torch.log_softmax(logits[keep], -1).gather(1, target[keep, None]).mean()
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection", ALL_CONNECTIONS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 24), (3, 1), (2, 24)])
def test_odd_shapes(block, connection, shape):
    model = build(block=block, connection=connection)
    randomize_connection(model)
    x = ids(*shape)
    with torch.no_grad():
        out = model(x, labels=x)
        first = model(x[:, :1]).logits
    assert out.logits.shape == (*shape, 97)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits[:, :1], first, atol=1e-4, rtol=1e-4)
    if shape[1] > 1:
        assert torch.isfinite(out.loss)


def test_tied_embeddings():
    model = build(tie_word_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    model.to(torch.float64)
    assert model.output.weight is model.tok_embeddings.weight and model.rope.dtype == torch.float32


def test_xavier_init_method():
    model = build(init_method="xavier", dim=64, n_head=2)
    std = model.layers[0].attention.wq.weight.std().item()
    assert std == pytest.approx((2 / (64 + 64)) ** 0.5, rel=0.1)


@pytest.mark.parametrize("experts", [0, 4])
def test_neox_init_method(experts):
    # GPT-NeoX (Pythia): small_init sqrt(2 / 5D) everywhere, wang_init 2 / (L sqrt(D)) on what writes to the stream.
    moe = (
        dict(moe_experts=experts, moe_top_k=2, moe_intermediate_size=128, moe_layers="1", ffn_schedule="constant")
        if experts
        else {}
    )
    model = build(init_method="neox", block="pythia", n_layer=4, dim=128, n_head=2, vocab_size=512, **moe)
    small, wang = (2 / (5 * 128)) ** 0.5, 2 / (4 * 128**0.5)
    layer0, layer1 = model.layers[0], model.layers[1]
    for weight in (
        model.tok_embeddings.weight,
        model.output.weight,
        layer0.attention.wq.weight,
        layer0.feed_forward.w1.weight,
    ):
        assert weight.std().item() == pytest.approx(small, rel=0.05)
    for weight in (layer0.attention.wo.weight, layer0.feed_forward.w2.weight, layer1.attention.wo.weight):
        assert weight.std().item() == pytest.approx(wang, rel=0.05)
    if experts:
        assert layer1.feed_forward.w1.std().item() == pytest.approx(small, rel=0.05)
        assert layer1.feed_forward.w2.std().item() == pytest.approx(wang, rel=0.05)
        assert layer1.feed_forward.router.weight.std().item() == pytest.approx(small, rel=0.1)
    for name in ("muddpythia-1.4b", "muddpythia-2.8b", "pythia-1.4b", "pythia-2.8b"):
        assert MuddConfig.from_preset(name).init_method == "neox"
    assert MuddConfig.from_preset("muddpythia-tiny").init_method == "normal"


def test_compiles_with_fullgraph():
    # Eager takes the buffered mix; compiled takes the reference formula, which inductor fuses.
    model = build(connection="mudd", dense_norm="prepost")
    randomize_connection(model)
    x = ids()
    loss, grads = loss_and_grads(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    closs, cgrads = loss_and_grads(compiled, x)
    torch.testing.assert_close(closs, loss, atol=1e-5, rtol=1e-5)
    assert_grads_close(cgrads, grads)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection, dense_norm", [v for v in VARIANTS if v[0] != "residual"])
def test_buffered_mix_equals_reference_values_and_gradients(block, connection, dense_norm):
    results = {}
    for impl in ("reference", "matmul"):
        model = build(seed=4, block=block, connection=connection, dense_norm=dense_norm, mix_impl=impl)
        randomize_connection(model)
        results[impl] = loss_and_grads(model, ids())
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results["matmul"]
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    # The priors' gradients are sums over every token, which the two mixes add up in other orders (4e-6 seen).
    assert_grads_close(grads, ref_grads, rel=1e-5)


def test_inference_normalises_the_stacked_streams_in_one_call():
    # Without gradients the matmul mix hands the next block its four streams as views of one tensor, and
    # the block normalises q, k and v in one call: the same values as three norms.
    from muddformer.layers import Streams

    model = build(seed=4, connection="mudd").eval()
    randomize_connection(model)
    seen = []
    model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        logits = model(ids()).logits
        assert isinstance(seen[0], Streams)
        block = model.layers[1]
        for a, b in zip(block.attention_inputs(seen[0]), block.attention_inputs(tuple(seen[0]))):
            torch.testing.assert_close(a, b, atol=0, rtol=1e-6)
        reference = build(seed=4, connection="mudd", mix_impl="reference").eval()
        randomize_connection(reference)
        torch.testing.assert_close(logits, reference(ids()).logits, atol=1e-5, rtol=1e-5)


def test_compiled_mix_equals_reference_and_compiles_once_for_every_depth():
    # mix_impl="compiled": the forward and the gradients are formulas compiled with every size dynamic,
    # so a deeper model (more states per mix) runs the graphs the shallower one compiled.
    from torch._dynamo.utils import counters

    for n_layer in (2, 5):
        results = {}
        for impl in ("reference", "compiled"):
            model = build(seed=4, n_layer=n_layer, connection="mudd", mix_impl=impl)
            randomize_connection(model)
            results[impl] = loss_and_grads(model, ids())
        (ref_loss, ref_grads), (loss, grads) = results["reference"], results["compiled"]
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        assert_grads_close(grads, ref_grads)
        if n_layer == 2:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_auto_mix_compiles_on_the_cpu_only_for_large_states():
    from muddformer.kernels.depth_mix import COMPILE_MIN_ELEMENTS, CompiledMix, MatmulMix, mix_backend

    large = torch.empty(2, COMPILE_MIN_ELEMENTS // 64, 5, 32)  # 2^18 elements per state
    small = torch.empty(2, COMPILE_MIN_ELEMENTS // 64 - 1, 5, 32)
    assert mix_backend("auto", large) is CompiledMix
    assert mix_backend("auto", small) is MatmulMix
    assert mix_backend("matmul", large) is MatmulMix
    assert mix_backend("compiled", small) is CompiledMix


def test_a_failing_compile_warns_once_and_falls_back_to_the_matmul(monkeypatch):
    from muddformer.kernels import depth_mix_compiled
    from muddformer.kernels.depth_mix import MatmulMix, depth_mix, mix_backend

    def broken(formula, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler\nsecond line")

        return fail

    monkeypatch.setattr(depth_mix_compiled, "_failed", [])
    monkeypatch.setattr(depth_mix_compiled, "_compiled", {})
    monkeypatch.setattr(depth_mix_compiled.torch, "compile", broken)
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 3, 8, generator=g, requires_grad=True) for _ in range(3)]
    w = torch.randn(2, 3, 4, 3, generator=g, requires_grad=True)
    with pytest.warns(UserWarning, match="compiled depth mix failed \\(RuntimeError: no C\\+\\+ compiler\\)"):
        mixed = depth_mix(states, w, "compiled")
    for got, want in zip(mixed, depth_mix(states, w, "reference")):
        torch.testing.assert_close(got, want)
    assert mix_backend("compiled", torch.empty(2, 3, 3, 8)) is MatmulMix


def test_buffered_mix_keeps_one_copy_of_each_state():
    # The stored states live in the buffer; the block outputs themselves are not saved for backward.
    from muddformer.kernels.depth_mix import DepthBuffer, depth_mix_buffered

    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 3, 8, generator=g, requires_grad=True) for _ in range(3)]
    buffer = DepthBuffer(outs[0], 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        stored = [buffer.store(o * 1.0) for o in outs]
        w = torch.randn(2, 3, 4, 3, generator=g, requires_grad=True)
        mixed = depth_mix_buffered(buffer, stored, w, "matmul")
    sum(m.square().sum() for m in mixed).backward()
    buffer_ptr = buffer.data.untyped_storage().data_ptr()
    big = [t for t in saved if t.shape[-1] == 8]  # everything of width D
    assert big and all(t.untyped_storage().data_ptr() == buffer_ptr for t in big)
    for j, o in enumerate(outs):  # d/dX_j sum_c |mix_c|^2 = 2 sum_c w[..., c, j] mix_c
        expect = 2 * sum(w[..., c, j, None] * mixed[c] for c in range(4))
        torch.testing.assert_close(o.grad, expect.detach())


@pytest.mark.parametrize(
    "connection, dense_norm, block",
    [
        ("mudd", "none", "llama"),
        ("mudd", "prepost", "llama"),
        ("ddformer", "none", "pythia"),
        ("mudd", "none", "pythia"),
    ],
)
@pytest.mark.parametrize("checkpointed", [False, True])
def test_recompute_mix_equals_storing_and_saves_memory(connection, dense_norm, block, checkpointed):
    from muddformer.experiments.bench import saved_activation_bytes
    from muddformer.training.parallel import apply_activation_checkpointing

    results = {}
    for recompute in (False, True):
        model = build(seed=4, block=block, connection=connection, dense_norm=dense_norm, recompute_mix=recompute)
        randomize_connection(model)
        if checkpointed:
            apply_activation_checkpointing(model)
        x = ids()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = saved_activation_bytes(lambda: model(x, labels=x).loss, params)
        model.zero_grad(set_to_none=True)
        results[recompute] = (*loss_and_grads(model, x), saved)
    (loss, grads, saved), (rloss, rgrads, rsaved) = results[False], results[True]
    assert torch.equal(rloss, loss)
    assert_grads_close(rgrads, grads)
    if not checkpointed:
        assert rsaved < saved
