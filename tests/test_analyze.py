"""`mudd analyze` and analyze_model: block-input similarity, head activity, dense-weight means."""

import json
import math
import shutil

import pytest
import torch
from conftest import FIXTURE_NAMES, assert_one_line_error, build, randomize_connection

import muddformer.data.shards
import muddformer.experiments.analyze.tokens
from muddformer import layers
from muddformer.adapters.folders import save_model
from muddformer.data.tokenizers import export_tokenizer, load_tokenizer
from muddformer.experiments.analyze.probes import analyze_model
from muddformer.experiments.analyze.tokens import bundled_validation_tokens, cut_sequences, parse_sink_tokens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_by_hand(model, x: torch.Tensor) -> tuple[list, list]:
    """The body loop written out: each block's input and the dense weights made from each block's output."""
    conn = model.connection
    ctx = model.attention_context(x, None, None, None, None)
    state = conn.begin(model.tok_embeddings(x))
    inputs, weights = [], []
    with torch.no_grad():
        for layer, block in enumerate(model.layers):
            inputs.append(conn.block_input(state, layer))
            out = block(inputs[-1], ctx)
            dense = hasattr(conn, "dense_weights") and conn.plan[layer] is not None  # sparse ones skip layers
            weights.append(conn.dense_weights(layer, out) if dense else None)
            conn.advance(state, layer, out)
    return inputs, weights


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


# ---- representation collapse -------------------------------------------------------------------
@pytest.mark.parametrize("connection", ["mudd", "residual", "ddformer"])
def test_cosine_of_adjacent_block_inputs(connection):
    model = build(connection=connection)
    randomize_connection(model)
    batches = [torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    report = analyze_model(model, batches, [], sink_positions=2)
    cos = report["cosine_similarity"]
    multiway = connection == "mudd"
    assert cos["streams"] == (["q", "k", "v", "r"] if multiway else ["x"])
    assert report["tokens"] == 96 and report["sequences"] == 4
    runs = [run_by_hand(model, x)[0] for x in batches]
    for s, stream in enumerate(cos["streams"]):
        for layer in range(model.config.n_layer - 1):
            pick = lambda x: x[s] if isinstance(x, tuple) else x  # noqa: E731 - the embedding feeds every stream
            sims = torch.cat([cosine(pick(inputs[layer]), pick(inputs[layer + 1])).flatten() for inputs in runs])
            assert cos["mean"][stream][layer] == pytest.approx(sims.mean().item(), abs=1e-6)


def test_rival_connections_report_the_attention_input_and_no_dense_weights():
    model = build(connection="hc")
    randomize_connection(model)
    report = analyze_model(model, [torch.randint(0, 97, (2, 16))], [], 2)
    values = report["cosine_similarity"]["mean"]["x"]
    assert len(values) == 2 and all(-1 <= v <= 1 for v in values)
    assert "not a dense connection" in report["dense_weights"]["note"]
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.layers)  # hooks removed


# ---- attention-head activity -------------------------------------------------------------------
def test_uniform_attention_puts_every_maximum_on_position_zero():
    model = build(connection="mudd")
    with torch.no_grad():
        for block in model.layers:  # q = k = 0: uniform attention, argmax = the first key
            block.attention.wq.weight.zero_()
            block.attention.wk.weight.zero_()
    x = torch.randint(0, 97, (2, 20))
    assert analyze_model(model, [x], [], sink_positions=1)["head_activation"]["ratio"] == [0.0, 0.0, 0.0]
    assert analyze_model(model, [x], [], sink_positions=0)["head_activation"]["ratio"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("block", ["llama", "pythia"])
def test_head_activation_counted_by_hand(monkeypatch, block):
    model = build(connection="mudd", block=block, attn_impl="reference", n_head=4)
    randomize_connection(model)
    seen = []  # q and k exactly as each attention module hands them to the softmax

    def recording(q, k, v, softmax_float32, mask=None):
        seen.append((q.detach().clone(), k.detach().clone()))
        return reference_attention(q, k, v, softmax_float32, mask)

    reference_attention = layers.reference_attention
    monkeypatch.setattr(layers, "reference_attention", recording)
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    sinks = [int(x[0, 5]), int(x[1, 9])]
    with torch.no_grad():
        model(x)
    report = analyze_model(model, [x], sinks, sink_positions=2)["head_activation"]
    for layer, (q, k) in enumerate(seen[: model.config.n_layer]):
        B, H, T, d = q.shape
        active = torch.zeros(H, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                for i in range(2, T):
                    scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in range(i + 1)]
                    top = max(range(i + 1), key=lambda j: scores[j])
                    active[h] += not (top < 2 or int(x[b, top]) in sinks)
        assert report["per_head"][layer] == pytest.approx((active / (B * (T - 2))).tolist(), abs=1e-12)
        assert report["ratio"][layer] == pytest.approx(active.sum().item() / (H * B * (T - 2)), abs=1e-12)
        assert report["query_positions"][layer] == B * (T - 2)


def test_queries_and_keys_are_what_the_module_attends_with():
    model = build(connection="mudd", attn_impl="reference")
    randomize_connection(model)
    x = torch.randint(0, 97, (2, 12))
    captured = []
    hook = model.layers[1].attention.register_forward_hook(lambda m, args, out: captured.append((args, out)))
    with torch.no_grad():
        model(x)
        hook.remove()
        (xq, xk, xv, ctx), out = captured[0]
        attn = model.layers[1].attention
        q, k = attn.queries_and_keys(xq, xk, ctx.rope)
        v = attn.wv(xv).view(2, 12, attn.n_head, attn.head_dim).transpose(1, 2)
        probs = torch.softmax(
            (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).masked_fill(
                ~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf")
            ),
            -1,
        )
        torch.testing.assert_close(attn.wo((probs @ v).transpose(1, 2).reshape(2, 12, -1)), out)


# ---- dense weights -------------------------------------------------------------------------------
def test_fresh_mudd_weights_are_one_hot_on_the_newest_state():
    model = build(connection="mudd")
    dense = analyze_model(model, [torch.randint(0, 97, (2, 16))], [], 2)["dense_weights"]
    L = model.config.n_layer
    assert dense["streams"] == ["q", "k", "v", "r"]
    for stream, grid in dense["mean"].items():
        for layer, row in enumerate(grid):
            if layer == L - 1 and stream != "r":  # the last aggregation makes the R stream only
                assert row == [None] * (L + 1)
            else:
                assert row == [0.0] * (layer + 1) + [1.0] + [None] * (L - layer - 1)


@pytest.mark.parametrize("connection", ["mudd", "denseformer"])
def test_randomized_weights_are_the_mean_of_dense_weights(connection):
    model = build(connection=connection)
    randomize_connection(model)
    batches = [torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    dense = analyze_model(model, batches, [], 2)["dense_weights"]
    runs = [run_by_hand(model, x)[1] for x in batches]
    streams = dense["streams"]
    for layer in range(model.config.n_layer):
        w = torch.cat([run[layer].expand(2, 16, -1, -1).reshape(32, *run[layer].shape[2:]) for run in runs])
        mean = w.double().mean(0)  # (C, n)
        names = streams if mean.shape[0] == len(streams) else streams[-1:]
        for c, name in enumerate(names):
            assert dense["mean"][name][layer][: layer + 2] == pytest.approx(mean[c].tolist(), rel=1e-6, abs=1e-7)


def test_sparse_weights_fill_only_the_cells_that_are_read():
    model = build(n_layer=4, dense_sources="0,2", dense_streams="vr", dense_period=2)
    randomize_connection(model)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(6))
    dense = analyze_model(model, [x], [], 2)["dense_weights"]
    weights = run_by_hand(model, x)[1]
    for layer, agg in enumerate(model.connection.plan):
        names = ["r"] if layer == 3 else [n for i, n in enumerate("qkvr") if agg and i in agg.streams]
        for stream in "qkvr":
            row = dense["mean"][stream][layer]
            if agg is None or stream not in names:
                assert row == [None] * 5
                continue
            mean = weights[layer][..., names.index(stream), :].double().mean((0, 1)).tolist()
            assert [row[j] for j in agg.sources] == pytest.approx(mean, rel=1e-6, abs=1e-7)
            assert all(row[j] is None for j in range(5) if j not in agg.sources)


def test_speedrun_form_reports_its_single_input_and_the_weights_it_reads():
    model = build(
        n_layer=4,
        connection="mudd",
        dense_mix="add",
        dense_gen_norm=False,
        dense_layers="-2,-1",
        dense_sources="-2:0,1,3;-1:0,3",
        dense_streams="vr",
        dense_v_after_proj=True,
    )
    randomize_connection(model)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(6))
    report = analyze_model(model, [x], [], 2)
    assert report["cosine_similarity"]["streams"] == ["x"]  # q, k and v read one input
    weights = run_by_hand(model, x)[1]
    for layer, stream, index in ((2, "v", 0), (2, "r", 1), (3, "r", 0)):
        row = report["dense_weights"]["mean"][stream][layer]
        mean = weights[layer][..., index, :].double().mean((0, 1)).tolist()
        assert [row[j] for j in model.connection.plan[layer].sources] == pytest.approx(mean, rel=1e-6, abs=1e-7)


# ---- helpers -----------------------------------------------------------------------------------------
def test_sequences_and_sink_token_parsing():
    assert cut_sequences(list(range(10)), 4, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert cut_sequences([1, 2, 3], 8, 2).tolist() == [[1, 2, 3]]
    assert parse_sink_tokens(".,\\n") == [".", "\n"] and parse_sink_tokens("") == []


# ---- the command -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(play_data, tmp_path_factory):
    """A random MUDD folder and a residual folder with the 512-token BPE of `play_data`."""
    root = tmp_path_factory.mktemp("analyze")
    made = {}
    for connection in ("mudd", "residual"):
        model = build(connection=connection, vocab_size=512, block_size=64)
        randomize_connection(model)
        save_model(model, str(root / connection))
        export_tokenizer(play_data / "tokenizer.json", root / connection, 64)
        made[connection] = root / connection
    return made


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    """A character-level tokenizer (no merges, no special tokens) whose ids fit the fixtures' vocabulary of 256."""
    from tokenizers import Tokenizer, models, trainers

    text = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n" * 8
    tok = Tokenizer(models.BPE())
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=1, show_progress=False))
    folder = tmp_path_factory.mktemp("chartok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "text.txt").write_text(text)
    return folder


@pytest.mark.slow
def test_cli_compare_on_the_bundled_validation_text(folders, play_data, tmp_path, run_cli, monkeypatch):
    # A cache holding play_data as the prepared bundled corpus of this vocabulary: same layout, same tokenizer.
    monkeypatch.setenv("MUDD_CACHE", str(tmp_path / "cache"))
    shutil.copytree(play_data, tmp_path / "cache" / "data" / "shakespeare-bpe512")
    out = tmp_path / "out"
    proc = run_cli(
        "analyze",
        folders["mudd"],
        "--compare",
        folders["residual"],
        "--out",
        out,
        "--max-tokens",
        200,
        "--seq-len",
        32,
        "--batch-size",
        2,
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert "active heads" in proc.stdout and "cos q (l, l+1)" in proc.stdout and "cos x (l, l+1)" in proc.stdout
    result = json.loads((out / "analysis.json").read_text())
    assert result["settings"]["sink_positions"] == 2 and result["settings"]["sink_tokens"] == [".", "\n"]
    first, second = result["models"]
    assert first["folder"] == str(folders["mudd"]) and second["connection"] == "residual"
    assert first["text"] == "bundled corpus, validation split" and first["tokens"] == 192 and first["sequences"] == 6
    tok = load_tokenizer(play_data / "tokenizer.json")
    assert {s["text"] for s in first["sink_tokens"]} == {".", "\n", "<|endoftext|>"}
    assert {s["id"] for s in first["sink_tokens"]} >= {tok.token_to_id("<|endoftext|>")}
    assert len(first["head_activation"]["ratio"]) == 3 and all(0 <= r <= 1 for r in first["head_activation"]["ratio"])
    assert set(first["cosine_similarity"]["mean"]) == {"q", "k", "v", "r"}
    assert list(second["cosine_similarity"]["mean"]) == ["x"] and "note" in second["dense_weights"]
    assert first["dense_weights"]["mean"]["r"][2][:4] != [None] * 4
    assert result["plots"] == ["cosine_similarity.png", "head_activation.png", "dense_weights.png"]
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_cli_published_folder_with_text(fixtures_dir, char_tokenizer, tmp_path, run_cli, name):
    proc = run_cli(
        "analyze",
        fixtures_dir / name,
        "--tokenizer",
        char_tokenizer / "tokenizer.json",
        "--text",
        char_tokenizer / "text.txt",
        "--out",
        tmp_path,
        "--seq-len",
        48,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    model = result["models"][0]
    assert model["text"] == str(char_tokenizer / "text.txt") and model["connection"] == "mudd"
    assert model["tokens"] % 48 == 0 and model["tokens"] > 0
    assert {s["text"] for s in model["sink_tokens"]} == {".", "\n"}
    L = model["n_layer"]
    assert len(model["dense_weights"]["mean"]["q"]) == L and len(model["cosine_similarity"]["mean"]["v"]) == L - 1
    assert json.loads((tmp_path / "analysis.json").read_text()) == result
    assert (tmp_path / "dense_weights.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_refusals(fixtures_dir, char_tokenizer, folders, tmp_path, run_cli):
    assert_one_line_error(
        run_cli(
            "analyze", fixtures_dir / "mf_tiny", "--tokenizer", char_tokenizer / "tokenizer.json", "--out", tmp_path
        ),
        "--text",
        "bundled",
    )
    assert_one_line_error(run_cli("analyze", tmp_path / "missing", "--out", tmp_path), "does not exist")
    assert_one_line_error(
        run_cli("analyze", folders["mudd"], "--compare", tmp_path / "gone", "--out", tmp_path), "gone", "does not exist"
    )
    assert_one_line_error(
        run_cli("analyze", fixtures_dir / "mf_tiny", "--text", char_tokenizer / "text.txt", "--out", tmp_path),
        "tokenizer.json",
    )
    assert_one_line_error(
        run_cli("analyze", folders["mudd"], "--text", char_tokenizer / "text.txt", "--seq-len", 65, "--out", tmp_path),
        "block_size=64",
    )


def test_bundled_text_is_prepared_only_for_a_run_on_the_bundled_corpus(folders, play_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MUDD_CACHE", str(tmp_path / "empty-cache"))
    tokenizer = folders["mudd"] / "tokenizer.json"

    def refuse(vocab_size=8192):
        raise AssertionError("prepared the bundled corpus without a reason")

    monkeypatch.setattr(muddformer.experiments.analyze.tokens, "bundled_data_dir", refuse)
    assert bundled_validation_tokens(tokenizer, str(folders["mudd"]), 100) is None
    # A checkpoint of a run whose run.json names the bundled corpus: prepared (here: play_data) and read.
    step = tmp_path / "run" / "checkpoints" / "step_000010"
    shutil.copytree(folders["mudd"], step)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"data_meta": {"source": "bundled:shakespeare"}}))
    monkeypatch.setattr(muddformer.experiments.analyze.tokens, "bundled_data_dir", lambda vocab_size=8192: play_data)
    ids = bundled_validation_tokens(step / "tokenizer.json", str(step), 100)
    assert len(ids) == 100 and ids == muddformer.data.shards.TokenData(play_data).splits["val"].window(0, 100).tolist()
