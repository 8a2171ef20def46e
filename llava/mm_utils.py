"""Image preprocessing (pad / anyres / square) and prompt tokenization with image placeholders.

The pixel arithmetic follows SPEC.md ("Preprocessing pad / anyres") exactly: these functions decide which
pixels the vision tower sees, and therefore the parity with the original LLaVA.
"""
from __future__ import annotations

import ast
import base64
import math
from io import BytesIO

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

# Resizes inside anyres preprocessing: PIL's default filter for ``Image.resize`` (bicubic), made explicit.
RESAMPLE = Image.Resampling.BICUBIC


def load_image_from_base64(image: str) -> Image.Image:
    return Image.open(BytesIO(base64.b64decode(image)))


def load_image(image_file: str) -> Image.Image:
    """An RGB image from a local path or an http(s) URL."""
    if image_file.startswith(("http://", "https://")):
        from urllib.request import urlopen

        with urlopen(image_file) as response:  # noqa: S310 (user-supplied URL, as in the original CLI)
            return Image.open(BytesIO(response.read())).convert("RGB")
    return Image.open(image_file).convert("RGB")


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Paste the image centred on a square canvas of its longer side, filled with ``background_color``."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    canvas = Image.new(pil_img.mode, (side, side), background_color)
    canvas.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return canvas


def parse_grid_pinpoints(grid_pinpoints) -> list[tuple[int, int]]:
    """``image_grid_pinpoints`` as a list of (width, height): a list, or its string literal."""
    if isinstance(grid_pinpoints, str):
        try:
            grid_pinpoints = ast.literal_eval(grid_pinpoints)
        except (ValueError, SyntaxError) as err:
            raise ValueError(
                f"image_grid_pinpoints {grid_pinpoints!r} is not a list literal such as [[336, 672], [672, 336]]"
            ) from err
    try:
        pinpoints = [(int(w), int(h)) for w, h in grid_pinpoints]
    except (TypeError, ValueError) as err:
        raise ValueError(f"image_grid_pinpoints must be (width, height) pairs, got {grid_pinpoints!r}") from err
    if not pinpoints:
        raise ValueError("image_grid_pinpoints is empty")
    return pinpoints


def select_best_resolution(original_size, possible_resolutions) -> tuple[int, int]:
    """Among ``possible_resolutions`` (width, height), the one that keeps the most of the image's
    resolution once it is fitted inside (effective area), ties broken by the least wasted area."""
    original_width, original_height = original_size
    best, best_effective, best_wasted = None, -1, math.inf
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled = int(original_width * scale) * int(original_height * scale)
        effective = min(scaled, original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (width, height), effective, wasted
    return best


def resize_and_pad_image(image: Image.Image, target_resolution) -> Image.Image:
    """Resize keeping the aspect ratio so that one side matches exactly, then centre on black."""
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(original_width * scale_h), target_width), target_height
    resized = image.resize((new_width, new_height), RESAMPLE)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Cut the image into ``patch_size`` squares, row by row."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size: int) -> tuple[int, int]:
    """(columns, rows) of crops for an image of ``image_size`` (width, height)."""
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints))
    return width // patch_size, height // patch_size


def processor_crop_size(image_processor) -> int:
    """Side of the square the image processor outputs (``crop_size`` for CLIP, ``size`` for SigLIP)."""
    crop = getattr(image_processor, "crop_size", None)
    if crop is not None and crop["height"] is not None:
        return int(crop["height"])
    size = image_processor.size
    return int(size["height"] if size["height"] is not None else size["shortest_edge"])


def processor_resize_side(image_processor) -> int:
    size = image_processor.size
    return int(size["shortest_edge"] if size["shortest_edge"] is not None else size["height"])


def preprocess_pixels(image_processor, images) -> torch.Tensor:
    """The processor's pixels for one image or a list: (N, 3, S, S)."""
    return image_processor(images, return_tensors="pt")["pixel_values"]


def process_anyres_image(image: Image.Image, image_processor, grid_pinpoints) -> torch.Tensor:
    """(1 + rows * cols, 3, S, S): the whole image resized to S x S, then the crops row by row."""
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints))
    crop = processor_crop_size(image_processor)
    patches = divide_to_patches(resize_and_pad_image(image, best), crop)
    side = processor_resize_side(image_processor)
    base = image.resize((side, side), RESAMPLE)
    return preprocess_pixels(image_processor, [base] + patches)


def process_images(images, image_processor, model_cfg):
    """Pixels for a list of PIL images as the model config asks (``image_aspect_ratio``).

    "pad": each image centred on a square of its mean colour, (N, 3, S, S). "anyres": each image becomes
    (1 + crops, 3, S, S); stacked to (N, 1 + crops, 3, S, S) when all have the same number of crops,
    else a list. Anything else: the processor on the images as they are (resize + centre crop).
    """
    aspect = getattr(model_cfg, "image_aspect_ratio", None)
    images = [image.convert("RGB") if image.mode != "RGB" else image for image in images]
    if aspect == "pad":
        fill = tuple(int(m * 255) for m in image_processor.image_mean)
        return preprocess_pixels(image_processor, [expand2square(image, fill) for image in images])
    if aspect == "anyres":
        pinpoints = getattr(model_cfg, "image_grid_pinpoints", None)
        if pinpoints is None:
            raise ValueError("image_aspect_ratio is 'anyres' but the model config has no image_grid_pinpoints")
        per_image = [process_anyres_image(image, image_processor, pinpoints) for image in images]
        if all(x.shape == per_image[0].shape for x in per_image):
            return torch.stack(per_image, dim=0)
        return per_image
    return preprocess_pixels(image_processor, images)


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Token ids of ``prompt`` with ``image_token_index`` where each ``<image>`` was.

    The text around each ``<image>`` is tokenized on its own; only the first chunk keeps the BOS token.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    has_bos = bool(chunks and chunks[0] and bos is not None and chunks[0][0] == bos)
    input_ids = [bos] if has_bos else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[1:] if has_bos and chunk and chunk[0] == bos else chunk)
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"unsupported return_tensors {return_tensors!r}; use 'pt' or None")


def get_model_name_from_path(model_path: str) -> str:
    """The checkpoint's name for logs and answer files: its last folder, or ``<parent>_<checkpoint-N>``."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a sequence once its generated text contains one of ``keywords`` (e.g. the template's ``</s>``
    or ``###``). One instance per ``generate`` call: it measures "generated" from its first call, so it
    works both when ``generate`` returns the prompt (ids input) and when it does not (embeddings input).
    """

    def __init__(self, keywords: list[str], tokenizer, input_ids=None):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids = []
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if ids and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            if ids:
                self.keyword_ids.append(torch.tensor(ids))
        self.max_keyword_len = max((len(ids) for ids in self.keyword_ids), default=1)
        self.start_len: int | None = None

    def __call__(self, output_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if self.start_len is None:
            self.start_len = output_ids.shape[1] - 1
        done = torch.zeros(output_ids.shape[0], dtype=torch.bool, device=output_ids.device)
        generated = output_ids[:, self.start_len :]
        for row in range(output_ids.shape[0]):
            for ids in self.keyword_ids:
                n = len(ids)
                if generated.shape[1] >= n and torch.equal(generated[row, -n:].cpu(), ids):
                    done[row] = True
            if not done[row]:
                tail = generated[row, -(self.max_keyword_len + 3) :]
                text = self.tokenizer.decode(tail, skip_special_tokens=False)
                done[row] = any(keyword in text for keyword in self.keywords)
        return done
