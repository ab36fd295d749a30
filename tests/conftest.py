"""Shared test helpers: the reference fixtures and small models."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from muddformer import MuddConfig, MuddModel
from muddformer.layers import AttentionContext

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MUDD_FIXTURES", REPO.parent / "shared" / "fixtures" / "official"))
FIXTURE_NAMES = ["mf_tiny", "mp_tiny"]
# Logit tolerances stated in each fixture's README.txt.
FIXTURE_TOL = {"mf_tiny": 2e-5, "mp_tiny": 1e-5}
DENSE_CONNECTIONS = ["residual", "mudd", "ddformer", "denseformer", "mudd-static"]  # residual and the dense family
RIVAL_CONNECTIONS = [
    "hc",
    "mhc",
    "attnres",
    "attnres-block",
]  # act around each sub-layer (connections/hyper.py, attn_residual.py)
ALL_CONNECTIONS = DENSE_CONNECTIONS + RIVAL_CONNECTIONS
# Modules whose tests call dependencies' APIs that drift between releases (transformers, generation, lm-eval,
# safetensors, tokenizers, triton, parity, registration): marked `upstream`, run by `make test-latest` and
# `make test-oldest`.
UPSTREAM_MODULES = {
    "test_dependencies",
    "test_hf_eval",
    "test_generation",
    "test_parity",
    "test_refusals",
    "test_data",
    "test_triton_kernel",
    "test_layout",  # transformers' registration, in either import order
}


# Whole modules under one marker (pyproject.toml lists the markers; `-m "not slow"` gives a quick run).
MODULE_MARKERS = {
    "test_parity": ("parity",),
    "test_distributed": ("distributed", "slow"),
}


def pytest_collection_modifyitems(items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.module.__name__ in UPSTREAM_MODULES:
            item.add_marker(pytest.mark.upstream)
        for name in MODULE_MARKERS.get(item.module.__name__, ()):
            item.add_marker(getattr(pytest.mark, name))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    """Dynamo counts recompilations per function across every model of the process: without a reset after
    each test, the tests that compile would together reach its limit (8) and fail whichever test comes ninth."""
    yield
    torch.compiler.reset()


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """torch.compile through dynamo and AOT autograd without inductor's code generation, for tests that call
    library code which compiles: what our code controls (one graph, the checkpoint/recompute partition, the
    values) is checked there, at a fraction of the compile time. Inductor itself runs in the tests that
    compile without this fixture (test_connections, test_model_pieces, test_generation, test_distributed)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(
            f"reference fixtures not found at {FIXTURES}; set MUDD_FIXTURES to the shared/fixtures/official folder"
        )
    return FIXTURES


def small_config(**overrides) -> MuddConfig:
    base = dict(vocab_size=97, n_layer=3, dim=32, n_head=2, block_size=24, intermediate_size=192, init_std=0.1)
    return MuddConfig(**{**base, **overrides})


def build(seed: int = 0, **overrides) -> MuddModel:
    torch.manual_seed(seed)
    return MuddModel(small_config(**overrides))


def assert_causal(model: MuddModel, x: torch.Tensor, cut: int, atol: float = 1e-6) -> None:
    """Changing the tokens from position `cut` on leaves every earlier position's logits as they were, and
    changes the later ones."""
    y = x.clone()
    y[:, cut:] = (y[:, cut:] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=atol, rtol=0)
    assert (a[:, cut:] - b[:, cut:]).abs().max() > 1e-4


def randomize_connection(model: MuddModel, seed: int = 1, scale: float = 0.3) -> None:
    """Move the connection away from its identity init so that every dense path is active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.connection.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def loss_and_grads(model, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The language-model loss of x and every parameter's gradient (the model's grads are reset)."""
    params = dict(getattr(model, "_orig_mod", model).named_parameters())  # names without a compile wrapper
    for p in params.values():
        p.grad = None
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in params.items()}


def assert_grads_close(grads: dict, expected: dict, rel: float = 2e-6) -> None:
    """Equal up to float32 rounding, measured against each gradient's own scale."""
    assert grads.keys() == expected.keys()
    for name, want in expected.items():
        assert (grads[name] - want).abs().max() <= rel * want.abs().max() + 1e-7, name


def mudd_in_process(*args) -> subprocess.CompletedProcess:
    """Run `mudd ARGS...` in this process, its output captured: main() is what the script calls, and a subprocess
    would spend seconds importing torch again."""
    from muddformer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_cli():
    return mudd_in_process


def assert_one_line_error(proc, *words):
    """The command failed with exit code 2 and one `mudd: error:` line naming each word."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("mudd: error: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    for word in words:
        assert word in proc.stderr


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory) -> Path:
    """One MUDD_CACHE for the tests that train on the default data: the bundled corpus is tokenised into it
    (tens of seconds) by whichever runs first."""
    return tmp_path_factory.mktemp("mudd-cache")


@pytest.fixture(scope="session")
def play_data(tmp_path_factory):
    """Four plays of the bundled corpus tokenised with a 512-token BPE (the `nano` preset's vocabulary)."""
    from muddformer.data.corpus import bundled_plays
    from muddformer.data.shards import prepare_documents

    plays = {p["name"]: p["text"] for p in bundled_plays()}
    docs = {"train": [plays["macbeth"], plays["hamlet"], plays["othello"]], "val": [plays["the-tempest"]]}
    out = tmp_path_factory.mktemp("data") / "plays-bpe512"
    prepare_documents(docs, out, vocab_size=512)
    return out


def chosen(cfg: MuddConfig, layer: int) -> tuple[list[str], list[int]] | None:
    """Streams and sources of the aggregation after block `layer`, derived from the options' documented meaning."""
    L, newest = cfg.n_layer, layer + 1
    layers = "all" if cfg.dense_layers == "all" else [int(v) % L for v in cfg.dense_layers.split(",")]
    if (layers != "all" and layer not in layers) or newest % cfg.dense_period:
        return None
    multiway = cfg.connection in ("mudd", "mudd-static")
    names = ["r"] if not multiway or layer == L - 1 else list("qkvr")
    streams = [s for s in names if s in cfg.dense_streams] if multiway else names
    text, allowed = cfg.dense_sources, None
    if ":" in text:  # per aggregation, "LAYER:STATES;...": unlisted aggregations read every state
        table = {int(k) % L: v for k, _, v in (item.partition(":") for item in text.split(";"))}
        text = table.get(layer, "all")
    if text != "all":
        allowed = [int(v) for v in text.split(",")]
    sources = [j for j in range(newest) if (allowed is None or j in allowed) and (newest - j) % cfg.dense_dilation == 0]
    if cfg.dense_mix == "replace" or allowed is None or newest in allowed:
        sources.append(newest)
    return (streams, sources) if streams and sources else None


def nano_run(data, out, **overrides):
    """A TrainConfig of a few quiet steps of the nano preset (no progress bar, sample or TensorBoard)."""
    from muddformer.training.config import TrainConfig

    base = dict(
        preset="nano",
        data=str(data),
        out=str(out),
        max_steps=2,
        batch_size=2,
        seq_len=16,
        eval_every=2,
        save_every=2,
        eval_windows=2,
        sample_tokens=0,
        tensorboard=False,
        progress=False,
    )
    return TrainConfig(**{**base, **overrides})


def speedrun_options(n_layer: int, hidden: int = 16) -> dict:
    """The GPT-2 speedrun's MUDD form (presets.speedrun_mudd) as build() options, with a narrower generator."""
    from muddformer.presets import speedrun_mudd

    return {k: v for k, v in speedrun_mudd(n_layer).items() if k != "connection"} | {"dense_hidden": hidden}


def explicit_dense_forward(model: MuddModel, x: torch.Tensor) -> torch.Tensor:
    """The dense computation written out from architecture §2.2 / §2.8 and the sparse options' documented meaning,
    independent of the connection classes: unselected aggregations and streams pass the newest state on."""
    cfg, conn = model.config, model.connection
    prepost = cfg.dense_norm == "prepost"
    rope = model.rope[: x.shape[1]][None]
    h = model.tok_embeddings(x)
    stored = [conn.pre_norms[0](h) if prepost else h]
    inputs, value_mix = h, None
    for layer, block in enumerate(model.layers):
        if value_mix is None:
            out = block(inputs, AttentionContext(rope=rope))
        else:  # the V mix joins the value projection's output (a hook, not the model's own path)
            handle = block.attention.wv.register_forward_hook(lambda mod, args, v, extra=value_mix: v + extra)
            out = block(inputs, AttentionContext(rope=rope))
            handle.remove()
            value_mix = None
        stored.append(conn.pre_norms[layer + 1](out) if prepost else out)
        plan = chosen(cfg, layer)
        if plan is None:
            inputs = out
            continue
        streams, sources = plan
        weights = conn.dense_bs[str(layer)][:, None, None, :]  # (C, 1, 1, n)
        if cfg.connection in ("mudd", "ddformer"):  # the dynamic ones
            gen = conn.dynamic_dense[str(layer)]
            normed = gen.norm(out) if prepost else out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
            normed = normed if prepost or cfg.dense_gen_norm else out
            flat = (F.gelu(normed @ gen.w1.weight.T) @ gen.w2.weight.T) * cfg.dense_gen_scale
            if cfg.dense_cap:
                flat = cfg.dense_cap * torch.tanh(flat / cfg.dense_cap)
            weights = weights + flat.unflatten(-1, (len(streams), len(sources))).movedim(-2, 0)
        states = torch.stack([stored[j] for j in sources])  # (n, B, T, D)
        mixed = {
            s: torch.einsum("btj,jbtd->btd", weights[c].expand(*out.shape[:2], -1), states)
            for c, s in enumerate(streams)
        }
        if prepost:
            mixed = {s: out + (conn.post_norms[layer](m) if s == "r" else m) for s, m in mixed.items()}
        elif cfg.dense_mix == "add":
            scale = cfg.dense_add_scale / (len(sources) ** 0.5 if cfg.dense_add_scale_by_sources else 1.0)
            names = "qkvr" if cfg.connection.startswith("mudd") and layer < cfg.n_layer - 1 else "r"
            gains = {s: cfg.dense_v_gain if s == "v" and names == "qkvr" else 1.0 for s in mixed}
            if cfg.dense_v_after_proj and names == "qkvr":  # q, k, v read R; the V mix is added after W_v
                value_mix = scale * gains["v"] * mixed.pop("v")
            mixed = {s: out + scale * gains[s] * m for s, m in mixed.items()}
            if cfg.dense_v_after_proj and names == "qkvr":
                inputs = mixed.get("r", out)
                continue
        names = "qkvr" if cfg.connection.startswith("mudd") and layer < cfg.n_layer - 1 else "r"
        full = [mixed.get(s, out) for s in names]
        inputs = tuple(full) if len(full) == 4 else full[0]
    return model.output(model.norm(inputs))
