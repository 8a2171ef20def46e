"""Image preprocessing (pad / anyres / square) and prompt tokenization with image placeholders.

The pixel arithmetic follows the original LLaVA exactly (docs/llava.md, "Preprocessing"): these functions decide which
pixels the vision tower sees, and therefore the parity with the original LLaVA.
"""
from __future__ import annotations

import base64
import math
from io import BytesIO

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

# the anyres grid geometry lives with the NeXT layouts (one module); re-exported here for preprocessing
from llava.model.anyres import get_anyres_image_grid_shape, parse_grid_pinpoints, select_best_resolution  # noqa: F401

# Resizes inside anyres preprocessing: PIL's default filter for ``Image.resize`` (bicubic), made explicit.
RESAMPLE = Image.Resampling.BICUBIC


def load_image_from_base64(image: str) -> Image.Image:
    return Image.open(BytesIO(base64.b64decode(image)))


# Seconds an http(s) image may take to answer (the original fetched with no timeout: a stalled server hung
# the CLI forever).
URL_TIMEOUT_S = 30.0
# Modes PIL converts to RGB without losing range (8 bits per channel, palette, 1-bit, CMYK, YCbCr, alpha).
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(ValueError):
    """An image that cannot be read, decoded or converted to RGB; the message names the file and why."""


# The largest intermediate image the preprocessing may make: 4 x PIL's default decompression-bomb warning
# limit (Image.MAX_IMAGE_PIXELS = 89,478,485): about 358 M pixels, 1 GB in RGB. PIL's limit counts the
# file's pixels only; a 377-byte 100000 x 1 PNG passes it and then asks "pad" for a 100000 x 100000
# canvas (30 GB), or CLIP's shortest-edge resize for 336 x 33.6 M. None: no limit.
MAX_WORKING_PIXELS: int | None = 4 * 89_478_485
DEFAULT_RESIZE_SIDE = 336  # CLIP ViT-L/14-336's shortest edge: what "square" resizes to when not told


def check_image_geometry(size, image_aspect_ratio: str | None = None, resize_side: int = DEFAULT_RESIZE_SIDE,
                         source: str = "image") -> None:
    """Refuse (``ImageLoadError`` naming the size, the mode and the limit) an image whose preprocessing
    would make an intermediate image beyond ``MAX_WORKING_PIXELS``, before any such buffer exists.

    size: (width, height). image_aspect_ratio: "pad" (a square canvas of the longer side), "anyres" (crops
    of at most the largest grid pinpoint and a square base view: bounded whatever the input), anything
    else (the processor's shortest-edge resize to ``resize_side``, then a centre crop); None: every mode
    (what ``load_image`` checks, before the model's mode is known).
    """
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ImageLoadError(f"{source}: a {width} x {height} image has no pixels")
    limit = MAX_WORKING_PIXELS
    if limit is None:
        return
    short, long = sorted((width, height))
    needs = []
    if image_aspect_ratio in (None, "pad"):
        needs.append((long * long, f"a {long} x {long} padded canvas (image_aspect_ratio 'pad')"))
    if image_aspect_ratio is None or image_aspect_ratio not in ("pad", "anyres"):
        resized = math.ceil(long * resize_side / short)
        needs.append((resize_side * resized, f"a {resize_side} x {resized} resize (shortest edge to {resize_side})"))
    for pixels, what in needs:
        if pixels > limit:
            raise ImageLoadError(
                f"{source}: a {width} x {height} image (aspect ratio {long / short:.0f}:1) needs {what} = "
                f"{pixels:,} pixels, over the limit of {limit:,} (llava.mm_utils.MAX_WORKING_PIXELS, 4 x PIL's "
                "default decompression-bomb limit); crop or resize the image"
            )


def to_rgb(image: Image.Image, source: str = "image") -> Image.Image:
    """``image`` as 8-bit RGB, keeping its brightness.

    [VisionZip-LLaVA] ``convert("RGB")`` clips 16-bit greyscale (``I;16`` PNGs, ``I``) at 255, which turns
    a typical 16-bit image almost all white; here 16-bit values are scaled to 8 bits (v * 255 / 65535,
    rounded). 32-bit ``I`` images are read as 16-bit (how PIL opens 16-bit PNG/TIFF files) and refused when
    a value is outside 0..65535; float (``F``) and other modes are refused with the mode named.
    """
    if image.mode == "RGB":
        return image.copy()  # loaded and independent of the file, as convert() returns
    if image.mode in EIGHT_BIT_MODES:
        return image.convert("RGB")
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        import numpy as np

        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageLoadError(
                f"{source}: mode {image.mode} values span {values.min()}..{values.max()}, outside the 16-bit "
                "range 0..65535 this loader converts; convert the image to 8-bit RGB first"
            )
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    raise ImageLoadError(
        f"{source}: image mode {image.mode!r} cannot be converted to RGB without guessing its range; "
        f"supported: {sorted(EIGHT_BIT_MODES | SIXTEEN_BIT_MODES | {'I'})}"
    )


def load_image(image_file: str, timeout: float = URL_TIMEOUT_S) -> Image.Image:
    """An 8-bit RGB image from a local path or an http(s) URL, fully decoded (``to_rgb``).

    Every failure (missing file, not an image, truncated data, over PIL's decompression-bomb limit, a
    geometry no preprocessing mode can handle (``check_image_geometry``: checked on the header, before
    decoding), an unsupported mode, a URL that does not answer within ``timeout`` seconds) raises
    ``ImageLoadError`` naming the file.
    """
    try:
        if image_file.startswith(("http://", "https://")):
            from urllib.request import urlopen

            with urlopen(image_file, timeout=timeout) as response:  # noqa: S310 (user-supplied URL)
                data = BytesIO(response.read())
            image = Image.open(data)
        else:
            image = Image.open(image_file)
        check_image_geometry(image.size, None, source=image_file)  # from the header, before decoding
        image.load()  # decodes now, so a truncated file fails here, not in the middle of a batch
        return to_rgb(image, image_file)
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"cannot read image {image_file}: {type(err).__name__}: {err}") from err


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Paste the image centred on a square canvas of its longer side, filled with ``background_color``."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    canvas = Image.new(pil_img.mode, (side, side), background_color)
    canvas.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return canvas


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
    side = processor_resize_side(image_processor) if getattr(image_processor, "size", None) else DEFAULT_RESIZE_SIDE
    for image in images:  # before any canvas or resize is allocated
        check_image_geometry(image.size, aspect if aspect in ("pad", "anyres") else "square", side)
    images = [to_rgb(image) for image in images]
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
