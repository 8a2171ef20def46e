"""LLaVA on a LLaMA language model: ``LlavaConfig`` (``model_type`` "llava_llama") and
``LlavaLlamaForCausalLM``, registered with ``AutoConfig`` / ``AutoModelForCausalLM``."""
from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PretrainedConfig,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel, LlamaRotaryEmbedding

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


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.rotary_emb = LlavaRotaryEmbedding(config=config)


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
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.FloatTensor | list | None = None,
        image_sizes: list | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
                )
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
        """Generate from token ids with ``<image>`` placeholders and their images, or from
        ``inputs_embeds`` already spliced (``prepare_inputs_labels_for_multimodal``).

        Returns only the new tokens (transformers generates from embeddings here). Batches are padded on
        the left whatever ``tokenizer_padding_side`` says, so that every sample continues from its end.
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
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
            _, position_ids, attention_mask, _, inputs_embeds, _ = self.prepare_inputs_labels_for_multimodal(
                inputs, position_ids, attention_mask, None, None, images, image_sizes, padding_side="left"
            )
        else:
            inputs_embeds = self.get_model().embed_tokens(inputs)
        return super().generate(
            position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )

AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
