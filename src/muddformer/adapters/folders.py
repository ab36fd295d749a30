"""Model folders on disk: our format and the published one, safetensors (sharded) load and save.

Our format: config.json (MuddConfig fields plus `"mudd_format": 1`) and model.safetensors, or
shards model-0000i-of-0000N.safetensors with model.safetensors.index.json. Tensor names are the
core model's state-dict names. The published format (architecture §3) has the reference's config.json and
the same names except that the connection's tensors have no `connection.` prefix.

Every file is written atomically (temporary name, then rename), so a crash never leaves a half
file where a good one was.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from muddformer._utils import atomic_path, write_json_atomic
from muddformer.adapters.published import (
    PUBLISHED_MARKERS,
    PUBLISHED_MODEL_TYPES,
    config_from_published,
    config_to_published,
    is_published,
    ours_to_published,
    published_to_ours,
)
from muddformer.config import MuddConfig
from muddformer.errors import CheckpointError, ConfigError
from muddformer.model import MuddModel
from muddformer.presets import PRESETS, RENAMED

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"  # transformers' generate settings, its end-of-text ids first
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 5 * 1024**3
_SHARD_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


# ---- config ----------------------------------------------------------------------------------
def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object")
    return data


def read_folder_raw_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise CheckpointError(f"model folder {folder} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; it is not a model folder")
    raw = _read_json(path, "config")
    generation = os.path.join(folder, GENERATION_CONFIG_NAME)
    if os.path.isfile(generation):  # transformers' generate stops at these ids, not config.json's
        token_ids = _read_json(generation, "generation config")
        raw.update({k: token_ids[k] for k in ("bos_token_id", "eos_token_id") if token_ids.get(k) is not None})
    return raw


def config_from_raw(raw: dict) -> MuddConfig:
    """MuddConfig from a config.json dict: ours (marked `mudd_format`) or published (published.is_published)."""
    if "mudd_format" in raw:
        fields = {
            k: v for k, v in raw.items() if k not in ("mudd_format", "model_type", "architectures", "torch_dtype")
        }
        return MuddConfig.from_dict(fields)
    model_type = raw.get("model_type")
    if model_type not in PUBLISHED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json model_type {model_type!r} is not a MUDD model; "
            "expected 'muddformer' or 'muddpythia' (published) or a folder saved by muddformer"
        )
    if not is_published(raw):
        raise CheckpointError(
            f"config.json has neither our 'mudd_format' marker nor the published fields "
            f"({', '.join(PUBLISHED_MARKERS)}); it is not a MUDD model folder"
        )
    return config_from_published(raw)


def read_folder_config(folder: str) -> MuddConfig:
    return config_from_raw(read_folder_raw_config(folder))


def our_config_json(cfg: MuddConfig, dtype: torch.dtype) -> dict:
    return {
        "mudd_format": FORMAT_VERSION,
        "model_type": "muddformer",
        "architectures": ["MuddForCausalLM"],
        "torch_dtype": str(dtype).removeprefix("torch."),
        **cfg.to_dict(),
    }


# ---- reading -----------------------------------------------------------------------------------
def weight_files(folder: str) -> dict[str, list[str]]:
    """Map each weights file of the folder to the tensor names it should hold (from the index)."""
    index = os.path.join(folder, INDEX_NAME)
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(index):
        data = _read_json(index, "shard index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"shard index {index} has no weight_map; the file is corrupt")
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(shard, []).append(name)
        for shard in files:
            if not os.path.isfile(os.path.join(folder, shard)):
                raise CheckpointError(
                    f"shard {shard} named in {INDEX_NAME} is missing from {folder}; copy the whole folder again"
                )
        return files
    if os.path.isfile(single):
        return {WEIGHTS_NAME: []}
    raise CheckpointError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; no weights to load")


def read_tensors(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors file(s), by their stored names."""
    tensors: dict[str, torch.Tensor] = {}
    for fname, expected in weight_files(folder).items():
        path = os.path.join(folder, fname)
        try:
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
                missing = sorted(set(expected) - set(names))
                if missing:
                    raise CheckpointError(
                        f"{fname} lacks tensor {missing[0]!r} that {INDEX_NAME} places there; "
                        "the shard is stale or corrupt"
                    )
                for name in names:
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"weights file {path} is truncated or corrupt ({e}); copy or save it again") from None
    return tensors


def check_state_dict(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Refuse missing or unexpected names and shape mismatches, naming the first offender."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source} is missing tensor {missing[0]!r}{more}; the checkpoint does not match its config.json"
        )
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{source} has unexpected tensor {unexpected[0]!r}{more}; the checkpoint does not match its config.json"
        )
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"the config expects {tuple(ref.shape)}"
            )


def load_model(
    folder: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None, **config_overrides
):
    """Build the core model of a folder (ours or published) and load its weights.

    dtype: None gives float32; "auto" takes the folder's stored dtype. config_overrides change
    computation options that leave the weights as they are, e.g. attn_impl="sdpa".
    """

    raw = read_folder_raw_config(folder)
    cfg = config_from_raw(raw)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    if dtype == "auto":
        dtype = raw.get("torch_dtype", "float32")
    dtype = parse_dtype(dtype) or torch.float32
    tensors = read_tensors(folder)
    if is_published(raw):
        tensors = {published_to_ours(k): v for k, v in tensors.items()}
    with torch.device("meta"):
        model = MuddModel(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "output.weight")}
    check_state_dict(tensors, expected, folder)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope(device=device or "cpu")  # the buffer was built on the meta device
    return model.eval()


# ---- writing -----------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read shard size {size!r}; use bytes or a string like '5GB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def save_tensors(
    tensors: dict[str, torch.Tensor], folder: str, max_shard_size: int | str = DEFAULT_SHARD_SIZE
) -> list[str]:
    """Write tensors as model.safetensors, or shards plus an index when they exceed max_shard_size.

    Returns the files written. Stale weight files of an earlier save are removed afterwards.
    """
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        n = len(shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, shard in zip(names, shards):
        with atomic_path(os.path.join(folder, fname)) as tmp:
            save_file(shard, tmp, metadata=metadata)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {name: fname for fname, shard in zip(names, shards) for name in shard}
        write_json_atomic(
            os.path.join(folder, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
        names.append(INDEX_NAME)
    for old in os.listdir(folder):
        if _SHARD_RE.match(old) and old not in names:
            os.remove(os.path.join(folder, old))
    return names


def save_model(
    model,
    folder: str,
    published_format: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Write a core model to a folder: our format, or the published layout the reference code reads.

    dtype: None keeps the model's dtype (our format) or writes bfloat16 (published, as released).
    """
    cfg: MuddConfig = model.config
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "output.weight")}
    if published_format:
        raw = config_to_published(cfg, torch_dtype=str(parse_dtype(dtype or "bfloat16")).removeprefix("torch."))
        state = {ours_to_published(k): v for k, v in state.items()}
    else:
        raw = None
    target = parse_dtype(dtype or ("bfloat16" if published_format else None))
    if target is not None:
        state = {k: v.to(target) for k, v in state.items()}
    if raw is None:
        raw = our_config_json(cfg, next(iter(state.values())).dtype)
    os.makedirs(folder, exist_ok=True)
    save_tensors(state, folder, max_shard_size)
    write_json_atomic(os.path.join(folder, CONFIG_NAME), raw)


def load_config(spec: str | os.PathLike) -> MuddConfig:
    """A preset name, a JSON file of MuddConfig fields, or a model folder (ours or published)."""
    path = os.fspath(spec)
    if path in PRESETS or path in RENAMED:
        return MuddConfig.from_preset(path)
    if os.path.isdir(path):
        return read_folder_config(path)
    if os.path.isfile(path):
        with open(path) as f:
            return MuddConfig.from_json(f.read())
    raise ConfigError(
        f"{path!r} is neither a preset nor a config file nor a model folder; presets: {', '.join(PRESETS)}"
    )
