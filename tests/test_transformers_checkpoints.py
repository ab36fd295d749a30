"""Llama, Qwen2, Qwen3 and GPT-NeoX checkpoints of transformers' own classes, converted: the same logits as
transformers' model as residual models, and exactly the converted residual model's with any connection."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config

from muddformer.adapters.folders import read_tensors
from muddformer.adapters.transformers_checkpoints import load_transformers_model
from muddformer.errors import CheckpointError

SIZE = dict(vocab_size=101, hidden_size=48, num_attention_heads=4, num_hidden_layers=3, intermediate_size=80)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SIZE, num_key_value_heads=2, max_position_embeddings=128),
    "llama3": lambda: LlamaConfig(
        **SIZE, num_key_value_heads=2, max_position_embeddings=128, rope_parameters=LLAMA3_ROPE
    ),
    "qwen2": lambda: Qwen2Config(**SIZE, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128),
    "qwen3": lambda: Qwen3Config(**SIZE, num_key_value_heads=1, head_dim=12, max_position_embeddings=128),
    "gpt_neox": lambda: GPTNeoXConfig(**SIZE, max_position_embeddings=128, rotary_pct=0.5),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[request.param]())
    with torch.no_grad():  # random norms and biases, so that every mapped tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.5 if "norm" in name else 0.0, 0.2)
    folder = tmp_path_factory.mktemp("hf") / request.param
    model.save_pretrained(folder)
    return folder, model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))


def test_a_converted_residual_model_computes_transformers_logits(checkpoint):
    folder, reference = checkpoint
    ours = load_transformers_model(str(folder))
    with torch.no_grad():
        want, got = reference(tokens()).logits, ours(tokens()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize(
    "options",
    [dict(connection="mudd"), dict(connection="hc"), dict(connection="mudd", dense_layers="-2", dense_streams="vr")],
)
def test_any_connection_starts_as_the_converted_model(checkpoint, options):
    folder, _ = checkpoint
    residual = load_transformers_model(str(folder))
    dense = load_transformers_model(str(folder), **options)
    with torch.no_grad():
        torch.testing.assert_close(dense(tokens()).logits, residual(tokens()).logits, atol=1e-6, rtol=1e-6)


def test_unsupported_features_are_refused(tmp_path):
    from transformers import MistralConfig

    model = AutoModelForCausalLM.from_config(MistralConfig(**SIZE, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "mistral")
    with pytest.raises(CheckpointError, match="model_type 'mistral' cannot be converted"):
        load_transformers_model(str(tmp_path / "mistral"))
    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=64)
    AutoModelForCausalLM.from_config(LlamaConfig(**SIZE, rope_parameters=rope)).save_pretrained(tmp_path / "yarn")
    with pytest.raises(CheckpointError, match="rope type 'yarn' cannot be converted"):
        load_transformers_model(str(tmp_path / "yarn"))


def test_mudd_convert_writes_a_folder_that_loads_with_the_same_logits(checkpoint, tmp_path):
    from muddformer.adapters.folders import load_model
    from muddformer.cli import main

    folder, reference = checkpoint
    dst = tmp_path / "mudd"
    assert main(["convert", str(folder), str(dst), "--connection", "mudd", "--set", "dense_streams=vr"]) == 0
    model = load_model(str(dst))
    assert model.config.connection == "mudd" and model.config.dense_streams == "vr"
    with torch.no_grad():
        want = reference(tokens()).logits
        torch.testing.assert_close(model(tokens()).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_convert_keeps_the_stored_dtype_and_every_end_of_text_id(tmp_path, capsys):
    from muddformer import MuddForCausalLM
    from muddformer.adapters.folders import load_model, read_tensors
    from muddformer.cli import main

    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**SIZE, max_position_embeddings=64, eos_token_id=[2, 7]))
    llama.to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    generation = tmp_path / "llama" / "generation_config.json"
    settings = json.loads(generation.read_text())
    assert settings["eos_token_id"] == [2, 7]  # what transformers wrote from the config
    generation.write_text(json.dumps({**settings, "eos_token_id": [2, 9]}))  # transformers' generate reads this one
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "ours")]) == 0
    assert load_model(str(tmp_path / "ours")).config.eos_token_id == [2, 9]
    assert {t.dtype for t in read_tensors(str(tmp_path / "ours")).values()} == {torch.bfloat16}
    assert MuddForCausalLM.from_pretrained(tmp_path / "ours").generation_config.eos_token_id == [2, 9]
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert {t.dtype for t in read_tensors(str(tmp_path / "f32")).values()} == {torch.float32}
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "attnres"), "--connection", "attnres"]) == 0
    assert "note: AttnRes starts as a mean of its sources" in capsys.readouterr().out


def test_training_starts_from_a_converted_checkpoint(play_data, tmp_path):
    # `mudd convert` a Llama, then `mudd train --init-from` it with MUDD added, at a learning rate of 1e-30: the
    # checkpoint holds the Llama's weights unchanged and a connection still at the identity, so it computes
    # the Llama's logits.
    from conftest import nano_run

    from muddformer.adapters.folders import load_model
    from muddformer.cli import main
    from muddformer.training.trainer import train

    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**{**SIZE, "vocab_size": 512}, max_position_embeddings=64))
    llama.save_pretrained(tmp_path / "llama")
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "ours")]) == 0
    run = nano_run(play_data, tmp_path / "run", init_from=str(tmp_path / "ours"), connection="mudd", lr=1e-30)
    train(run)
    # The transformers folder itself works as well.
    run = nano_run(play_data, tmp_path / "run_hf", init_from=str(tmp_path / "llama"), connection="mudd", lr=1e-30)
    train(run)
    trained = load_model(str(tmp_path / "run_hf" / "checkpoints" / "step_000002"))
    first = load_model(str(tmp_path / "run" / "checkpoints" / "step_000002"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), trained.state_dict().values()))
    assert trained.config.connection == "mudd" and trained.config.n_layer == 3
    x = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = llama.eval()(x).logits
        torch.testing.assert_close(trained(x).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_a_converted_model_goes_back_to_the_same_transformers_checkpoint(checkpoint, tmp_path):
    # transformers -> ours -> transformers: AutoModelForCausalLM loads the result (no muddformer class in it)
    # and it computes the original's logits.
    from muddformer.cli import main

    folder, reference = checkpoint
    assert main(["convert", str(folder), str(tmp_path / "ours")]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--transformers-format"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(reference) and "muddformer" not in type(back).__module__
    with torch.no_grad():
        want = reference(tokens()).logits
        torch.testing.assert_close(back(tokens()).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # --dtype applies to this format too; the tokenizer files travel along every conversion.
    (tmp_path / "ours" / "tokenizer.json").write_text("{}")
    half = tmp_path / "half"
    assert main(["convert", str(tmp_path / "ours"), str(half), "--transformers-format", "--dtype", "bfloat16"]) == 0
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in read_tensors(str(half)).values()} == {torch.bfloat16}
    assert (half / "tokenizer.json").read_text() == "{}"
    for flags, message in (
        (["--published-format", "--transformers-format"], "exclude each other"),
        (["--transformers-format"], "is a transformers checkpoint, which converts to our format"),
    ):
        assert main(["convert", str(folder), str(tmp_path / "refused"), *flags]) == 2
        assert not (tmp_path / "refused").exists()


def test_models_no_transformers_family_computes_are_refused():
    from muddformer import MuddConfig, MuddModel
    from muddformer.adapters.transformers_checkpoints import save_transformers_model

    with pytest.raises(CheckpointError, match="connection='mudd'.*ffn_schedule='linear'"):
        save_transformers_model(MuddModel(MuddConfig(n_layer=2, dim=32, n_head=2, intermediate_size=256)), "unused")


def test_qwen2_windows_without_layer_types_and_old_neox_buffers(tmp_path):
    # Older config.json files have no layer_types: transformers windows the layers from max_window_layers on.
    import json

    from safetensors.torch import load_file, save_file

    qwen = Qwen2Config(**SIZE, num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    model = AutoModelForCausalLM.from_config(qwen).eval()
    model.save_pretrained(tmp_path / "qwen2")
    config = json.loads((tmp_path / "qwen2" / "config.json").read_text())
    config.pop("layer_types")
    (tmp_path / "qwen2" / "config.json").write_text(json.dumps(config))
    ours = load_transformers_model(str(tmp_path / "qwen2"))
    assert ours.config.attn_windows == [0, 6, 6]
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()).logits, model(tokens()).logits, rtol=1e-5, atol=1e-5)
    # GPT-NeoX files of older releases also hold each layer's causal-mask buffers, which carry no weights.
    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(**SIZE, rotary_pct=0.5)).eval()
    neox.save_pretrained(tmp_path / "neox")
    path = tmp_path / "neox" / "model.safetensors"
    tensors = load_file(path)
    tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(tensors, path, metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(
            load_transformers_model(str(tmp_path / "neox"))(tokens()).logits,
            neox(tokens()).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def test_overrides_that_add_weights_are_refused(checkpoint):
    from muddformer.errors import InputError

    folder, _ = checkpoint
    with pytest.raises(InputError, match="adds weights the source model does not have"):
        load_transformers_model(str(folder), connection="mudd", moe_experts=4, ffn_schedule="constant")
