"""`mudd train`: a short real run, kill -9 and resume, corrupt checkpoints, divergence, bad input."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_one_line_error, build, mudd_in_process, nano_run, small_config
from safetensors.torch import load_file

import muddformer.training.trainer as trainer_module
from muddformer import ConfigError, MuddConfig, MuddForCausalLM, MuddModel
from muddformer.data.shards import TokenData
from muddformer.errors import DataError
from muddformer.model import count_parameters
from muddformer.training.checkpointing import list_checkpoints
from muddformer.training.config import TrainConfig, model_config, validate
from muddformer.training.metrics import RunLog, flops_per_token, peak_flops_of
from muddformer.training.parallel import init_distributed
from muddformer.training.recipes import get_recipe, param_groups
from muddformer.training.schedule import lr_at
from muddformer.training.trainer import Trainer, TrainingDiverged, train

SMALL = [
    "--preset",
    "nano",
    "--device",
    "cpu",  # in this process too: a CUDA run would leave TF32 on for the tests after it
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--eval-windows",
    "8",
    "--sample-tokens",
    "8",
    "--no-progress",
    "--no-tensorboard",
]


def train_in_process(args) -> subprocess.CompletedProcess:
    """`mudd train ARGS` in this process; the kill -9 test and the torchrun tests keep real processes."""
    return mudd_in_process("train", *args)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_short_run_writes_a_complete_run_folder(play_data, tmp_path):
    out = tmp_path / "run"
    final = train(
        nano_run(
            play_data,
            out,
            max_steps=40,
            batch_size=8,
            seq_len=64,
            eval_every=20,
            save_every=20,
            log_every=5,
            eval_windows=16,
            sample_tokens=20,
            tensorboard=True,
        )
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= r.keys() for r in steps)
    assert [r["step"] for r in vals] == [20, 40]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5  # it learns
    assert final["val_loss"] == vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000020", "step_000040"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    assert (out / "sample.txt").read_text().startswith("ROMEO:")
    run = json.loads((out / "run.json").read_text())
    assert run["model_config"]["n_layer"] == 2 and run["train_config"]["max_steps"] == 40
    assert {"torch", "python", "platform", "cpu_count", "cpu_capability"} <= run["environment"].keys()
    model = MuddForCausalLM.from_pretrained(out / "checkpoints" / "step_000040")
    assert (out / "checkpoints" / "step_000040" / "tokenizer.json").is_file()
    state = json.loads((out / "checkpoints" / "step_000040" / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["tokens"] == 40 * 8 * 64
    x = torch.randint(0, 512, (1, 16))
    assert torch.isfinite(model(x).logits).all()


def test_throughput_counts_training_time_only(play_data, tmp_path, monkeypatch):
    """tokens/s of a log window leaves out the evaluations and checkpoints that fall inside it (a fake clock: a
    step takes 1 s, an evaluation or a checkpoint 100 s)."""
    clock = [0.0]

    def taking(seconds, method):
        def timed(self, *args, **kwargs):
            clock[0] += seconds
            return method(self, *args, **kwargs)

        return timed

    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    for name, seconds in (("train_step", 1.0), ("evaluate", 100.0), ("save", 100.0)):
        monkeypatch.setattr(Trainer, name, taking(seconds, getattr(Trainer, name)))
    out = tmp_path / "run"
    train(nano_run(play_data, out, max_steps=8, log_every=4, eval_every=3, save_every=5))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    throughput = {r["step"]: r["tokens_per_s"] for r in records if "tokens_per_s" in r}
    assert throughput == dict.fromkeys([1, 4, 8], 2 * 16)  # batch 2 x 16 tokens per second of training


def test_metrics_with_a_torn_last_line_resume_and_report(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.5}\n{"step": 3, "lo')  # killed mid-append
    assert RunLog(tmp_path, 0, tensorboard=False, enabled=False).records() == [
        {"step": 1, "loss": 5.0},
        {"step": 2, "loss": 4.5},
    ]
    RunLog(tmp_path, 1, tensorboard=False, enabled=True).close()  # resuming from step 1 drops the rest
    assert path.read_text() == '{"step": 1, "loss": 5.0}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match="metrics.jsonl line 2 is not JSON; repair or remove that line"):
        RunLog(tmp_path, 0, tensorboard=False, enabled=False).records()


def test_a_restart_before_the_first_checkpoint_leaves_each_step_once_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for losses in ([5.0, 4.0], [5.5, 4.5, 3.5]):  # the first run stopped before any checkpoint: redone from step 0
        log = RunLog(tmp_path, 0, tensorboard=True, enabled=True)
        for step, loss in enumerate(losses, 1):
            log.log({"step": step, "loss": loss})
        log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 5.5), (2, 4.5), (3, 3.5)]


@pytest.mark.slow
def test_kill_9_and_resume_is_bit_identical(play_data, tmp_path):
    args = SMALL + ["--data", str(play_data), "--max-steps", "60", "--save-every", "4", "--eval-every", "30"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert train_in_process(args + ["--out", str(full)]).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "muddformer", "train", *args, "--out", str(broken)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # this process's float sums
    )
    deadline = time.time() + 120
    while not (broken / "checkpoints" / "step_000008").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted(os.listdir(broken / "checkpoints"))
    assert "step_000060" not in kept  # it really died mid-run
    (broken / "checkpoints" / ".step_000012.k9x").mkdir()  # what a save killed mid-write leaves
    resumed = train_in_process(args + ["--out", str(broken)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert not [name for name in os.listdir(broken / "checkpoints") if name.startswith(".")]
    assert_same_weights(full / "checkpoints" / "step_000060", broken / "checkpoints" / "step_000060")
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses(full)[-1] == losses(broken)[-1]
    threads = lambda d: json.loads((d / "run.json").read_text())["environment"]["torch_threads"]
    assert threads(full) == threads(broken)  # what bit-identity rests on, named if it ever fails


@pytest.mark.slow
def test_resume_may_change_how_the_model_computes_but_not_what(play_data, tmp_path, run_cli):
    args = SMALL + ["--data", str(play_data), "--save-every", "4", "--eval-every", "100", "--sample-tokens", "0"]
    run = tmp_path / "run"
    assert run_cli("train", *args, "--max-steps", "4", "--out", run).returncode == 0
    faster = ["--set", "recompute_mix=true", "--set", "mix_impl=reference", "--set", "attn_impl=reference"]
    faster += ["--set", "init_method=neox"]  # how a fresh model would start: nothing to a resumed one
    resumed = run_cli("train", *args, *faster, "--max-steps", "8", "--out", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    # A longer run stretches the schedule: the learning rate jumps, and the run says so.
    tc, _ = TrainConfig(preset="nano").resolved()  # the recipe SMALL trains with
    now, before = (lr_at(4, dataclasses.replace(tc, max_steps=n)) for n in (8, 4))
    assert (
        f"--max-steps 8 (the checkpoint's run had 4): the schedule now spans 8 steps, so the learning rate at step 4 "
        f"is {now:.3g} instead of {before:.3g}"
    ) in resumed.stdout
    refused = run_cli("train", *args, "--set", "dense_hidden=16", "--max-steps", "12", "--out", run)
    assert refused.returncode == 2 and "different config (dense_hidden 0 there, 16 here)" in refused.stderr
    # The optimizer's settings, the batch, the seed and the data are the run's too (its optimizer state and
    # schedule belong to them): a change is refused, naming each, instead of resuming into a mixed run.
    for flags, named in (
        (["--weight-decay", "0.05", "--generator-lr-mult", "0.5"], "generator_lr_mult 1.0 there, 0.5 here; "),
        (["--grad-accum", "2"], "sequences_per_step 4 there, 8 here"),
        (["--seed", "1"], "seed 0 there, 1 here"),
    ):
        refused = run_cli("train", *args, *flags, "--max-steps", "12", "--out", run)
        assert_one_line_error(refused, "run/checkpoints/step_000008 was trained with other settings (", named)
        assert "--init-from" in refused.stderr
    assert (
        "weight_decay 0.1 there, 0.05 here)" in run_cli("train", *args, "--weight-decay", "0.05", "--out", run).stderr
    )
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [4, 8]


@pytest.mark.slow
def test_checkpoints_of_earlier_versions_resume_or_are_refused_in_one_line(play_data, tmp_path, run_cli):
    args = SMALL + ["--data", str(play_data), "--save-every", "2", "--eval-every", "100", "--sample-tokens", "0"]
    args += ["--connection", "hc", "--keep-checkpoints", "5"]
    run = tmp_path / "run"
    assert run_cli("train", *args, "--max-steps", "2", "--out", run).returncode == 0
    step = run / "checkpoints" / "step_000002"
    # Written before the optimizer options existed: its record lacks them, and it trained with one AdamW.
    state = json.loads((step / "trainer_state.json").read_text())
    for key in ("optimizer", "generator_optimizer", "generator_eps"):
        del state["training"][key]
    (step / "trainer_state.json").write_text(json.dumps(state))
    refused = run_cli("train", *args, "--optimizer", "muon", "--max-steps", "4", "--out", run)
    assert_one_line_error(refused, "was trained with other settings (optimizer 'adamw' there, 'muon' here)")
    refused = run_cli("train", *args, "--generator-eps", "1e-10", "--max-steps", "4", "--out", run)
    assert_one_line_error(refused, "generator_eps 1e-08 there, 1e-10 here")
    resumed = run_cli("train", *args, "--max-steps", "4", "--out", run)  # the same options: what it trained with
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    # Grouped otherwise (HC's beta projection was in the undecayed group): refused, not carried over silently.
    step = run / "checkpoints" / "step_000004"
    saved = torch.load(step / "optimizer.pt", weights_only=False)
    groups = {g["name"]: g for g in saved["optimizer"]["param_groups"]}
    moved = next(p for p in groups["generator_matrices"]["params"] if p.endswith("dynamic_beta"))
    groups["generator_matrices"]["params"].remove(moved)
    groups["generator_vectors"]["params"].append(moved)
    torch.save(saved, step / "optimizer.pt")
    refused = run_cli("train", *args, "--max-steps", "6", "--out", run)
    assert_one_line_error(refused, "groups the parameters otherwise (", "--init-from")
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(play_data, tmp_path):
    args = SMALL + ["--data", str(play_data), "--save-every", "4", "--eval-every", "100", "--keep-checkpoints", "5"]
    run = tmp_path / "run"
    assert train_in_process(args + ["--max-steps", "12", "--out", str(run)]).returncode == 0
    latest = run / "checkpoints" / "step_000012" / "model.safetensors"
    shutil.copytree(latest.parent, tmp_path / "ref")  # what the retrained step 12 must equal
    latest.write_bytes(latest.read_bytes()[:1000])
    again = train_in_process(args + ["--max-steps", "12", "--out", str(run)])
    assert again.returncode == 0, again.stderr
    assert "checkpoint step 12 is unusable" in again.stdout and "resuming from" in again.stdout
    assert "step_000008" in again.stdout
    assert_same_weights(tmp_path / "ref", run / "checkpoints" / "step_000012")


def test_divergence_stops_with_a_clear_message(play_data, tmp_path):
    out = tmp_path / "run"
    proc = train_in_process(
        SMALL
        + [
            "--data",
            str(play_data),
            "--out",
            str(out),
            "--max-steps",
            "30",
            "--lr",
            "1e30",
            "--warmup",
            "0",
            "--save-every",
            "1",
            "--grad-clip",
            "1e30",
        ]
    )
    assert proc.returncode == 2
    assert "mudd: error: loss became" in proc.stderr  # (a traceback would have failed this test)
    assert "the last good checkpoint is" in proc.stderr
    kept = sorted(os.listdir(out / "checkpoints"))
    assert kept and "step_000030" not in kept
    MuddForCausalLM.from_pretrained(out / "checkpoints" / kept[-1])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/data"], "data folder /nonexistent/data does not exist"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--set", "n_layers=3"], "unknown MuddConfig field 'n_layers'"),
        (["--seq-len", "65"], "--seq-len 65 exceeds the model's context block_size=64"),
        (["--set", "vocab_size=300"], "512-token vocabulary but the model has vocab_size=300"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--parallel", "fsdp"], "--parallel fsdp runs under torchrun: launch with `torchrun --nproc_per_node=N"),
        (["--fsdp-defer-grad-sync"], "--fsdp-defer-grad-sync applies to --parallel fsdp, not --parallel none"),
        (
            ["--set", "moe_experts=4", "--set", "moe_top_k=1", "--set", "ffn_schedule=constant"],
            "moe_top_k=1 with moe_norm_topk=true gives every token a gate of exactly 1",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(play_data, tmp_path, run_cli, args, message):
    out = tmp_path / "run"
    base = ["train", "--preset", "nano", "--data", str(play_data), "--out", str(out), "--max-steps", "2"]
    proc = run_cli(*base, *args)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_config_file_overrides_and_empty_data(play_data, tmp_path, run_cli):
    cfg = tmp_path / "model.yaml"
    cfg.write_text("n_layer: 3\nconnection: denseformer\n")
    out = tmp_path / "run"
    train(nano_run(play_data, out, config=str(cfg), eval_windows=64))
    saved = json.loads((out / "checkpoints" / "step_000002" / "config.json").read_text())
    assert saved["n_layer"] == 3 and saved["connection"] == "denseformer"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("train", "--preset", "nano", "--data", str(empty), "--out", str(tmp_path / "r2"))
    assert proc.returncode == 2 and "not a prepared data folder" in proc.stderr


def test_recipe_schedule_and_weight_decay_groups():
    tc, _ = TrainConfig(max_steps=1000, lr=1e-3).resolved()
    assert lr_at(0, tc) == pytest.approx(1e-4)  # warmup: 10 steps
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(999, tc) == pytest.approx(1e-4, rel=1e-3)  # cosine to 10 %
    assert lr_at(505, tc) == pytest.approx(0.55e-3, rel=1e-2)
    model = MuddModel(MuddConfig.from_preset("nano"))
    groups = {g["name"]: g for g in param_groups(model, get_recipe("cpu"))}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in groups["matrices"]["params"]) and groups["matrices"]["weight_decay"] == 0.1
    assert "connection.dynamic_dense.0.w1.weight" in {names[id(p)] for p in groups["generator_matrices"]["params"]}
    assert "connection.dense_bs.0" in {names[id(p)] for p in groups["priors"]["params"]}
    assert groups["priors"]["weight_decay"] == groups["vectors"]["weight_decay"] == 0.0
    assert TrainConfig(preset="muddformer-405m").resolved()[0].lr == 3e-4
    assert TrainConfig(preset="tiny").resolved()[0].lr == 3e-3


def test_flops_per_token_and_the_gpu_peaks():
    untied, tied = (MuddConfig.from_preset("nano", tie_word_embeddings=t) for t in (False, True))
    counts = [count_parameters(MuddModel(c))["total"] for c in (untied, tied)]
    assert counts[0] - counts[1] == untied.vocab_size * untied.dim
    # The head's matmul costs the same whether its matrix is shared with the embedding lookup or not.
    assert flops_per_token(untied, counts[0], 32) == flops_per_token(tied, counts[1], 32)
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA L40S") == 362e12 and peak_flops_of("NVIDIA L4") == 121e12
    assert peak_flops_of("NVIDIA A10G") is None and peak_flops_of("Tesla V100-SXM2-16GB") is None


def test_flops_per_token_counts_each_connections_mixing():
    D = 32

    def mixing(connection, **kw):
        return build(connection=connection, n_layer=2, dim=D, n_head=2, **kw).connection.mix_flops()

    # MUDD, 2 layers: 4 streams over 2 states (x0, x1), then the last, R-only, over 3: 2 x (4 x 2 + 1 x 3) x D.
    assert mixing("mudd") == 2 * (4 * 2 + 1 * 3) * D and mixing("ddformer") == 2 * (2 + 3) * D
    assert mixing("mudd", dense_layers="-1") == 2 * 3 * D and mixing("residual") == 0
    # HC, n = 2, 4 sites: alpha's and beta's projections on the 2nd stream (3 + 1), alpha^T H (3 x 2), the add (2).
    assert mixing("hc", hyper_streams=2) == 4 * 2 * D * (4 + 6 + 2)
    assert mixing("mhc", hyper_streams=2) == 4 * 2 * D * (2 + 4 + 2)  # pre H, res H, the add
    # AttnRes over 4 sub-layers: sites 1-3 mix 2, 3 and 4 sources, the output 5; 6 D FLOPs a source.
    assert mixing("attnres") == 6 * D * (2 + 3 + 4 + 5)
    # Block AttnRes, one group: the embedding and the open sum at every site and at the output.
    assert mixing("attnres-block", attnres_blocks=1) == 6 * D * (2 + 2 + 2 + 2)
    cfg, base = (small_config(connection=c, n_layer=2, dim=D, n_head=2) for c in ("mudd", "residual"))
    params = count_parameters(MuddModel(cfg))["total"]
    assert flops_per_token(cfg, params, 16) - flops_per_token(base, params, 16) == 3 * mixing("mudd")


def test_batch_settled_for_the_ranks_and_torchrun_needs_a_parallel_mode():
    tc, recipe = TrainConfig(preset="muddformer-405m", batch_size=8, parallel="fsdp").resolved(world=4)
    assert tc.grad_accum == 8 and recipe.global_batch == tc.global_batch == 256  # the paper recipe's batch
    tc, recipe = TrainConfig(preset="muddformer-405m", batch_size=8, grad_accum=2, parallel="ddp").resolved(world=4)
    assert recipe.global_batch == tc.global_batch == 64  # an explicit --grad-accum: run.json records what ran
    tc, recipe = TrainConfig(preset="tiny", batch_size=4, grad_accum=3).resolved()
    assert recipe.global_batch == 12 and get_recipe("cpu").global_batch is None
    with pytest.raises(ConfigError, match=r"--global-batch 64 disagrees with --batch-size 8 x --grad-accum 1 x 4 "):
        TrainConfig(preset="muddformer-405m", batch_size=8, grad_accum=1, global_batch=64, parallel="ddp").resolved(4)
    with pytest.raises(ConfigError, match="2 ranks with --parallel none would train 2 separate models; pass --par"):
        TrainConfig().resolved(world=2)
    assert TrainConfig(parallel="ddp").resolved(world=2)[0].grad_accum == 1


@pytest.mark.parametrize(
    "option", [dict(activation_checkpointing=True), dict(grad_accum=2, batch_size=2), dict(dtype="bfloat16")]
)
def test_options_train_like_the_plain_loop(play_data, tmp_path, option):
    base = dict(max_steps=3, batch_size=4, seq_len=32, save_every=3, eval_every=3, eval_windows=4)
    plain = train(nano_run(play_data, tmp_path / "plain", **base))
    other = train(nano_run(play_data, tmp_path / "other", **{**base, **option}))
    tol = 0.05 if option.get("dtype") == "bfloat16" else 1e-5
    assert other["loss"] == pytest.approx(plain["loss"], abs=tol)
    if "activation_checkpointing" in option:
        assert_same_weights(
            tmp_path / "plain" / "checkpoints" / "step_000003", tmp_path / "other" / "checkpoints" / "step_000003"
        )


@pytest.mark.slow
def test_default_data_is_the_bundled_corpus(tmp_path, bundled_cache, monkeypatch):
    monkeypatch.setenv("MUDD_CACHE", str(bundled_cache))
    out = tmp_path / "run"
    proc = train_in_process(
        [
            "--preset",
            "nano",
            "--set",
            "vocab_size=8192",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--eval-windows",
            "2",
            "--sample-tokens",
            "4",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    prepared = bundled_cache / "data" / "shakespeare-bpe8192"
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["vocab_size"] == 8192 and meta["source"] == "bundled:shakespeare"
    assert meta["splits"]["train"]["tokens"] > 1_000_000 and meta["splits"]["val"]["tokens"] > 50_000
    assert json.loads((out / "run.json").read_text())["data"] == str(prepared)


def test_trainer_components_step_by_step_equal_the_loop(play_data, tmp_path):
    """Setup, train_step, evaluate and save called one by one give what `train` (their loop) gives."""
    tc = nano_run(play_data, tmp_path / "loop", max_steps=3, eval_every=3, save_every=3)
    looped = train(tc)
    tc, recipe = nano_run(play_data, tmp_path / "parts", max_steps=3, eval_every=3, save_every=3).resolved()
    tc = dataclasses.replace(tc, grad_accum=1)
    data = TokenData(str(play_data))
    info = init_distributed("cpu")
    trainer = Trainer(tc, recipe, model_config(tc), data, validate(tc, model_config(tc), data), info)
    results = [trainer.train_step(step, logging=True) for step in range(3)]
    assert results[-1].loss.item() == looped["loss"]
    assert results[-1].lr == looped["lr"] and results[-1].grad_norm.item() == looped["grad_norm"]
    assert {k for k in results[0].telemetry if k.startswith("grad_norm/")}, "log steps carry per-group norms"
    assert trainer.evaluate() == looped["val_loss"]
    trainer.save(3)
    assert [step for step, _ in list_checkpoints(tmp_path / "parts" / "checkpoints")] == [3]


def test_divergence_is_caught_on_the_next_checked_step_and_never_saved(play_data, tmp_path):
    """The loss is read on the host only on steps that log, evaluate or save; a divergence between them is
    caught on the next of those, before its update, and no checkpoint holds it."""
    out = tmp_path / "run"
    tc = nano_run(play_data, out, max_steps=30, log_every=5, eval_every=10, save_every=10, lr=1e30, warmup=0.0)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step 5 .*no checkpoint was written yet"):
        train(dataclasses.replace(tc, grad_clip=1e30))
    assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")
