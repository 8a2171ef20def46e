"""The budget families: how a paper's visual-token budget per image becomes a budget per view.

The papers state budgets as the total number of visual tokens the LLM sees per image:

- LLaVA-1.5 (``v1.5``): one view per image (576 tokens uncompressed), e.g. 192 / 128 / 64 tokens;
- LLaVA-NeXT (``v1.6``): the base image and 4 anyres crops of the 2 x 2 grid the papers count
  (``ANYRES_VIEWS`` = 5 views of 576), e.g. 640 / 320 / 160 tokens over the 5 views, so a method gets a
  fifth of it per view (VisionZip: 108+20, 54+10, 27+5 per crop);
- Qwen-VL (``qwen-vl``): one image = the resampler's 256 queries (VisPruner Table 4);
- CogVLM (``cogvlm``): one image = EVA2-CLIP-E's 35 x 35 = 1225 patches at 490 pixels (VisPruner Table 4
  keeps 123 of them: 90 % fewer).

A method's settings are per view (``METHOD:TOKENS``, ``from_budget``): ``per_view_budget`` divides a
family's total. This module is the one place that knows the view count; ``llava.eval.budgets`` (the eval
scripts' ``METHOD BUDGET``), the eval engine's ``--method/--budget`` and training's ``--visual_tokens``
all come through it (``llava.compression_args.compression_from_flags``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

# LLaVA-NeXT (anyres): the base image plus the 4 crops of the 2 x 2 grid, the views the papers' budgets count
ANYRES_VIEWS = 5
# tokens of one CLIP ViT-L/14-336 view (24 x 24 patches), LLaVA-1.5's and LLaVA-NeXT's tower
VIEW_TOKENS = 576


@dataclass(frozen=True)
class BudgetFamily:
    """name: ``v1.5`` / ``v1.6`` / ``qwen-vl`` / ``cogvlm``; views: views per image the budget counts; vanilla_tokens: visual tokens
    per image uncompressed (the largest budget)."""

    name: str
    views: int
    vanilla_tokens: int


BUDGET_FAMILIES = {
    "v1.5": BudgetFamily("v1.5", 1, VIEW_TOKENS),
    "v1.6": BudgetFamily("v1.6", ANYRES_VIEWS, ANYRES_VIEWS * VIEW_TOKENS),
    "qwen-vl": BudgetFamily("qwen-vl", 1, 256),
    "cogvlm": BudgetFamily("cogvlm", 1, 1225),
}


def budget_family(name: str) -> BudgetFamily:
    """The family called ``name`` (a ValueError naming the known ones otherwise)."""
    if name not in BUDGET_FAMILIES:
        raise ValueError(f"unknown budget family {name!r}; choose one of {sorted(BUDGET_FAMILIES)}")
    return BUDGET_FAMILIES[name]


def family_of(image_aspect_ratio: str | None) -> str:
    """The budget family of a checkpoint, from its ``image_aspect_ratio`` (anyres = LLaVA-NeXT = v1.6)."""
    return "v1.6" if image_aspect_ratio == "anyres" else "v1.5"


def per_view_budget(total, family: str = "v1.5") -> int:
    """A paper budget (visual tokens per image, over all the family's views) -> tokens per view.

    A ValueError names the value and the limit: not a positive integer, more than the vanilla tokens of
    the family's image, or not divisible by its views (``64`` is no LLaVA-NeXT budget: 5 views)."""
    spec = budget_family(family)
    if isinstance(total, str):
        try:
            total = int(total.strip())
        except ValueError as err:
            raise ValueError(f"token budget {total!r} is not an integer") from err
    if isinstance(total, bool) or not isinstance(total, numbers.Integral):
        raise ValueError(f"token budget must be an integer, got {total!r}")
    if total < 1:
        raise ValueError(f"token budget must be positive, got {total}")
    if total > spec.vanilla_tokens:
        raise ValueError(f"token budget {total} exceeds the {spec.vanilla_tokens} visual tokens of a {family} image")
    if total % spec.views:
        raise ValueError(
            f"a {family} budget counts the {spec.views} views of an image and must divide by {spec.views}; got {total}"
        )
    return int(total) // spec.views
