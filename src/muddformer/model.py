"""The plain-PyTorch model: embed -> blocks fed by a connection -> norm -> untied head.

It knows nothing about parallelism, checkpoints or Hugging Face (architecture, ideas 3 and 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from muddformer._utils import at_least_float32, fork_default_device_rng
from muddformer.config import MuddConfig
from muddformer.connections import build_connection
from muddformer.errors import InputError
from muddformer.layers import AttentionContext, Block, RMSNorm, make_norm, rotary_table, window_band
from muddformer.moe import MoEFeedForward, inactive_parameters


@dataclass
class CausalLMOutput:
    """logits (B, T, vocab); with labels, the mean shifted next-token loss; with experts, `aux_loss`: the
    router losses weighted by moe_aux_loss_weight and moe_z_loss_weight, summed over layers, for training
    to add (it is not in `loss`, which stays the language-model loss)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class MuddModel(nn.Module):
    """A causal language model of the MUDD family, configured by one MuddConfig."""

    rope: torch.Tensor  # a buffer: the rotary table of every position (block_size, 2, rotary_dim)

    def __init__(self, cfg: MuddConfig):
        super().__init__()
        self.config = cfg
        # The window of the windowed layers (0: none); parsed once, not on every forward.
        self.attn_window = cfg.attn_window if any(cfg.attn_windows) else 0
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        with fork_default_device_rng():  # the body draws the same numbers at one seed whatever the connection
            self.connection = build_connection(cfg)
        self.layers = nn.ModuleList(
            Block(cfg, layer, width, self.connection.multiway_input(layer))
            for layer, width in enumerate(cfg.ffn_widths)
        )
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rotary_table(cfg), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Fresh weights: matrices by `init_method` (init_matrix), norms 1, biases 0; then the connection's own
        init, which makes a fresh model compute exactly what a residual one does."""
        connection_modules = set(self.connection.modules())
        outputs = {id(m) for block in self.layers for m in output_projections(block)}
        for module in self.modules():
            if module in connection_modules:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                self.init_matrix(module.weight, output=id(module) in outputs)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoEFeedForward):
                module.reset_parameters(self.init_matrix)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)
        self.connection.reset_parameters()

    def init_matrix(self, weight: torch.Tensor, output: bool = False) -> None:
        """One weight matrix (out, in): N(0, init_std); Xavier normal; or GPT-NeoX's (Pythia's) small_init
        N(0, sqrt(2 / 5D)), with wang_init N(0, 2 / (L sqrt(D))) for a block's `output` projections (attention
        out, FFN down)."""
        cfg = self.config
        if cfg.init_method == "xavier":
            nn.init.xavier_normal_(weight)
        elif cfg.init_method == "neox":
            std = 2 / (cfg.n_layer * math.sqrt(cfg.dim)) if output else math.sqrt(2 / (5 * cfg.dim))
            nn.init.normal_(weight, std=std)
        else:
            nn.init.normal_(weight, std=cfg.init_std)

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute the rotary table from the config (float32, with its configured rounding)."""
        self.rope = rotary_table(self.config, device=self.rope.device if device is None else device)

    def _apply(self, fn, recurse=True):
        # Keep the rotary table float32 whatever dtype the weights take.
        super()._apply(fn, recurse)
        self.reset_rope()
        return self

    def check_inputs(self, input_ids: torch.Tensor, past: int = 0) -> None:
        """Clear errors for inputs the model cannot take, instead of an index error deep inside."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        T = input_ids.shape[1]
        if T == 0:
            raise InputError("input_ids is empty: give at least one token")
        if past + T > self.config.block_size:
            raise InputError(
                f"sequence length {past + T} exceeds the context length block_size={self.config.block_size}; "
                "truncate the input or use a model with a longer context"
            )
        # The id range is read on the CPU only: on an accelerator it would stop the host every step (training data
        # is checked against the vocabulary once, when the run starts; an id past the table fails in the embedding).
        if torch.compiler.is_compiling() or input_ids.device.type != "cpu":
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = hi if hi >= self.config.vocab_size else lo
            raise InputError(
                f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size}); "
                "the tokenizer and the model do not match"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        cache_position: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits of input_ids (B, T); loss with labels (shifted inside, -100 ignored).

        For generation: `cache` holds keys and values of earlier tokens (a KVCache, StaticKVCache or
        a transformers Cache), `attention_mask` (B, past + T) marks real tokens with 1 and padding
        with 0 (left padding), `cache_position` (T,) gives the cache slots of these tokens and
        `position_ids` (B, T) their rotary positions (by default counted over real tokens only).
        Dense connections mix over depth at each position, so no state beyond the KV cache is kept.
        """
        if cache_position is None:
            past = cache.get_seq_length() if cache is not None else 0
            cache_position = (
                None
                if cache is None and attention_mask is None
                else torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
            )
        elif not torch.compiler.is_compiling():
            past = int(cache_position[0])
        else:
            past = 0
        self.check_inputs(input_ids, past)
        ctx = self.attention_context(input_ids, attention_mask, position_ids, cache, cache_position)
        conn = self.connection
        state = conn.begin(self.tok_embeddings(input_ids))
        for layer, block in enumerate(self.layers):
            conn.run_block(state, layer, cast(Block, block), ctx)
        logits = self.output(self.norm(conn.output(state)))
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=self.router_loss())

    def router_loss(self) -> torch.Tensor | None:
        """The weighted router losses of the last forward, summed over the mixture-of-experts layers."""
        cfg, total = self.config, None
        for ffn in self.experts():
            assert ffn.balance_loss is not None and ffn.z_loss is not None
            term = cfg.moe_aux_loss_weight * ffn.balance_loss + cfg.moe_z_loss_weight * ffn.z_loss
            total = term if total is None else total + term
        return total

    def experts(self) -> list[MoEFeedForward]:
        """The mixture-of-experts feed-forwards, by layer (empty for a dense model)."""
        ffns = [cast(Block, block).feed_forward for block in self.layers]
        return [ffn for ffn in ffns if isinstance(ffn, MoEFeedForward)]

    def attention_context(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Any,
        cache_position: torch.Tensor | None,
    ) -> AttentionContext:
        T = input_ids.shape[1]
        window = self.attn_window
        if cache_position is None:  # training and plain full forwards: causal over the T tokens
            rope = self.rope[:T][None] if position_ids is None else self.rope[position_ids]
            tokens = torch.arange(T, device=input_ids.device)
            return AttentionContext(rope=rope, window_mask=window_band(tokens, tokens, window) if window else None)
        if position_ids is None:
            if attention_mask is not None:
                counted = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = counted.index_select(1, cache_position)
            else:
                position_ids = cache_position[None]
        keys = cache.max_length if getattr(cache, "max_length", None) else int(cache_position[-1]) + 1
        slots = torch.arange(keys, device=input_ids.device)
        mask = slots[None, :] <= cache_position[:, None]  # (T, S): causal in cache slots
        if attention_mask is not None:
            real = attention_mask.bool()
            if real.shape[1] < keys:
                real = F.pad(real, (0, keys - real.shape[1]))
            # Padding keys are hidden; a query always sees itself so padded rows stay finite.
            mask = (mask[None] & real[:, None, :keys]) | (slots[None, None, :] == cache_position[None, :, None])
            mask = mask[:, None]
        else:
            mask = mask[None, None]
        window_mask = mask & window_band(cache_position, slots, window) if window else None
        return AttentionContext(
            rope=self.rope[position_ids], mask=mask, window_mask=window_mask, cache=cache, cache_position=cache_position
        )


def output_projections(block: nn.Module) -> list[nn.Module]:
    """The block's linear maps that write to the stream: attention's output and the dense FFN's down projection
    (an experts layer marks its own, MoEFeedForward.reset_parameters)."""
    block = cast(Block, block)
    ffn = block.feed_forward
    return [block.attention.wo] + ([] if isinstance(ffn, MoEFeedForward) else [cast(nn.Module, ffn.w2)])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against labels[t+1]; label -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise InputError(f"labels shape {tuple(labels.shape)} does not match input_ids shape {tuple(logits.shape[:2])}")
    # The labels move, not the logits: slicing (B, T, V) logits would copy them, and their gradient, whole.
    return next_token_loss(logits, F.pad(labels[:, 1:], (0, 1), value=-100))


def training_loss(out: CausalLMOutput) -> torch.Tensor:
    """What training minimises: the language-model loss plus the weighted router losses of any experts."""
    assert out.loss is not None, "training_loss needs an output computed with labels"
    return out.loss if out.aux_loss is None else out.loss + out.aux_loss


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, in float32 at least, of logits (B, T, V) against already-shifted targets (B, T);
    -100 ignored."""
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(at_least_float32(flat), targets.reshape(-1), ignore_index=-100)


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Total parameters, the dense-connection ones (generator W1, W2 and static prior) and their share in %."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    core = model if isinstance(model, MuddModel) else model.model
    assert isinstance(core, MuddModel)
    dense = sum(p.numel() for p in core.connection.parameters())
    return {
        "total": total,
        "active": total - inactive_parameters(core.config),
        "dense": dense,
        "dense_pct": 100.0 * dense / total if total else 0.0,
    }


def copy_shared_weights(src: MuddModel, dst: MuddModel) -> list[str]:
    """Copy every body weight of `src` into `dst`; returns the names of dst left untouched.

    Connections differ in their own tensors and in how many pre-norms a block has; a block that
    reads four streams gets the single `attention_norm` of `src` into each of its three norms.
    This starts a dense model from a trained residual one (or compares them on equal weights).
    """
    source = src.state_dict()
    untouched = []
    with torch.no_grad():
        for name, tensor in dst.state_dict().items():
            origin = name if name in source else _single_norm_name(name)
            if origin in source and not name.startswith("connection."):
                if source[origin].shape != tensor.shape:
                    raise InputError(
                        f"cannot copy {origin!r}: shape {tuple(source[origin].shape)} "
                        f"does not match {tuple(tensor.shape)}"
                    )
                tensor.copy_(source[origin])
            else:
                untouched.append(name)
    return untouched


def copy_body_weights(src: MuddModel, dst: MuddModel) -> None:
    """copy_shared_weights for starting a model from another: only the connection's own tensors may be left
    at their (identity) init; any other weight dst has and src lacks (experts, q/k norms added by an override)
    would change the function, and is refused by name."""
    left = [name for name in copy_shared_weights(src, dst) if not name.startswith("connection.")]
    if left:
        raise InputError(
            f"the new config adds weights the source model does not have ({left[0]!r}"
            f"{f' and {len(left) - 1} more' if len(left) > 1 else ''}); change only the connection and its "
            "dense_* options when starting from a model"
        )


def _single_norm_name(name: str) -> str:
    # layers.{l}.attention_norms.{i}.weight -> layers.{l}.attention_norm.weight
    parts = name.split(".")
    if len(parts) == 5 and parts[2] == "attention_norms":
        return ".".join(parts[:2] + ["attention_norm", parts[4]])
    return name


def build_meta(cfg: MuddConfig) -> MuddModel:
    """The model on the meta device: shapes and counts without allocating weights."""
    with torch.device("meta"):
        return MuddModel(cfg)


def parameter_breakdown(cfg: MuddConfig) -> dict:
    model = build_meta(cfg)
    counts = count_parameters(model)
    blocks = sum(p.numel() for p in model.layers.parameters())
    counts.update(
        embedding=model.tok_embeddings.weight.numel(),
        head=0 if cfg.tie_word_embeddings else model.output.weight.numel(),
        blocks=blocks,
        non_embedding=counts["total"] - model.tok_embeddings.weight.numel(),
    )
    return counts
