"""The Hugging Face face of the model: a transformers PreTrainedModel around the plain core.

`MuddForCausalLM.from_pretrained(folder)` reads our folders and the published ones (model_type
"muddformer" / "muddpythia"); `save_pretrained(folder)` writes ours, and with
`published_format=True` the layout the reference code reads. The core (`.model`, a MuddModel)
stays usable on its own.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from muddformer._utils import write_json_atomic
from muddformer.adapters.folders import DEFAULT_SHARD_SIZE, GENERATION_CONFIG_NAME, load_model, save_model
from muddformer.adapters.published import config_from_published, is_published
from muddformer.compat import LOCK_HINT
from muddformer.config import MuddConfig
from muddformer.errors import DependencyError, InputError
from muddformer.model import MuddModel, training_loss

# transformers' generic names for our sizes (used by its caches and utilities).
_ATTRIBUTE_MAP = {
    "num_hidden_layers": "n_layer",
    "hidden_size": "dim",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head",
    "max_position_embeddings": "block_size",
}


def transformers_cache_name() -> str:
    """The name under which transformers' generation hands the KV cache to `forward` and reads it back
    from the output: `cache` from 5.24 on, `past_key_values` before. Read off the output class and the
    generation hook, which must agree."""

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    for name in ("cache", "past_key_values"):
        if name in fields and name in params:
            return name
    raise DependencyError(
        f"transformers passes the generation cache under a name muddformer does not know "
        f"(output fields {sorted(fields)}); {LOCK_HINT}"
    )


def is_cache_object(value: Any) -> bool:
    """A KV cache of any kind we decode with: a transformers Cache or one of ours (anything with update)."""
    return isinstance(value, Cache) or (hasattr(value, "update") and hasattr(value, "get_seq_length"))


# The name the installed transformers uses for the KV cache in forward's arguments and in its outputs.
CACHE_NAME = transformers_cache_name()


class MuddHFConfig(PreTrainedConfig):
    """transformers config that carries the MuddConfig fields as attributes (or a published config's)."""

    model_type = "muddformer"
    attribute_map = _ATTRIBUTE_MAP

    @classmethod
    def from_mudd(cls, cfg: MuddConfig) -> "MuddHFConfig":
        # transformers' names for the attention windows: its caches keep only a window's tokens for such layers.
        windows = cfg.attn_windows
        layer_types = ["sliding_attention" if w else "full_attention" for w in windows]
        return cls(**cfg.to_dict(), sliding_window=cfg.attn_window or None, layer_types=layer_types)

    def mudd_config(self) -> MuddConfig:
        raw = self.to_dict()
        if is_published(raw):
            return config_from_published(raw)
        known = set(MuddConfig.__dataclass_fields__)
        return MuddConfig.from_dict({k: v for k, v in raw.items() if k in known})


class MuddPythiaHFConfig(MuddHFConfig):
    """The published MUDDPythia folders' model_type."""

    model_type = "muddpythia"


class MuddForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM of the MUDD family with the transformers conventions: labels -> loss, attention_mask,
    a KV cache (`cache` or `past_key_values`) and `generate` (GenerationMixin: greedy, sampling, beams,
    streamers)."""

    config_class = MuddHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True
    # The loss is each micro-batch's mean: transformers' Trainer must divide it by the gradient-accumulation steps
    # itself (it would not for a forward that takes **kwargs and so seems to read `num_items_in_batch`).
    accepts_loss_kwargs = False

    def __init__(self, config: MuddHFConfig | MuddConfig, model: MuddModel | None = None):
        if isinstance(config, MuddConfig):
            config = MuddHFConfig.from_mudd(config)
        super().__init__(config)
        self.model = model if model is not None else MuddModel(config.mudd_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The core initialises itself (the connection's init must not be overwritten).
        pass

    @property
    def mudd_config(self) -> MuddConfig:
        return self.model.config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.output

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """transformers' causal-LM forward. The KV cache comes as `cache` (transformers >= 5.24) or
        `past_key_values` (earlier releases and older callers) and goes back under the name the
        installed release reads (CACHE_NAME)."""
        given = cache if cache is not None else past_key_values
        if isinstance(given, Cache) and not isinstance(given, DynamicCache):  # e.g. cache_implementation="static"
            raise InputError(
                f"transformers' {type(given).__name__} is not one muddformer decodes with; drop cache_implementation "
                "(a dynamic cache), or use muddformer's generate(..., cache='static') for a preallocated one"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise InputError(
                f"attention_mask must be (batch, seq_len) of 1 (token) and 0 (padding), got shape "
                f"{tuple(attention_mask.shape)}"
            )
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise InputError("got two KV caches, `cache` and `past_key_values`; pass one of them")
        cache = cache if cache is not None else past_key_values
        unread = [name for name, value in kwargs.items() if is_cache_object(value)]
        if unread:  # a cache under a name we do not read would be dropped: every step would decode without context
            raise DependencyError(
                f"forward received a KV cache as {unread[0]!r}, a name muddformer does not read; "
                f"pass it as `cache` or `past_key_values`, or install the tested transformers "
                f"(`make install`)"
            )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if attention_mask is not None and cache is None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the plain causal path
        out = self.model(
            input_ids,
            labels=labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            cache_position=cache_position,
        )
        logits = out.logits
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        loss = training_loss(out) if self.training and out.loss is not None else out.loss  # router losses in training
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache})

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *args: Any,
        torch_dtype: Any = None,
        dtype: Any = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> "MuddForCausalLM":
        """Load our folder or a published one.

        dtype (alias torch_dtype): None = float32, "auto" = as stored. Keyword arguments that name
        MuddConfig fields override the folder's config, e.g. attn_impl="sdpa" for the fused kernel;
        the loading options transformers' Auto classes pass along (config, adapter_kwargs, ...) are
        not ours and are ignored, except device_map given as one device ("cpu", "cuda:0").
        """
        fields = set(MuddConfig.__dataclass_fields__)
        config_overrides = {k: v for k, v in kwargs.items() if k in fields}
        if (
            device is None
            and isinstance(kwargs.get("device_map"), (str, torch.device))
            and kwargs["device_map"] != "auto"
        ):
            device = kwargs["device_map"]
        core = load_model(
            os.fspath(folder), dtype=dtype if dtype is not None else torch_dtype, device=device, **config_overrides
        )
        model = cls(MuddHFConfig.from_mudd(core.config), model=core).eval()
        if os.path.isfile(os.path.join(folder, GENERATION_CONFIG_NAME)):
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        *args: Any,
        published_format: bool = False,
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        """Write our format (config + safetensors, sharded above max_shard_size), or the published layout, and
        generation_config.json. End-of-text and start ids set on `model.generation_config` or `model.config` (the
        transformers way) are saved, the generation config's first; another change to `model.config` is refused:
        the weights were built for the model's own config."""
        core, hf = self.model.config, self.mudd_config_edits()
        ids = {}
        for name in ("bos_token_id", "eos_token_id"):
            edited = [getattr(c, name) for c in (self.generation_config, self.config) if getattr(c, name) is not None]
            ids[name] = next((v for v in edited if v != getattr(core, name)), getattr(core, name))
        changed = [k for k, v in hf.items() if k not in ids and v != getattr(core, k)]
        if changed:
            raise InputError(
                f"model.config.{changed[0]} was changed to {hf[changed[0]]!r} but the model was built with "
                f"{getattr(core, changed[0])!r}; build a new model (MuddForCausalLM(config)) for another architecture"
            )
        self.model.config = core.replace(**ids)
        for name, value in ids.items():
            setattr(self.config, name, value)
            setattr(self.generation_config, name, value)
        save_model(
            self.model, os.fspath(folder), published_format=published_format, max_shard_size=max_shard_size, dtype=dtype
        )
        write_json_atomic(
            os.path.join(folder, GENERATION_CONFIG_NAME),
            json.loads(self.generation_config.to_json_string(use_diff=True)),
        )

    def mudd_config_edits(self) -> dict[str, Any]:
        """The MuddConfig fields as `model.config` holds them now."""
        return {k: getattr(self.config, k) for k in MuddConfig.__dataclass_fields__ if hasattr(self.config, k)}


class MuddPythiaForCausalLM(MuddForCausalLM):
    """What AutoModelForCausalLM builds for a published MUDDPythia folder (the same model)."""

    config_class = MuddPythiaHFConfig


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModelForCausalLM / AutoTokenizer know our model types (no trust_remote_code)."""
    for config_class, model_class in ((MuddHFConfig, MuddForCausalLM), (MuddPythiaHFConfig, MuddPythiaForCausalLM)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        AutoTokenizer.register(config_class, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)


register_auto_classes()
