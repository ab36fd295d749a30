"""Parameter counts and tensor shapes of the published models, built on the meta device (architecture §3.2)."""

import pytest
import torch

from muddformer import MuddConfig, MuddModel, count_parameters
from muddformer.adapters.published import ours_to_published

SPEC = {  # total, dense-connection, state-dict keys
    "muddformer-2.8b": (2_804_871_709, 8_775_709, 513),
    "muddpythia-1.4b": (1_419_950_149, 4_583_493, 600),
    "muddpythia-2.8b": (2_784_962_589, 8_775_709, 800),
}


def meta_model(name: str) -> MuddModel:
    with torch.device("meta"):
        return MuddModel(MuddConfig.from_preset(name))


@pytest.mark.parametrize("name", list(SPEC))
def test_published_counts(name):
    model = meta_model(name)
    counts = count_parameters(model)
    total, dense, keys = SPEC[name]
    assert counts["total"] == total
    assert counts["dense"] == dense
    assert len(model.state_dict()) == keys
    assert counts["dense_pct"] == pytest.approx(100 * dense / total)


def test_muddformer_2p8b_shapes():
    shapes = {ours_to_published(k): tuple(v.shape) for k, v in meta_model("muddformer-2.8b").state_dict().items()}
    assert shapes["dynamic_dense.0.w2.weight"] == (8, 64)
    assert shapes["dynamic_dense.15.w2.weight"] == (68, 128)
    assert shapes["dynamic_dense.30.w2.weight"] == (128, 192)
    assert shapes["dynamic_dense.31.w2.weight"] == (33, 192)
    assert shapes["dense_bs.31"] == (1, 33)
    widths = [shapes[f"dynamic_dense.{l}.w1.weight"][0] for l in range(32)]
    assert widths == [64] * 14 + [128] * 16 + [192] * 2
    assert "layers.0.attention_norm.weight" in shapes and "layers.0.attention_norms.0.weight" not in shapes
    assert "layers.5.attention_norms.2.weight" in shapes and "layers.5.attention_norm.weight" not in shapes


def test_muddpythia_1p4b_shapes():
    shapes = {ours_to_published(k): tuple(v.shape) for k, v in meta_model("muddpythia-1.4b").state_dict().items()}
    assert shapes["dynamic_dense.23.w1.weight"] == (128, 2048)
    assert shapes["dynamic_dense.23.w2.weight"] == (25, 128)
    assert [shapes[f"dynamic_dense.{l}.w1.weight"][0] for l in range(24)] == [64] * 14 + [128] * 10
    assert shapes["layers.3.attention.wq.bias"] == (2048,)
    assert shapes["layers.1.feed_forward.w1.bias"] == (4480,)


def test_pythia_baseline_has_the_real_pythia_count():
    # EleutherAI Pythia-1.4B: 1,414,647,808 parameters (vocab 50304, untied, parallel residual).
    assert count_parameters(meta_model("pythia-1.4b"))["total"] == 1_414_647_808
    assert count_parameters(meta_model("pythia-1.4b"))["dense"] == 0
