"""LLaVA on a LLaMA language model: ``LlavaConfig`` (``model_type`` "llava_llama") and
``LlavaLlamaForCausalLM``, registered with ``AutoConfig`` / ``AutoModelForCausalLM``."""
from __future__ import annotations

import json
import logging
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

from llava.constants import IGNORE_INDEX
from llava.preflight import PromptTooLong, check_prompts_fit, model_max_positions, spliced_positions
from visionzip.copied import copied_from
from visionzip.decoder_loop import PrunedDecoderOutput, pruned_decoder_forward, pruned_prefix
from visionzip.llm import LLMTokenPruner, PrunedPrefix

from ..llava_arch import LlavaMetaForCausalLM, LlavaMetaModel, newline_init_std
from ..multimodal_encoder.builder import resolve_vision_tower_path

logger = logging.getLogger(__name__)


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

    @staticmethod
    def pruned_prefix(cache) -> PrunedPrefix | None:
        """What a pruned prefill left in ``cache`` (None when it holds every token in every layer)."""
        return pruned_prefix(cache)

    def pruned_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        visual_mask: torch.Tensor | None = None,
        pruner: LLMTokenPruner | None = None,
    ) -> PrunedDecoderOutput:
        """The decoder stack with in-LLM token pruning (FastV, PyramidDrop, ...).

        [VisionZip-LLaVA] the original LLaVA has no such loop (each method's official code patches its own
        copy of LlamaModel.forward). Ours is ``visionzip.decoder_loop.pruned_decoder_forward``, the one loop
        the transformers families use too: this model's own layer modules, SDPA in every layer, drops
        between layers, per-layer KV caches of different lengths (see that module).

        inputs_embeds: (B, N, C); attention_mask: (B, past + N) over the caller's index space (None: all
        valid); position_ids: (B, N); visual_mask: (B, N) bool, where visual tokens sit.
        """
        return pruned_decoder_forward(
            self, inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask, pruner
        )


def resolve_tower_setting(key: str, path: str, kwargs: dict) -> None:
    """A relative tower folder in config setting ``key`` (``mm_vision_tower``, Mini-Gemini's
    ``mm_vision_tower_aux``) that exists inside or beside the checkpoint folder ``path`` resolves there: in the
    ``config`` of ``from_pretrained``'s ``kwargs`` when one is given, else as a ``kwargs`` override of the
    folder's ``config.json`` (a caller's own ``kwargs[key]`` wins)."""
    config = kwargs.get("config")
    if isinstance(config, PretrainedConfig):
        if getattr(config, key, None):
            setattr(config, key, resolve_vision_tower_path(getattr(config, key), path))
    elif config is None and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            tower = json.load(handle).get(key)
        if tower and key not in kwargs:
            kwargs[key] = resolve_vision_tower_path(tower, path)


def right_padded_from_zero(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> bool:
    """True when ``attention_mask`` (B, N) holds each row's tokens first and its padding after them, and
    ``position_ids`` (None, or (B, N) / (1, N)) numbers those tokens 0, 1, ...: the batch then means the same
    without the mask and with the default positions, for every token that is not padding."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):  # a token after a pad: not right padding
        return False
    if position_ids is None:
        return True
    if position_ids.dim() != 2 or position_ids.shape[-1] != mask.shape[-1]:
        return False
    counting = torch.arange(mask.shape[-1], device=position_ids.device).expand_as(mask)
    return bool((position_ids.expand_as(mask) == counting)[mask].all())


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    """LLaMA causal LM with LLaVA's image input: ``forward(..., images, image_sizes)`` and
    ``generate(inputs, images=..., image_sizes=...)``; visual tokens compressed per ``config.visual_compression``.
    """

    config_class = LlavaConfig
    # the tower's weights in a checkpoint are a copy of mm_vision_tower's, which is what gets loaded (as in
    # the original); a trained tower (unfreeze_mm_vision_tower) is built at init and takes them.
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\."]
    # the inner model __init__ builds; a family on this stack (Mini-Gemini) names its own
    inner_model_class = LlavaLlamaModel

    # Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaForCausalLM.__init__ (our model class)
    @copied_from("transformers.models.llama.modeling_llama.LlamaForCausalLM.__init__", sha="618b27227797b4c6", version="5.25.0")
    def __init__(self, config):
        # skip LlamaForCausalLM.__init__, which would build a plain LlamaModel first
        LlamaPreTrainedModel.__init__(self, config)
        self.model = self.inner_model_class(config)
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
        resolve_tower_setting("mm_vision_tower", path, kwargs)
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
                kwargs.get("logits_to_keep", 0), kwargs.get("num_items_in_batch"),
            )
        if labels is not None and self.training and not kwargs.get("logits_to_keep") and "shift_labels" not in kwargs:
            return self._supervised_forward(
                input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, use_cache, **kwargs
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

    # Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaForCausalLM.forward: logits_to_keep,
    # lm_head and loss_function on the kept tokens
    @copied_from("transformers.models.llama.modeling_llama.LlamaForCausalLM.forward", sha="94199f7a0fd577c2", version="5.25.0")
    def _pruned_forward(
        self, input_ids, inputs_embeds, attention_mask, position_ids, cache, labels, use_cache, visual_mask, pruner,
        logits_to_keep: int = 0, num_items_in_batch=None,
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
            # num_items_in_batch (the Trainer's count of supervised tokens over the accumulated micro-batches):
            # the Trainer then leaves the loss undivided by the accumulation steps, so a mean here would scale
            # the gradients by them; pruning drops only unlabelled visual tokens, so the count still holds
            loss = self.loss_function(logits=logits, labels=kept_labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache if use_cache else None)

    # Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaForCausalLM.forward: the decoder,
    # lm_head and loss_function, the lm_head and the loss on the supervised positions only
    @copied_from("transformers.models.llama.modeling_llama.LlamaForCausalLM.forward", sha="94199f7a0fd577c2", version="5.25.0")
    def _supervised_forward(
        self, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, use_cache, **kwargs
    ) -> CausalLMOutputWithPast:
        """``forward`` in training with labels: the same loss as transformers' (labels shifted left by one,
        ``loss_function``'s sum / ``num_items_in_batch`` when the Trainer passes it, else the mean over the
        supervised tokens), with ``lm_head`` and the cross-entropy run only where a shifted label is not
        IGNORE_INDEX.

        [VisionZip-LLaVA] the original LLaVA computes the logits of every position and lets the
        cross-entropy ignore the unlabelled ones; in a LLaVA batch most positions are image and prompt
        tokens, so that was most of lm_head's work (forward and backward) for nothing. The returned
        ``logits`` are therefore those of the supervised positions only, (K, vocab) in row-major order of
        (sample, position), not (B, N, vocab); a caller that needs every position's logits runs the model in
        eval mode or without labels (generate and the evaluation do).

        [VisionZip-LLaVA] a right-padded batch whose tokens sit at positions 0, 1, ... (LLaVA's training
        batches) runs without its padding mask: causal attention already keeps every real token from the pads
        after it, and no pad is scored, so the loss and the gradients are the same; SDPA then takes its causal
        kernel instead of a masked one (on CPU about half the attention's time in a toy stage-2 step).
        """
        if cache is None and right_padded_from_zero(attention_mask, position_ids):  # a cache's past keeps its mask
            attention_mask = position_ids = None
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # the shift of transformers' ForCausalLMLoss: position n is scored on label n + 1
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden_states.device)
        supervised = shift_labels != IGNORE_INDEX
        logits = self.lm_head(hidden_states[supervised])
        loss = self.loss_function(
            logits=logits, labels=None, vocab_size=self.config.vocab_size, shift_labels=shift_labels[supervised],
            **kwargs,
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prompt_positions(self, input_ids, images=None, image_sizes=None, attention_mask=None, host_input_ids=None,
                         host_attention_mask=None) -> list[int]:
        """Positions each prompt of a batch takes once its images' visual tokens are spliced in, uncut
        (encodes the images: ``generate`` asks only for a prompt that reached the model's limit)."""
        ids = host_input_ids if host_input_ids is not None else input_ids.cpu()
        mask = host_attention_mask if host_input_ids is not None else attention_mask
        sizes = []
        if images is not None:
            sizes = [int(f.shape[0]) for f in self.get_image_features(images, image_sizes).per_image]
        return spliced_positions(ids, sizes, None if mask is None else mask.cpu())

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
        """Generate from token ids with ``<image>`` placeholders and their images, or from
        ``inputs_embeds`` already spliced (``splice_multimodal``).

        Returns only the new tokens (transformers generates from embeddings here). Batches are padded on
        the left whatever ``tokenizer_padding_side`` says, so that every sample continues from its end.
        ``host_input_ids`` / ``host_attention_mask``: CPU copies of the prompt (``LlavaInputs.generate_kwargs``
        passes them): with them the image path and the splice make no host synchronisation (the splice's
        width is read on the host); they are not handed on to transformers.
        ``prompt_too_long``: "error" (default) refuses a prompt beyond the model's positions
        (``llava.preflight.PromptTooLong``, rows and lengths named); "truncate" cuts it as the original
        LLaVA did, with a warning (only to reproduce the original's outputs).
        """
        prompt_too_long = kwargs.pop("prompt_too_long", "error")
        if prompt_too_long not in ("error", "truncate"):
            raise ValueError(f"prompt_too_long must be 'error' or 'truncate', got {prompt_too_long!r}")
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
            inputs_embeds, spliced_mask, position_ids = (
                spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
            )
            if self.llm_pruner() is not None:
                # in-LLM methods prune in the prefill forward: it needs to know where the visual tokens are
                kwargs["visual_mask"] = spliced.visual_mask
        else:
            inputs_embeds, spliced_mask = self.get_model().embed_tokens(inputs), attention_mask
        # [VisionZip-LLaVA] the original cut a prompt longer than tokenizer_model_max_length (its question
        # and "ASSISTANT:" with it) and answered anyway; here a prompt that leaves no room for a reply is
        # refused by name (the policy of every entry point, llava.preflight.check_prompts_fit), and the
        # reply stops where the model's positions end. The spliced width is the longest prompt (capped at
        # the cut), known without a host read; only a prompt at the limit is counted exactly.
        limit = model_max_positions(self.config)
        if limit is not None:
            positions = [inputs_embeds.shape[1]]
            if positions[0] >= limit:
                positions = self.prompt_positions(inputs, images, image_sizes, attention_mask, host_input_ids,
                                                  host_attention_mask)
            try:
                room = check_prompts_fit(positions, kwargs.get("max_new_tokens"), limit)
                if kwargs.get("max_new_tokens") is not None:
                    kwargs["max_new_tokens"] = room
            except PromptTooLong as err:
                if prompt_too_long == "error":
                    raise
                logger.warning("prompt_too_long='truncate': %s; cut as the original LLaVA did", err)
        attention_mask = spliced_mask
        return super().generate(
            position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )

AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
