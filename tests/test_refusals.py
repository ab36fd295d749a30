"""Loading and input errors: clear messages that name the key, file or value."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import build
from safetensors.torch import load_file, save_file

from muddformer import CheckpointError, InputError, MuddForCausalLM
from muddformer._utils import atomic_path, exclusive_folder, write_json_atomic


def writable_copy(src, dst):
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


@pytest.fixture
def folder(fixtures_dir, tmp_path):
    return writable_copy(fixtures_dir / "mf_tiny", tmp_path / "model")


@pytest.fixture
def sharded(fixtures_dir, tmp_path):
    return writable_copy(fixtures_dir / "mp_tiny", tmp_path / "sharded")  # two shards and an index


def rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(folder):
    rewrite(folder / "model.safetensors", lambda t: t.pop("layers.2.attention_norms.1.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.2.attention_norms.1.weight'"):
        MuddForCausalLM.from_pretrained(folder)


def test_unexpected_tensor(folder):
    rewrite(folder / "model.safetensors", lambda t: t.update({"layers.0.attention.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.attention.extra.weight'"):
        MuddForCausalLM.from_pretrained(folder)


def test_shape_mismatch(folder):
    rewrite(folder / "model.safetensors", lambda t: t.update({"dense_bs.1": torch.zeros(4, 4, dtype=torch.bfloat16)}))
    with pytest.raises(
        CheckpointError, match=r"tensor 'connection.dense_bs.1' has shape \(4, 4\), the config expects \(4, 3\)"
    ):
        MuddForCausalLM.from_pretrained(folder)


def test_config_that_does_not_match_weights(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["n_layer"] = 3
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        MuddForCausalLM.from_pretrained(folder)


def test_unknown_model_type(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a MUDD model"):
        MuddForCausalLM.from_pretrained(folder)


def test_truncated_safetensors(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        MuddForCausalLM.from_pretrained(folder)


def test_corrupt_safetensors_header(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MuddForCausalLM.from_pretrained(folder)


def test_missing_shard(sharded):
    os.remove(sharded / "model-00002-of-00002.safetensors")
    with pytest.raises(
        CheckpointError, match="shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing"
    ):
        MuddForCausalLM.from_pretrained(sharded)


def test_corrupt_index(sharded):
    (sharded / "model.safetensors.index.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="shard index .* is not valid JSON"):
        MuddForCausalLM.from_pretrained(sharded)


def test_no_weights_and_no_config(folder, tmp_path):
    os.remove(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor model.safetensors.index.json"):
        MuddForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="has no config.json"):
        MuddForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        MuddForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_token_ids_out_of_range():
    model = build()
    with pytest.raises(InputError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(InputError, match=r"token id -1 is outside the vocabulary"):
        model(torch.tensor([[1, -1]]))


def test_sequence_too_long_and_bad_shapes():
    model = build()
    with pytest.raises(InputError, match="sequence length 25 exceeds the context length block_size=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(InputError, match=r"shape \(batch, seq_len\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(InputError, match="integer tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(InputError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="labels shape"):
        model(torch.zeros(1, 5, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.slow
def test_generate_refuses_what_it_cannot_do(fixtures_dir):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / "mf_tiny")
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="exceeds the context length block_size=128"):
        model.generate(prompt, max_new_tokens=127, do_sample=False)
    with pytest.raises(InputError, match=r"attention_mask must be \(batch, seq_len\)"):
        model(prompt, attention_mask=torch.ones(1, 1, 3, 3))


def test_generate_stops_at_eos(fixtures_dir):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / "mf_tiny")
    prompt = torch.tensor([[29, 134, 176, 97, 60, 101, 110]])
    full = model.generate(prompt, max_new_tokens=9, do_sample=False)
    eos = int(full[0, 9])  # the third new token
    stopped = model.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=eos)
    assert stopped.tolist() == [full[0, :10].tolist()]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["config.json"]
    write_json_atomic(str(tmp_path / "new" / "folder" / "results.json"), {"b": 2})  # e.g. `--output new/x.json`
    assert json.loads((tmp_path / "new" / "folder" / "results.json").read_text()) == {"b": 2}


def test_a_folder_held_by_another_process_is_refused_until_it_exits(tmp_path):
    folder = tmp_path / "run"
    hold = "import sys, time; from muddformer._utils import exclusive_folder\n"
    hold += "with exclusive_folder(sys.argv[1], RuntimeError):\n    print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(CheckpointError, match=rf"run is in use by another process \(pid {holder.pid}\).*--out"):
            with exclusive_folder(folder, CheckpointError):
                pass
        (folder / "metrics.jsonl").write_text("")
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, no clean-up ran
        holder.wait()
    with exclusive_folder(folder, CheckpointError):
        assert (folder / ".lock").read_text() == str(os.getpid())
    assert sorted(os.listdir(folder)) == [".lock", "metrics.jsonl"]  # a folder with content stays
    fresh = tmp_path / "fresh"
    with exclusive_folder(fresh, CheckpointError):
        assert fresh.is_dir()
    assert not fresh.exists()  # it made the folder and nothing was written there: no trace left
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(CheckpointError, match="notes.txt is a file, not a folder; pass another --out"):
        with exclusive_folder(tmp_path / "notes.txt", CheckpointError):
            pass
