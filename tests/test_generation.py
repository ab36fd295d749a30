"""KV-cache generation: cached logits equal full forwards, padding, sampling, EOS, streaming, static cache."""

import pytest
import torch
from conftest import ALL_CONNECTIONS, FIXTURE_NAMES, build, randomize_connection, speedrun_options
from safetensors.torch import load_file

from muddformer import InputError, MuddForCausalLM
from muddformer.inference.generation import generate, process_logits
from muddformer.inference.kv_cache import KVCache, StaticKVCache

# The GPT-2 speedrun's additive form (per-aggregation sources, V mix after the projection) at build()'s 3 layers.
SPEEDRUN_3 = speedrun_options(3)


def model_for(connection="mudd", block="llama", **kw):
    model = build(block=block, connection=connection, **kw).eval()
    randomize_connection(model)
    return model


@pytest.mark.parametrize("block", ["llama", "pythia"])
@pytest.mark.parametrize("connection", ALL_CONNECTIONS + ["mudd-speedrun"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_decode_equals_full_forward_at_every_step(block, connection, kind):
    # In float64: the cached and full computations sum in different orders (a static cache attends over
    # all its slots), and float32 rounding of that reordering depends on the CPU's kernels.
    if connection == "mudd-speedrun":
        model = model_for("mudd", block, **SPEEDRUN_3)
        with torch.no_grad():  # the additive form starts at zero: give its mix something to add
            for b in model.connection.dense_bs.values():
                b.normal_(0, 0.5)
        model = model.double()
    else:
        model = model_for(connection, block).double()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cfg = model.config
        kv = (
            KVCache(cfg.n_layer)
            if kind == "dynamic"
            else StaticKVCache(cfg.n_layer, 2, cfg.n_head, cfg.head_dim, 24, torch.float64, "cpu")
        )
        pieces = [model(ids[:, :8], cache=kv).logits]
        for t in range(8, 20):
            pieces.append(model(ids[:, t : t + 1], cache=kv).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-11, rtol=1e-11)
    assert kv.get_seq_length() == 20


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_greedy_matches_reference_fixture(fixtures_dir, name, kind):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name)
    exp = load_file(fixtures_dir / name / "expected.safetensors")
    out = generate(model.model, exp["prompt_ids"], 9, cache=kind)
    assert out.tolist() == exp["greedy_ids"].tolist()


@pytest.mark.slow
def test_left_padded_batch_equals_one_by_one():
    model = model_for()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in (3, 7, 5)]
    P = max(len(p) for p in prompts)
    ids = torch.zeros(3, P, dtype=torch.long)
    mask = torch.zeros(3, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = p
        mask[i, P - len(p) :] = 1
    for kind in ("dynamic", "static"):
        batched = generate(model, ids, 8, attention_mask=mask, cache=kind)
        for i, p in enumerate(prompts):
            alone = generate(model, p[None], 8, cache=kind)
            assert batched[i, P:].tolist() == alone[0, len(p) :].tolist()


def test_seeded_sampling_is_reproducible_and_filters_work():
    model = model_for()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)
    a = generate(model, ids, 12, seed=7, **kw)
    b = generate(model, ids, 12, seed=7, **kw)
    c = generate(model, ids, 12, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(process_logits(logits, None, top_k=2)).tolist() == [[False, False, True, True, True]]
    # softmax of these logits: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps the first two
    assert torch.isinf(process_logits(logits, None, top_p=0.8)).tolist() == [[False, False, True, True, True]]
    seen = torch.tensor([[True, False, False, False, True]])
    penalised = process_logits(logits, seen, repetition_penalty=2.0)
    assert penalised.tolist() == [[1.5, 2.0, 1.0, 0.0, -2.0]]


def test_eos_finishes_rows_and_streaming_sees_every_token():
    model = model_for()
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, ids, 10)
    eos = int(free[0, 6])  # row 0's third new token
    streamed = []
    out = generate(model, ids, 10, eos_token_id=eos, pad_token_id=0, streamer=lambda t: streamed.append(t.tolist()))
    row0 = out[0, 4:].tolist()
    assert row0[:3] == free[0, 4:7].tolist() and all(t == 0 for t in row0[3:])
    assert [s[0] for s in streamed] == row0[: len(streamed)]
    assert len(streamed) == out.shape[1] - 4


def test_a_put_streamer_gets_the_prompt_then_each_token_as_from_transformers_generate():
    from transformers import GenerationConfig, TextStreamer

    class Recording(TextStreamer):  # transformers' own streamer class, its puts recorded
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    model = model_for()
    ids = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(3))
    ours, theirs = Recording(), Recording()
    out = generate(model, ids, 5, streamer=ours)
    hf = MuddForCausalLM(model.config, model=model).eval()
    hf.generate(ids, generation_config=GenerationConfig(max_new_tokens=5, do_sample=False), streamer=theirs)
    assert ours.puts == theirs.puts == [ids.tolist()] + [[t] for t in out[0, 4:].tolist()]
    assert ours.ended and theirs.ended
    with pytest.raises(
        InputError, match="a put\\(\\)/end\\(\\) streamer such as transformers' TextStreamer takes one row, got 2"
    ):
        generate(model, torch.cat([ids, ids]), 5, streamer=Recording())


def test_generation_refusals():
    model = model_for()
    ids = torch.ones(1, 20, dtype=torch.long)
    with pytest.raises(InputError, match="exceeds the context block_size=24"):
        generate(model, ids, 5)
    with pytest.raises(InputError, match="temperature must be > 0"):
        generate(model, ids, 2, do_sample=True, temperature=0)
    with pytest.raises(InputError, match="top_p must be in"):
        generate(model, ids, 2, do_sample=True, top_p=1.5)
    with pytest.raises(InputError, match="cache must be"):
        generate(model, ids, 2, cache="paged")
    right_padded = torch.ones(2, 6, dtype=torch.long)
    right_padded[1, 4:] = 0
    with pytest.raises(InputError, match="attention_mask has padding at the end of a row; .* pad on the left"):
        generate(model, torch.ones(2, 6, dtype=torch.long), 2, attention_mask=right_padded)
    with pytest.raises(InputError, match=r"compile=True compiles the static cache's decode step; pass cache='static'"):
        generate(model, ids, 2, compile=True)


def test_compiled_static_decode_matches_eager():
    model = model_for()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    eager = generate(model, ids, 8, cache="static")
    compiled = generate(model, ids, 8, cache="static", compile=True)
    assert torch.equal(eager, compiled)
