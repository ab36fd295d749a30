"""Training checkpoints: `checkpoints/step_NNNNNN/` folders written atomically, pruned, resumed.

Each folder is a model folder that `MuddForCausalLM.from_pretrained` loads (config.json,
model.safetensors, tokenizer.json) plus `optimizer.pt` and `trainer_state.json` (step, RNG states,
data position). Weights and optimizer state are gathered as full (unsharded) tensors, so a
checkpoint written under FSDP2 loads in a single process and the other way round.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from muddformer._utils import atomic_dir, write_json_atomic
from muddformer.adapters.folders import CONFIG_NAME, our_config_json, read_folder_config, read_tensors, save_tensors
from muddformer.config import MuddConfig
from muddformer.data.tokenizers import export_tokenizer
from muddformer.errors import CheckpointError

# The run's optimizers: AdamW, or AdamW and Muon side by side (training/optimizers.py).
Optimizers = list[torch.optim.Optimizer]

STEP_RE = re.compile(r"^step_(\d{6,})$")
UNFINISHED_RE = re.compile(r"^\.step_\d{6,}\.")  # atomic_dir's temporary folder of a checkpoint
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), root / name) for name in os.listdir(root) if (m := STEP_RE.match(name))]
    return sorted(found)


def remove_unfinished(root: Path) -> None:
    """Remove the temporary folders of checkpoints whose writer was killed (kill -9 skips atomic_dir's cleanup).
    Only the holder of the run folder's lock may call it: another writer's save would be in progress."""
    if root.is_dir():
        for name in os.listdir(root):
            if UNFINISHED_RE.match(name):
                shutil.rmtree(root / name, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # saved for each GPU the writer saw; this machine may have fewer
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def full_state(model: torch.nn.Module, optimizers: Optimizers) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on the CPU (collective under FSDP2; rank 0 gets the data); the states of
    several optimizers (AdamW and Muon) go into one dict, keyed by parameter name."""
    return get_state_dict(model, optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    core_config: MuddConfig,
    optimizers: Optimizers,
    trainer_state: dict,
    tokenizer_path: Path | None,
    is_main: bool,
    keep: int,
) -> Path | None:
    """Write checkpoint `step` atomically (rank 0 writes; every rank must call) and keep the newest `keep`."""
    model_sd, optim_sd = full_state(model, optimizers)
    final = step_dir(root, step)
    if is_main:
        with atomic_dir(final) as tmp_name:
            tmp = Path(tmp_name)
            tensors = {
                k: v for k, v in model_sd.items() if not (core_config.tie_word_embeddings and k == "output.weight")
            }
            save_tensors(tensors, str(tmp))
            dtype = next(iter(tensors.values())).dtype
            write_json_atomic(str(tmp / CONFIG_NAME), our_config_json(core_config, dtype))
            if tokenizer_path is not None and tokenizer_path.is_file():
                export_tokenizer(tokenizer_path, tmp, core_config.block_size)
            torch.save({"optimizer": optim_sd, "rng": rng_state()}, tmp / OPTIMIZER_NAME)
            (tmp / STATE_NAME).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
        for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final if is_main else None


class RunMismatch(CheckpointError):
    """A readable checkpoint of another run (another model or other training settings): resuming from an older
    checkpoint would not help, so it is never skipped for one."""


@dataclass
class Resumed:
    step: int
    state: dict
    folder: Path


def load_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizers: Optimizers,
    core_config: MuddConfig,
    training: dict | None = None,
) -> Resumed:
    """Load one checkpoint into model and optimizer; CheckpointError if it is unreadable, RunMismatch if it holds
    another model or was trained with other `training` settings (the ones it saved under that key)."""

    try:
        state = json.loads((folder / STATE_NAME).read_text())
        saved_cfg = read_folder_config(str(folder))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt ({e})") from None
    theirs, ours = saved_cfg.architecture(), core_config.architecture()  # the execution fields may change on resume
    if theirs != ours:
        fields = [
            f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in sorted(ours) if theirs.get(k) != ours[k]
        ]
        raise RunMismatch(
            f"checkpoint {folder} holds a model with a different config ({'; '.join(fields)}); "
            "use another --out for a new run, or the same options to resume"
        )
    saved, current = with_legacy_defaults(state.get("training") or {}), training or {}
    changed = [
        f"{k} {saved[k]!r} there, {current[k]!r} here" for k in sorted(saved) if saved[k] != current.get(k, saved[k])
    ]
    if changed:  # its optimizer state and schedule belong to those settings
        raise RunMismatch(
            f"checkpoint {folder} was trained with other settings ({'; '.join(changed)}); resume with the same "
            f"options, or use another --out (--init-from {folder} starts a new run from its weights)"
        )
    tensors = read_tensors(str(folder))
    if core_config.tie_word_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    try:
        extra = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or garbled pickle
        raise CheckpointError(f"optimizer state {folder / OPTIMIZER_NAME} is truncated or corrupt ({e})") from None
    expected = set(tensors)
    model_keys = set(get_model_state_dict(model))
    if expected != model_keys:
        missing = sorted(model_keys - expected)
        raise CheckpointError(f"checkpoint {folder} does not fit the model (first missing: {missing[:1]})")
    check_groups(folder, extra["optimizer"]["param_groups"], optimizers)
    set_state_dict(
        model,
        optimizers,
        model_state_dict=tensors,
        optim_state_dict=extra["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    set_rng_state(extra["rng"])
    return Resumed(step=int(state["step"]), state=state, folder=folder)


def with_legacy_defaults(saved: dict) -> dict:
    """A checkpoint's training record with the settings added since it was written: what it trained with then (one
    AdamW, the body's eps for the connection's parameters). A checkpoint with no record stays without one."""
    if not saved:
        return saved
    legacy = {"optimizer": "adamw", "generator_optimizer": "adamw", "generator_eps": saved.get("eps")}
    return {**legacy, **saved}


def check_groups(folder: Path, saved_groups: list[dict], optimizers: Optimizers) -> None:
    """RunMismatch unless the checkpoint's optimizer groups hold as many parameters each as this run's: a version
    that groups them otherwise (HC's beta projection moved to the decayed group) would carry the state silently."""
    current = [g for o in optimizers for g in o.param_groups]
    sizes = [
        {g.get("name", str(i)): len(g["params"]) for i, g in enumerate(groups)} for groups in (saved_groups, current)
    ]
    if sizes[0] != sizes[1]:
        raise RunMismatch(
            f"checkpoint {folder} groups the parameters otherwise ({sizes[0]} there, {sizes[1]} here): it was written "
            f"by another version; resume it with that version, or start a new run from its weights (--init-from "
            f"{folder})"
        )


def resume_latest(
    root: Path,
    model: torch.nn.Module,
    optimizers: Optimizers,
    core_config: MuddConfig,
    report,
    training: dict | None = None,
) -> Resumed | None:
    """Load the newest checkpoint that reads cleanly; report each broken one and fall back to the previous."""
    for step, folder in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(folder, model, optimizers, core_config, training)
        except RunMismatch:
            raise
        except CheckpointError as e:
            report(f"checkpoint step {step} is unusable: {e}; trying the previous one")
    return None
