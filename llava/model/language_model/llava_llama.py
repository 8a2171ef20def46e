"""LLaVA on a LLaMA language model: ``LlavaConfig`` (``model_type`` "llava_llama") and
``LlavaLlamaForCausalLM``, registered with ``AutoConfig`` / ``AutoModelForCausalLM``."""
from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PretrainedConfig,
)
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaPreTrainedModel,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from llava.constants import IGNORE_INDEX
from visionzip.llm import (
    LLMTokenPruner,
    PrunedGroup,
    PrunedPrefix,
    PruningContext,
    Selection,
    attention_rows_from_qk,
    compact_positions,
    drop_tokens,
    insert_and_drop,
)

from ..llava_arch import LlavaMetaForCausalLM, LlavaMetaModel, newline_init_std
from ..multimodal_encoder.builder import resolve_vision_tower_path


class LlavaConfig(LlamaConfig):
    """A LLaMA config plus LLaVA's ``mm_*`` keys (and ``visual_compression``), all stored as attributes."""

    model_type = "llava_llama"


class LlavaRotaryEmbedding(LlamaRotaryEmbedding):
    """LLaMA's rotary embedding, whose cos / sin tables can be rounded to ``table_dtype``.

    transformers 4.x (the original LLaVA's) computed these tables once, in the dtype the model was created
    in, and kept them when the model was cast later. The original builder creates every model in float16,
    so the original run "in float32" (its builder, then ``model.float()``) used float16-rounded tables.
    ``table_dtype = torch.float16`` reproduces that; None (the default) keeps exact float32 tables.
    """

    table_dtype: torch.dtype | None = None

    def forward(self, x, position_ids):
        cos, sin = super().forward(x, position_ids)
        if self.table_dtype is None:
            return cos, sin
        return cos.to(self.table_dtype).to(cos.dtype), sin.to(self.table_dtype).to(sin.dtype)


@dataclass
class PrunedLLMOutput:
    """What ``LlavaLlamaModel.pruned_forward`` returns. last_hidden_state: (B, M, C) after the final norm,
    for the tokens left after the last drop (all of them when nothing was dropped); kept_index: (B, M)
    their positions in the input; kept_valid: (B, M) bool, False on re-padding slots; cache: the KV cache."""

    last_hidden_state: torch.Tensor
    kept_index: torch.Tensor
    kept_valid: torch.Tensor
    cache: object = None


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.rotary_emb = LlavaRotaryEmbedding(config=config)
        # [VisionZip-LLaVA] in-LLM pruning leaves KV caches whose layers hold different tokens; what each
        # group of layers holds is recorded per cache object (the cache itself stays a transformers cache)
        self._pruned_prefixes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def pruned_prefix(self, cache) -> PrunedPrefix | None:
        """What a pruned prefill left in ``cache`` (None when it holds every token in every layer)."""
        return None if cache is None else self._pruned_prefixes.get(cache)

    def _score_rows(self, layer_index: int, hidden, position_ids, valid):
        """``PruningContext.attention_rows`` for decoder layer ``layer_index`` run on ``hidden`` (B, N, C)
        (the sequence as it enters that layer, no cached past): only the asked rows, from q and k."""
        layer = self.layers[layer_index]
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        head_dim = attn.head_dim
        normed = layer.input_layernorm(hidden)
        cos, sin = self.rotary_emb(hidden, position_ids)

        def rows(query_index: torch.Tensor) -> torch.Tensor:
            picked = query_index.unsqueeze(-1).expand(-1, -1, normed.shape[-1])
            queries = attn.q_proj(normed.gather(1, picked)).view(batch, query_index.shape[1], -1, head_dim)
            keys = attn.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
            table = query_index.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
            queries, _ = apply_rotary_pos_emb(
                queries.transpose(1, 2), queries.transpose(1, 2), cos.gather(1, table), sin.gather(1, table)
            )
            _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
            return attention_rows_from_qk(queries, keys, query_index, valid, attn.scaling)

        return rows

    def pruned_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        visual_mask: torch.Tensor | None = None,
        pruner: LLMTokenPruner | None = None,
    ) -> PrunedLLMOutput:
        """The decoder stack with in-LLM token pruning (FastV, PyramidDrop, ...): our own loop over the
        layer modules, SDPA (the model's attention kernels) in every layer.

        inputs_embeds: (B, N, C); attention_mask: (B, past + N) over the caller's index space (None: all
        valid); position_ids: (B, N); visual_mask: (B, N) bool, where visual tokens sit.
        Prefill (empty cache, a pruner and visual tokens): before each of ``pruner.layers`` the unkept
        tokens leave the hidden states, positions and mask; layers from there on cache only the kept ones.
        Later calls on that cache (decoding, later chat turns) give each group of layers the padding mask
        and positions of the tokens it holds. Later chunks are never pruned.
        """
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length(0) if cache is not None else 0
        state = self.pruned_prefix(cache)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=device)
        attention_mask = attention_mask.bool()
        if attention_mask.shape[1] != past + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions; the cache holds {past} and the "
                f"input {length}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device).expand(batch, -1)
        position_ids = position_ids.expand(batch, -1)
        prune = (
            pruner is not None and visual_mask is not None and past == 0 and state is None and bool(visual_mask.any())
        )
        drop_layers = tuple(pruner.layers) if prune else ()
        score_layers = {pruner.score_layer(layer): layer for layer in drop_layers}
        for score, drop in score_layers.items():
            if any(score < other < drop for other in drop_layers):
                raise ValueError(f"pruner scores the drop at layer {drop} by layer {score}, across another drop")

        hidden = inputs_embeds
        key_mask, positions = attention_mask, position_ids
        valid = attention_mask[:, past:]
        index = torch.arange(length, device=device).expand(batch, -1)
        visual = visual_mask.bool() & valid if prune else None
        initial_visual = visual.sum(dim=1) if prune else None
        input_visual = visual
        shift = torch.zeros(batch, dtype=torch.long, device=device)
        groups: list[PrunedGroup] = []
        snapshots = {}
        causal_mask = position_embeddings = None
        for layer_index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            changed = causal_mask is None
            if layer_index in drop_layers:
                # the sequence as it entered the scoring layer (this one: as it is now)
                hidden_in, positions_in, valid_in = snapshots.pop(layer_index, (hidden, positions, valid))
                context = PruningContext(
                    layer_index, visual, valid, initial_visual,
                    self._score_rows(pruner.score_layer(layer_index), hidden_in, positions_in, valid_in),
                    hidden=hidden, input_index=index, inputs_embeds=inputs_embeds, input_visual_mask=input_visual,
                )
                selection = pruner.select(context)
                if isinstance(selection, Selection):
                    # tokens inserted (recycled) after the kept ones: positions renumbered contiguously
                    keep = selection.keep & valid
                    count = selection.extra.shape[1]
                    dropped = insert_and_drop(keep, selection.extra_valid, selection.insert_after)
                    start = positions.masked_fill(~valid, torch.iinfo(positions.dtype).max).min(dim=1).values
                    before = valid.sum(dim=1)
                    anchor = index.gather(1, selection.insert_after.unsqueeze(1)).expand(-1, count)
                    hidden = dropped.gather(torch.cat([hidden, selection.extra.to(hidden.dtype)], dim=1))
                    index = dropped.gather(torch.cat([index, anchor], dim=1))
                    visual = dropped.gather(torch.cat([visual, selection.extra_valid], dim=1)) & dropped.valid
                    valid = key_mask = dropped.valid
                    positions = (start.unsqueeze(1) + valid.long().cumsum(dim=1) - 1).clamp_min(0)
                    shift = shift + before - valid.sum(dim=1)
                else:
                    keep = selection & valid
                    if not pruner.keep_original_positions:
                        positions = compact_positions(positions, keep, valid)
                        shift = shift + (valid & ~keep).sum(dim=1)
                    dropped = drop_tokens(keep)
                    hidden, positions, index = dropped.gather(hidden), dropped.gather(positions), dropped.gather(index)
                    visual = dropped.gather(visual) & dropped.valid
                    valid = key_mask = dropped.valid
                groups.append(PrunedGroup(layer_index, index, valid, shift.clone()))
                changed = True
            elif state is not None and any(group.start == layer_index for group in state.groups):
                group = state.group_of(layer_index)
                key_mask = group.key_mask(attention_mask, state.prefix_length)
                positions = position_ids - group.position_shift.unsqueeze(1)
                changed = True
            if layer_index in score_layers and score_layers[layer_index] != layer_index:
                snapshots[score_layers[layer_index]] = (hidden, positions, valid)  # entering the scoring layer
            if changed:
                causal_mask = create_causal_mask(
                    config=self.config, inputs_embeds=hidden, attention_mask=key_mask, cache=cache,
                    position_ids=positions, layer_idx=layer_index,
                )
                position_embeddings = self.rotary_emb(hidden, positions)
            hidden = decoder_layer(
                hidden,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=positions,
                cache=cache,
                use_cache=use_cache,
            )
        if groups and cache is not None:
            self._pruned_prefixes[cache] = PrunedPrefix(length, groups)
        return PrunedLLMOutput(self.norm(hidden), index, valid, cache)


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    """LLaMA causal LM with LLaVA's image input: ``forward(..., images, image_sizes)`` and
    ``generate(inputs, images=..., image_sizes=...)``; visual tokens compressed per ``config.visual_compression``.
    """

    config_class = LlavaConfig
    # the tower's weights in a checkpoint are a copy of mm_vision_tower's, which is what gets loaded (as in
    # the original); a trained tower (unfreeze_mm_vision_tower) is built at init and takes them.
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\."]

    def __init__(self, config):
        # skip LlamaForCausalLM.__init__, which would build a plain LlamaModel first
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaLlamaModel:
        return self.model

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LlavaLlamaModel) and getattr(module, "image_newline", None) is not None:
            init.normal_(module.image_newline, mean=0.0, std=newline_init_std(self.config.hidden_size))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_vision_tower: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``, plus: a relative ``mm_vision_tower`` that exists inside or
        beside the checkpoint folder resolves there, and the tower's weights are loaded from it
        (``load_vision_tower=False`` leaves that to the caller, as the original's ``delay_load`` did)."""
        path = str(pretrained_model_name_or_path)
        config = kwargs.get("config")
        if isinstance(config, PretrainedConfig):
            if getattr(config, "mm_vision_tower", None):
                config.mm_vision_tower = resolve_vision_tower_path(config.mm_vision_tower, path)
        elif config is None and os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
                tower = json.load(handle).get("mm_vision_tower")
            if tower and "mm_vision_tower" not in kwargs:
                kwargs["mm_vision_tower"] = resolve_vision_tower_path(tower, path)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if load_vision_tower:
            model.get_model().load_vision_tower()
        return loaded

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.FloatTensor | list | None = None,
        image_sizes: list | None = None,
        visual_mask: torch.Tensor | None = None,
        host_input_ids: torch.Tensor | None = None,
        host_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # visual_mask (B, N) bool: where the visual tokens of inputs_embeds sit (generate passes the splice's;
        # in-LLM methods prune among them). host_input_ids / host_attention_mask: CPU copies of the prompt
        # (LlavaInputs.generate_kwargs): the inference splice reads its width from them, not from the device
        if inputs_embeds is None and images is not None and input_ids is not None and input_ids.shape[1] > 1:
            spliced = self.splice_multimodal(
                input_ids, images, image_sizes, attention_mask, position_ids, labels,
                host_input_ids=host_input_ids, host_attention_mask=host_attention_mask,
            )
            input_ids, inputs_embeds = None, spliced.inputs_embeds
            attention_mask, position_ids, labels = spliced.attention_mask, spliced.position_ids, spliced.labels
            visual_mask = spliced.visual_mask
        # [VisionZip-LLaVA] in-LLM methods (FastV, PyramidDrop) run the decoder layers in our own loop, which
        # drops visual tokens between layers and keeps per-layer KV caches of different lengths
        pruner = self.llm_pruner()
        if inputs_embeds is None or visual_mask is None or visual_mask.shape != inputs_embeds.shape[:2]:
            visual_mask = None  # decoding steps of generate carry the prefill's mask along: nothing to prune
        if (pruner is not None and visual_mask is not None) or self.get_model().pruned_prefix(cache) is not None:
            return self._pruned_forward(
                input_ids, inputs_embeds, attention_mask, position_ids, cache, labels, use_cache, visual_mask, pruner,
                kwargs.get("logits_to_keep", 0),
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    def llm_pruner(self) -> LLMTokenPruner | None:
        """The in-LLM pruning schedule of the configured compression (None for vision-side methods / none)."""
        compression = self.get_visual_compression()
        if not compression.enabled or compression.settings.stage != "llm":
            return None
        tower = self.get_vision_tower()
        view_tokens = tower.num_patches if tower is not None else None
        return compression.settings.llm_pruner(int(self.config.num_hidden_layers), view_tokens=view_tokens)

    def _pruned_forward(
        self, input_ids, inputs_embeds, attention_mask, position_ids, cache, labels, use_cache, visual_mask, pruner,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        """``forward`` through ``LlavaLlamaModel.pruned_forward``: logits (and labels, for the loss) of the
        tokens left after the last drop, in order, left-padded (padding labelled IGNORE_INDEX);
        ``logits_to_keep`` > 0: only the last that many positions' logits (no loss then)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_model().embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.get_model().pruned_forward(
            inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask, pruner
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None and hidden.shape[1] == out.kept_index.shape[1]:
            kept_labels = labels.gather(1, out.kept_index).masked_fill(~out.kept_valid, IGNORE_INDEX)
            loss = self.loss_function(logits=logits, labels=kept_labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache if use_cache else None)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
        """Generate from token ids with ``<image>`` placeholders and their images, or from
        ``inputs_embeds`` already spliced (``splice_multimodal``).

        Returns only the new tokens (transformers generates from embeddings here). Batches are padded on
        the left whatever ``tokenizer_padding_side`` says, so that every sample continues from its end.
        ``host_input_ids`` / ``host_attention_mask``: CPU copies of the prompt (``LlavaInputs.generate_kwargs``
        passes them): with them the image path and the splice make no host synchronisation (the splice's
        width is read on the host); they are not handed on to transformers.
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        host_input_ids = kwargs.pop("host_input_ids", None)
        host_attention_mask = kwargs.pop("host_attention_mask", None)
        if kwargs.get("inputs_embeds") is not None:
            if inputs is not None or images is not None:
                raise ValueError("generate takes either token ids (with images) or inputs_embeds, not both")
            return super().generate(**kwargs)
        if inputs is None:
            raise ValueError("generate needs `inputs` (token ids with IMAGE_TOKEN_INDEX where images go)")
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if images is not None:
            # [VisionZip-LLaVA] always left padding here: right padding (the checkpoints' training setting)
            # would put pads between a prompt and its continuation in a batch.
            spliced = self.splice_multimodal(
                inputs, images, image_sizes, attention_mask, position_ids, padding_side="left",
                host_input_ids=host_input_ids, host_attention_mask=host_attention_mask,
            )
            inputs_embeds, attention_mask, position_ids = (
                spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
            )
            if self.llm_pruner() is not None:
                # in-LLM methods prune in the prefill forward: it needs to know where the visual tokens are
                kwargs["visual_mask"] = spliced.visual_mask
        else:
            inputs_embeds = self.get_model().embed_tokens(inputs)
        return super().generate(
            position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )

AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
