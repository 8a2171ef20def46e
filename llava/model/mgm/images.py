"""MGM's two image inputs: the HR image (``image_size_aux``, 768 px for MGM-7B/13B) and the LR view the CLIP
tower sees, which MGM derives from it.

MGM's loaders (dvlab-research/MGM at 769820c, ``mgm/eval/model_vqa_loader.py``, ``mgm/serve/cli.py``) set the
CLIP image processor's ``crop_size`` and ``size`` to ``image_size_aux``, process the (padded) image once
(HR, ``images_aux``), then resize that tensor bilinearly (``align_corners=False``) to the processor's raw
size, 336 (LR, ``images``). Here the model takes the HR pixels as ``images`` and derives the LR view the same
way; the original call, ``images`` (LR) with ``images_aux`` (HR), is accepted too (``MGMImages``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MGMImages(NamedTuple):
    """An LR / HR pair as MGM's ``forward(images=LR, images_aux=HR)`` takes them: hr (B, 3, S_aux, S_aux);
    lr (B, 3, S, S) or None (derived from hr by ``lr_from_hr``)."""

    lr: torch.Tensor | None
    hr: torch.Tensor


def lr_from_hr(hr: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, S_aux, S_aux) -> (B, 3, size, size): MGM's bilinear resize of the processed HR tensor (in float32,
    as the official resizes the processor's float32 output)."""
    return F.interpolate(hr.float(), size=(size, size), mode="bilinear", align_corners=False).to(hr.dtype)


def hr_image_processor(processor_class, name: str, size: int):
    """The CLIP image processor of ``name`` set to MGM's HR input: resize and centre-crop at ``size``."""
    return processor_class.from_pretrained(name, size={"shortest_edge": size}, crop_size={"height": size, "width": size})
