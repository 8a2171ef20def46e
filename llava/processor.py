"""One LLaVA processor: prompt template, ``<image>`` placeholder, pixels, padding side, device and dtype.

Every front-end builds its model inputs through ``LlavaProcessor`` (run_llava, serve.cli's chat session,
the evaluation engine, the bench, the main job), so that the prompt format and the image handling are
written once, as Hugging Face's llava processors own them for their models::

    processor = LlavaProcessor.from_model(model, tokenizer, image_processor, conv_mode="vicuna_v1")
    inputs = processor(["What is in the picture?"], [image])       # LlavaInputs
    output_ids = model.generate(**inputs.generate_kwargs(), max_new_tokens=32)

The training dataset (``llava.train.dataset.LazySupervisedDataset``) takes a processor too, made with
``LlavaProcessor.for_training``: its template, ``image_token`` and ``image_pixels`` (its prompts are whole
conversations, tokenized and masked by ``llava.train.preprocess``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import Conversation, get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token

PADDING_SIDES = ("left", "right")


def image_token_text(mm_use_im_start_end: bool) -> str:
    """The text that stands for one image in a prompt: ``<image>``, wrapped in ``<im_start>``/``<im_end>``
    for models that use them."""
    if mm_use_im_start_end:
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return DEFAULT_IMAGE_TOKEN


def place_images(question: str, image_token: str, num_images: int) -> str:
    """The user turn with its images: where the question says ``<image-placeholder>`` or ``<image>``
    (as many as there are images), else one ``image_token`` per image in front of the question."""
    for marker in (IMAGE_PLACEHOLDER, DEFAULT_IMAGE_TOKEN):
        placed = question.count(marker)
        if placed:
            if placed != num_images:
                raise ValueError(f"the question has {placed} {marker} but {num_images} images were given")
            if marker == image_token:
                return question
            return re.sub(re.escape(marker), image_token, question)
    return (image_token + "\n") * num_images + question


@dataclass
class LlavaInputs:
    """What ``LlavaProcessor`` returns. input_ids / attention_mask: (B, L) with ``IMAGE_TOKEN_INDEX`` where
    each image goes; images: (N, 3, S, S) pixels, or for anyres a list of (views_i, 3, S, S); image_sizes:
    (width, height) of each image; prompts: the prompt strings. host_input_ids / host_attention_mask: the
    same (B, L) tensors on the CPU, as tokenized before the move to the model's device (None: not kept)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: torch.Tensor | list[torch.Tensor] | None
    image_sizes: list[tuple[int, int]] | None
    prompts: list[str]
    host_input_ids: torch.Tensor | None = None
    host_attention_mask: torch.Tensor | None = None

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``LlavaLlamaForCausalLM.generate`` / ``forward`` (and the compiled path's
        ``CompiledLlava.generate``). With images, the host copies of the prompt go along: the splice reads
        the spliced width from them on the host instead of from the device (no host synchronisation in
        the image path and the splice; ``LlavaMetaForCausalLM.splice_image_features``)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.images is not None:
            out.update(images=self.images, image_sizes=self.image_sizes)
            if self.host_input_ids is not None:
                out.update(host_input_ids=self.host_input_ids, host_attention_mask=self.host_attention_mask)
        return out


class LlavaProcessor:
    """Builds LLaVA prompts and inputs. ``conv_mode``: a template of ``llava.conversation``;
    ``padding_side``: "left" for generation (every prompt ends where the reply starts)."""

    def __init__(
        self,
        tokenizer,
        image_processor,
        model_config,
        conv_mode: str = "vicuna_v1",
        padding_side: str = "left",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.template: Conversation = get_conv_template(conv_mode)
        self.conv_mode = conv_mode
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.padding_side = padding_side
        self.device = torch.device(device)
        self.dtype = dtype
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.unk_token_id or 0)

    @classmethod
    def from_model(cls, model, tokenizer, image_processor, conv_mode: str = "vicuna_v1", padding_side: str = "left"):
        """A processor for ``model``: its config, and the device and dtype of its input embeddings."""
        weight = model.get_input_embeddings().weight
        return cls(tokenizer, image_processor, model.config, conv_mode, padding_side, weight.device, weight.dtype)

    @classmethod
    def for_training(cls, tokenizer, image_processor, conv_mode: str, *, image_aspect_ratio: str = "pad",
                     image_grid_pinpoints=None, mm_use_im_start_end: bool = False):
        """The training data's processor: the data arguments decide the image handling (LLaVA's training
        writes them into the model config afterwards), pixels stay float32 on the CPU (the trainer moves
        and casts batches), right padding. ``image_processor=None``: a text-only model."""
        config = SimpleNamespace(image_aspect_ratio=image_aspect_ratio, image_grid_pinpoints=image_grid_pinpoints,
                                 mm_use_im_start_end=mm_use_im_start_end)
        return cls(tokenizer, image_processor, config, conv_mode, padding_side="right")

    # ----- prompts --------------------------------------------------------------------------------
    @property
    def image_token(self) -> str:
        """The text that stands for one image in a prompt (with start/end tokens where the model uses them)."""
        return image_token_text(bool(getattr(self.model_config, "mm_use_im_start_end", False)))

    def place_images(self, question: str, num_images: int) -> str:
        return place_images(question, self.image_token, num_images)

    def conversation(self) -> Conversation:
        """A fresh copy of the template (for multi-turn front-ends)."""
        return self.template.copy()

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """One user turn and the assistant's prefix in the template."""
        conv = self.conversation()
        conv.append_message(conv.roles[0], self.place_images(question, num_images))
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def tokenize(self, prompt: str) -> torch.Tensor:
        """(L,) token ids with ``IMAGE_TOKEN_INDEX`` for each ``<image>``."""
        return tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")

    # ----- pixels ---------------------------------------------------------------------------------
    def image_pixels(self, images) -> torch.Tensor | list[torch.Tensor]:
        """PIL images -> pixels as the model's ``image_aspect_ratio`` wants them (pad / anyres crops), on
        the processor's device and dtype."""
        pixels = process_images(list(images), self.image_processor, self.model_config)
        if isinstance(pixels, list):
            return [p.to(self.device, dtype=self.dtype) for p in pixels]
        return pixels.to(self.device, dtype=self.dtype)

    # ----- batches --------------------------------------------------------------------------------
    def pad(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad token-id sequences on ``padding_side`` -> (input_ids, attention_mask), both (B, L), on the
        processor's device."""
        input_ids, attention_mask = self.pad_on_host(sequences)
        return input_ids.to(self.device), attention_mask.to(self.device)

    def pad_on_host(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pad`` on the CPU."""
        width = max(len(x) for x in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            span = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    def __call__(self, questions: list[str] | str, images=None) -> LlavaInputs:
        """questions: one per sample; images: None, one PIL image per sample, or a list of images per
        sample (each sample's images in the order of its placeholders)."""
        if isinstance(questions, str):
            questions = [questions]
        if images is None:
            per_sample = [[] for _ in questions]
        else:
            if len(images) != len(questions):
                raise ValueError(f"{len(questions)} questions but {len(images)} image entries")
            per_sample = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
        prompts = [self.build_prompt(q, len(imgs)) for q, imgs in zip(questions, per_sample)]
        host_input_ids, host_attention_mask = self.pad_on_host([self.tokenize(p) for p in prompts])
        input_ids, attention_mask = host_input_ids.to(self.device), host_attention_mask.to(self.device)
        flat = [image for imgs in per_sample for image in imgs]
        pixels = self.image_pixels(flat) if flat else None
        sizes = [image.size for image in flat] if flat else None
        return LlavaInputs(input_ids, attention_mask, pixels, sizes, prompts, host_input_ids, host_attention_mask)
