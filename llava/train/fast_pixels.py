"""Pixels of an image that needs no resize, crop or padding, by a per-channel lookup table: the same
float values as the image processor's, at a fraction of its cost.

[VisionZip-LLaVA] The original LLaVA runs the image processor on every training image. For an 8-bit RGB
image already of the processor's output size (S x S: the toy task's scenes, any data set stored at the
tower's resolution), CLIP's and SigLIP's processors do no geometry (the resize to S and the centre crop
to S keep every pixel; "pad" squares nothing) and map each 8-bit value of a channel to one float
(rescale, then normalize). That map has 256 entries per channel, so it is read once from the processor
itself and applied as a table: about 4 ms of CPU per 336 x 336 image less, with pixels equal bit for bit
(the table holds the processor's own outputs). Every other image (another size, another mode, "anyres"
crops) goes through the processor as before.

The table is trusted only after two probe images of size S x S, one covering every value in every
channel and one of seeded random values, come out of the processor exactly as the table predicts: a
processor whose output depends on anything but the pixel's own value (resampling, per-image
statistics) fails the probes and keeps the processor's path.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from llava.mm_utils import preprocess_pixels, processor_crop_size

# Probe images need every 8-bit value in every channel: at least 256 pixels.
MIN_SIDE = 16
PROBE_SEED = 20261206


def _probe_images(side: int) -> list[np.ndarray]:
    index = np.arange(side * side, dtype=np.int64).reshape(side, side)
    covering = np.stack([(index + 85 * channel) % 256 for channel in range(3)], axis=-1).astype(np.uint8)
    random = np.random.default_rng(PROBE_SEED).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    return [covering, random]


class ElementwisePixels:
    """``pixels = ElementwisePixels.probe(image_processor)`` (``None`` when the processor is not a per-value
    map on S x S images); ``pixels(image)``: the (3, S, S) float32 tensor the processor would give, or
    ``None`` when the image needs the processor (not RGB, not S x S)."""

    def __init__(self, table: np.ndarray, side: int):
        self.table = table  # (3, 256) float32: the processor's output for each channel and 8-bit value
        self.side = side

    @classmethod
    def probe(cls, image_processor) -> ElementwisePixels | None:
        try:
            side = processor_crop_size(image_processor)
        except (AttributeError, KeyError, TypeError):
            return None
        if side < MIN_SIDE:
            return None
        covering, random = _probe_images(side)
        pixels = [preprocess_pixels(image_processor, [Image.fromarray(array, mode="RGB")]) for array in (covering, random)]
        if any(p.shape != (1, 3, side, side) or p.dtype != torch.float32 for p in pixels):
            return None
        covering_out = pixels[0][0].numpy()
        table = np.zeros((3, 256), dtype=np.float32)
        for channel in range(3):
            values = covering[..., channel].reshape(-1)
            first = np.unique(values, return_index=True)[1]  # one position per value (all 256 are present)
            table[channel] = covering_out[channel].reshape(-1)[first]
        candidate = cls(table, side)
        for array, out in zip((covering, random), pixels):
            if not np.array_equal(candidate.lookup(array), out[0].numpy()):
                return None
        return candidate

    def lookup(self, array: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 -> (3, S, S) float32 through the table."""
        return np.stack([np.take(self.table[channel], array[..., channel]) for channel in range(3)])

    def __call__(self, image: Image.Image) -> torch.Tensor | None:
        if image.mode != "RGB" or image.size != (self.side, self.side):
            return None
        return torch.from_numpy(self.lookup(np.asarray(image)))
