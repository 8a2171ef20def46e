"""Qwen-VL prompts and pixels: ``QwenVLProcessor`` (what run_llava and the tests build inputs with).

Prompt formats (``conv_mode``), from the official code (docs/qwen_vl.md):

- ``qwen_chatml`` (Qwen-VL-Chat, ``generation_config.chat_format`` "chatml"): ``make_context`` of the hub's
  ``qwen_generation_utils.py``: ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n``
  + the query + ``<|im_end|>\\n<|im_start|>assistant\\n``, tokenized piece by piece as there; the query is the
  tokenizer's ``from_list_format``: ``Picture 1:<img>IMAGE</img>\\n`` per image, then the question;
- ``qwen_vqa`` (Qwen-VL, chat_format "raw"; QwenLM/Qwen-VL ``eval_mm/evaluate_vqa.py``):
  ``<img>IMAGE</img>{question} Answer:``.

Each image is ``<img>``, ``IMAGE_TOKEN_INDEX`` (where the model puts its visual tokens), ``</img>``
(``llava.model.qwen_vl.tokenizer`` on why not the path's bytes). Pixels: the official ``image_transform``
(bicubic resize to the model's square size, [0, 1], CLIP mean / std), done with PIL here, as torchvision does
for PIL images. Batches are padded on the left with ``<|endoftext|>`` (the official pad id).
"""
from __future__ import annotations

import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.processor import LlavaInputs

from .tokenizer import IMAGE_TAGS, QwenTokenizer
from .visual import CLIP_MEAN, CLIP_STD

CONV_MODES = ("qwen_chatml", "qwen_vqa")
CHAT_FORMAT_MODES = {"chatml": "qwen_chatml", "raw": "qwen_vqa"}
DEFAULT_SYSTEM = "You are a helpful assistant."


class QwenVLImageProcessor:
    """PIL images -> (N, 3, S, S) float pixels (the official ``image_transform``)."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        # the size fields LLaVA's image checks read (``llava.mm_utils.processor_resize_side``): a square resize
        self.size = {"shortest_edge": None, "height": self.image_size, "width": self.image_size}
        self.crop_size = {"height": self.image_size, "width": self.image_size}
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, images) -> torch.Tensor:
        out = []
        for image in images:
            if not isinstance(image, Image.Image):
                raise ValueError(f"Qwen-VL's image processor takes PIL images, got {type(image).__name__}")
            resized = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
            pixels = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0
            out.append((pixels - self.mean) / self.std)
        return torch.stack(out)

    def preprocess(self, images, return_tensors: str = "pt") -> dict:
        return {"pixel_values": self(images if isinstance(images, (list, tuple)) else [images])}


class QwenVLProcessor:
    """Builds Qwen-VL inputs: ``processor(questions, images) -> LlavaInputs`` (same fields as LLaVA's)."""

    def __init__(self, tokenizer: QwenTokenizer, image_processor: QwenVLImageProcessor, conv_mode: str = "qwen_chatml",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, system: str = DEFAULT_SYSTEM):
        if conv_mode not in CONV_MODES:
            raise ValueError(f"unknown Qwen-VL prompt format {conv_mode!r}; use one of {CONV_MODES}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.device = torch.device(device)
        self.dtype = dtype
        self.system = system
        self.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_model(cls, model, tokenizer, image_processor, conv_mode: str | None = None):
        """A processor on ``model``'s device and dtype; ``conv_mode`` None: the checkpoint's chat format."""
        weight = model.get_input_embeddings().weight
        return cls(tokenizer, image_processor, conv_mode or default_conv_mode(model.config), weight.device, weight.dtype)

    # ----- prompts --------------------------------------------------------------------------------------
    def image_ids(self) -> list[int]:
        return [self.tokenizer.img_start_id, IMAGE_TOKEN_INDEX, self.tokenizer.img_end_id]

    def prompt_ids(self, question: str, num_images: int) -> list[int]:
        tok = self.tokenizer
        if self.conv_mode == "qwen_vqa":
            return self.image_ids() * num_images + tok.encode(f"{question} Answer:")
        # make_context encodes roles and contents with the image tags as the only special tokens
        def encode(text: str) -> list[int]:
            return tok.encode(text, allowed_special=IMAGE_TAGS)

        query: list[int] = []
        for index in range(num_images):
            query += encode(f"Picture {index + 1}:") + self.image_ids() + encode("\n")
        query += encode(question)
        newline = tok.encode("\n")

        def turn(role: str, content: list[int]) -> list[int]:
            return [tok.im_start_id] + encode(role) + newline + content + [tok.im_end_id]

        return (
            turn("system", encode(self.system)) + newline + turn("user", query) + newline
            + [tok.im_start_id] + encode("assistant") + newline
        )

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """The prompt of one question as text (``<image>`` where an image's tokens go), as
        ``LlavaProcessor.build_prompt`` (what front-ends record)."""
        return self.prompt_text(self.prompt_ids(question, num_images))

    def prompt_text(self, ids: list[int]) -> str:
        """The prompt as text, ``<image>`` where an image's tokens go."""
        parts, run = [], []
        for index in ids:
            if index == IMAGE_TOKEN_INDEX:
                parts.append(self.tokenizer.decode(run) + "<image>")
                run = []
            else:
                run.append(index)
        return "".join(parts) + self.tokenizer.decode(run)

    # ----- batches ---------------------------------------------------------------------------------------
    def __call__(self, questions, images=None) -> LlavaInputs:
        """questions: one per sample; images: None, one PIL image per sample, or a list per sample."""
        if isinstance(questions, str):
            questions = [questions]
        if images is None:
            per_sample = [[] for _ in questions]
        else:
            if len(images) != len(questions):
                raise ValueError(f"{len(questions)} questions but {len(images)} image entries")
            per_sample = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
        sequences = [self.prompt_ids(q, len(imgs)) for q, imgs in zip(questions, per_sample)]
        width = max(len(s) for s in sequences)
        host_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        host_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            host_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            host_mask[row, width - len(ids):] = 1
        flat = [image for imgs in per_sample for image in imgs]
        pixels = self.image_processor(flat).to(self.device, dtype=self.dtype) if flat else None
        sizes = [image.size for image in flat] if flat else None
        prompts = [self.prompt_text(s) for s in sequences]
        return LlavaInputs(host_ids.to(self.device), host_mask.to(self.device), pixels, sizes, prompts, host_ids, host_mask)


def default_conv_mode(config) -> str:
    """The prompt format of a checkpoint: its ``chat_format`` (saved by the loader from generation_config.json)."""
    return CHAT_FORMAT_MODES.get(getattr(config, "chat_format", "chatml"), "qwen_chatml")
