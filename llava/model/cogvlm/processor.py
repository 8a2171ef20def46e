"""CogVLM's prompt and pixels, as the remote ``build_conversation_input_ids`` makes them.

- prompt (``_history_to_prompt``): "Question: {query} Answer:" for cogvlm-chat-v1.1 (``template_version``
  "chat"), "Question: {query} Short answer:" ("vqa"), the bare query ("base"); earlier turns as
  "Question: {q} Answer: {a}\\n" in front;
- tokens: bos, the image, then the prompt tokenized without special tokens (the Vicuna-7B-v1.5 LLaMA
  tokenizer: the official demo loads ``lmsys/vicuna-7b-v1.5``'s). Where the official input has 1227 pad ids
  typed VISION, ours has one ``IMAGE_TOKEN_INDEX`` that the model expands (``CogVLMForCausalLM.splice``);
- pixels: ``Resize((S, S), BICUBIC)`` of the RGB image (torchvision on a PIL image: PIL's bicubic
  resize), ``ToTensor`` (/ 255), ``Normalize`` with CLIP's mean and std; S = ``vision_config.image_size``.

The inputs are ``llava.processor.LlavaInputs``, so run_llava and the other front-ends hand them to
``model.generate`` as they do LLaVA's.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.processor import PADDING_SIDES, LlavaInputs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ANSWER_FORMATS = {"chat": "Answer:", "vqa": "Short answer:"}


class CogVLMImageProcessor:
    """PIL image -> (3, S, S) float pixels (see the module docstring)."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self.image_mean = CLIP_MEAN
        self.image_std = CLIP_STD

    def __call__(self, images) -> torch.Tensor:
        """One PIL image or a list -> (N, 3, S, S) float32."""
        if isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self.pixels(image) for image in images])

    def pixels(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL image, got {type(image).__name__}")
        resized = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        array = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (array - mean) / std


def cogvlm_prompt(query: str, template_version: str = "chat", history=()) -> str:
    """The official ``_history_to_prompt``."""
    if template_version == "base":
        if history:
            raise ValueError("the 'base' template has no turns: it takes the query alone")
        return query
    if template_version not in ANSWER_FORMATS:
        raise ValueError(f"template_version must be 'base', 'chat' or 'vqa', got {template_version!r}")
    answer = ANSWER_FORMATS[template_version]
    prompt = "".join(f"Question: {q} {answer} {a}\n" for q, a in history)
    return prompt + f"Question: {query} {answer}"


class CogVLMProcessor:
    """CogVLM's inputs with ``LlavaProcessor``'s interface (``__call__``, ``build_prompt``, ``tokenize``,
    ``pad``, ``pad_token_id``). ``template_version``: None = the checkpoint's (``config.template_version``);
    a LLaVA ``conv_mode`` passed by a front-end does not apply to CogVLM and is ignored."""

    def __init__(self, tokenizer, image_processor: CogVLMImageProcessor, model_config, template_version: str | None = None,
                 padding_side: str = "left", device="cpu", dtype: torch.dtype = torch.float32):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.template_version = template_version or model_config.template_version
        cogvlm_prompt("", self.template_version)  # validates it
        self.padding_side = padding_side
        self.device = torch.device(device)
        self.dtype = dtype
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.unk_token_id or 0)

    @classmethod
    def from_model(cls, model, tokenizer, image_processor, conv_mode: str | None = None, padding_side: str = "left"):
        del conv_mode  # LLaVA's templates; CogVLM's is config.template_version
        weight = model.get_input_embeddings().weight
        return cls(tokenizer, image_processor, model.config, None, padding_side, weight.device, weight.dtype)

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        if num_images > 1:
            raise ValueError(f"CogVLM takes at most one image per prompt, got {num_images}")
        return cogvlm_prompt(question.replace(DEFAULT_IMAGE_TOKEN, "").strip(), self.template_version)

    def tokenize(self, prompt: str, with_image: bool = True) -> torch.Tensor:
        """(L,) ids: bos, ``IMAGE_TOKEN_INDEX`` (with an image), the prompt's tokens."""
        head = [self.tokenizer.bos_token_id] + ([IMAGE_TOKEN_INDEX] if with_image else [])
        return torch.tensor(head + self.tokenizer.encode(prompt, add_special_tokens=False), dtype=torch.long)

    def pad_on_host(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            span = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    def pad(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention_mask = self.pad_on_host(sequences)
        return input_ids.to(self.device), attention_mask.to(self.device)

    def __call__(self, questions: list[str] | str, images=None) -> LlavaInputs:
        """questions: one per sample; images: None, or one PIL image (or a one-image list, or an empty list)
        per sample."""
        if isinstance(questions, str):
            questions = [questions]
        if images is None:
            per_sample = [[] for _ in questions]
        else:
            if len(images) != len(questions):
                raise ValueError(f"{len(questions)} questions but {len(images)} image entries")
            per_sample = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
        prompts = [self.build_prompt(q, len(imgs)) for q, imgs in zip(questions, per_sample)]
        host_ids, host_mask = self.pad_on_host([self.tokenize(p, bool(imgs)) for p, imgs in zip(prompts, per_sample)])
        flat = [image for imgs in per_sample for image in imgs]
        pixels = self.image_processor(flat).to(self.device, dtype=self.dtype) if flat else None
        sizes = [image.size for image in flat] if flat else None
        return LlavaInputs(host_ids.to(self.device), host_mask.to(self.device), pixels, sizes, prompts, host_ids, host_mask)
