"""The Hugging Face face of the model: a transformers PreTrainedModel around the plain core.

`MuddForCausalLM.from_pretrained(folder)` reads our folders and the published ones (model_type
"muddformer" / "muddpythia"); `save_pretrained(folder)` writes ours, and with
`published_format=True` the layout the reference code reads. The core (`.model`, a MuddModel)
stays usable on its own.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import checkpoints
from .config import MuddConfig
from .errors import InputError
from .generation import greedy_generate
from .model import MuddModel

_HF_ONLY = {"mudd_format", "architectures", "torch_dtype", "transformers_version", "model_type"}


class MuddHFConfig(PreTrainedConfig):
    """transformers config that carries the MuddConfig fields as attributes."""

    model_type = "muddformer"

    @classmethod
    def from_mudd(cls, cfg: MuddConfig) -> "MuddHFConfig":
        return cls(**cfg.to_dict())

    def mudd_config(self) -> MuddConfig:
        known = set(MuddConfig.__dataclass_fields__)
        return MuddConfig.from_dict({k: v for k, v in self.to_dict().items() if k in known})


class MuddForCausalLM(PreTrainedModel):
    """Causal LM of the MUDD family with the transformers calling conventions (labels -> loss)."""

    config_class = MuddHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

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

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise InputError("padded inputs (attention_mask with zeros) are not supported by this forward; "
                             "run sequences of equal length without padding")
        out = self.model(input_ids, labels=labels)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 eos_token_id: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Greedy continuation: returns the prompt followed by up to max_new_tokens new ids."""
        if do_sample:
            raise InputError("sampling is not available in this generate; use do_sample=False (greedy)")
        return greedy_generate(self.model, input_ids, max_new_tokens, eos_token_id)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *args: Any, torch_dtype: Any = None, dtype: Any = None,
                        device: str | torch.device | None = None, **config_overrides: Any) -> "MuddForCausalLM":
        """Load our folder or a published one.

        dtype (alias torch_dtype): None = float32, "auto" = as stored. Keyword arguments that name
        MuddConfig fields override the folder's config, e.g. attn_impl="sdpa" for the fused kernel.
        """
        core = checkpoints.load_model(os.fspath(folder), dtype=dtype if dtype is not None else torch_dtype,
                                      device=device, **config_overrides)
        return cls(MuddHFConfig.from_mudd(core.config), model=core).eval()

    def save_pretrained(self, folder: str | os.PathLike, *args: Any, published_format: bool = False,
                        max_shard_size: int | str = checkpoints.DEFAULT_SHARD_SIZE, dtype: Any = None,
                        **kwargs: Any) -> None:
        """Write our format (config + safetensors, sharded above max_shard_size), or the published layout."""
        checkpoints.save_model(self.model, os.fspath(folder), published_format=published_format,
                               max_shard_size=max_shard_size, dtype=dtype)
