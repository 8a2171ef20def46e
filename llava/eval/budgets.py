"""From (method, token budget) on the command line to a ``CompressionConfig`` and a results folder name.

The papers state budgets as the total number of visual tokens the LLM sees per image:

- LLaVA-1.5 (``v1.5``): one view per image, e.g. 192 / 128 / 64 tokens;
- LLaVA-NeXT (``v1.6``): the base image and 4 anyres crops, e.g. 640 / 320 / 160 tokens over the 5 views,
  so the method gets a fifth of it per view (VisionZip: 108+20, 54+10, 27+5 per crop).

Any registered method takes a budget (``METHOD:TOKENS``: the method's own paper split, owned by its file in
``visionzip/methods/``); a budget with ``,`` or ``=`` is the method's explicit per-view settings (e.g.
VisionZip ``54,10`` or ``dominant=54,contextual=10``, FastV ``tokens=64,layer=3``).

Command line (used by the eval scripts): ``python -m llava.eval.budgets --family v1.5 visionzip 64``
prints shell assignments ``METHOD=... COMPRESSION=... BUDGET_LABEL=... VISUAL_TOKENS=...``.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from visionzip import CompressionConfig

# family -> (views per image at most, vanilla visual tokens per image at most)
FAMILIES = {
    "v1.5": (1, 576),
    "v1.6": (5, 5 * 576),
}
VANILLA_LABEL = "full"


@dataclass(frozen=True)
class RunBudget:
    method: str  # "none" or a registered method name
    label: str  # results folder name for the budget: "64", "54-10", or "full" for vanilla
    compression: CompressionConfig
    visual_tokens: int | None  # visual tokens per image the LLM sees at most (None: depends on the image)

    @property
    def spec(self) -> str:
        """The ``--compression`` string that reproduces this config."""
        return self.compression.spec()


def family_of(image_aspect_ratio: str | None) -> str:
    """The budget family of a checkpoint, from its ``image_aspect_ratio``."""
    return "v1.6" if image_aspect_ratio == "anyres" else "v1.5"


def _family(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def resolve_budget(method: str, budget: str | int | None, family: str = "v1.5") -> RunBudget:
    """``("visionzip", 64, "v1.5")`` -> VisionZip (54, 10), label "64", 64 tokens; ``("none", ...)`` -> vanilla."""
    views, vanilla_tokens = _family(family)
    method = (method or "none").strip().lower()
    if method in ("none", "vanilla"):
        return RunBudget("none", VANILLA_LABEL, CompressionConfig(), vanilla_tokens)
    if budget is None or str(budget).strip() in ("", VANILLA_LABEL):
        raise ValueError(f"method {method!r} needs a token budget (e.g. {64 * views})")
    text = str(budget).strip()
    if "," in text or "=" in text:
        config = CompressionConfig.parse(f"{method}:{text}")
        per_view = config.tokens_per_image
        label = re.sub(r"[^A-Za-z0-9.+-]+", "-", text.replace(",", "-")).strip("-")
        return RunBudget(config.method, label, config, None if per_view is None else views * per_view)
    try:
        total = int(text)
    except ValueError as err:
        raise ValueError(f"token budget {text!r} is not an integer") from err
    if total < 1:
        raise ValueError(f"token budget must be positive, got {total}")
    if total > vanilla_tokens:
        raise ValueError(f"token budget {total} exceeds the {vanilla_tokens} visual tokens of a {family} image")
    if total % views:
        raise ValueError(
            f"a {family} budget counts the {views} views of an image and must divide by {views}; got {total}"
        )
    config = CompressionConfig.parse(f"{method}:{total // views}")
    per_view = config.tokens_per_image
    return RunBudget(config.method, str(total), config, None if per_view is None else views * per_view)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.budgets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="v1.5", choices=sorted(FAMILIES))
    parser.add_argument("method", help="none or a registered method (visionzip.registered_methods())")
    parser.add_argument("budget", nargs="?", help="total visual tokens per image (e.g. 64), or per-view settings")
    args = parser.parse_args(argv)
    try:
        run = resolve_budget(args.method, args.budget, args.family)
    except ValueError as err:
        parser.error(str(err))
    print(f"METHOD={run.method}")
    print(f"COMPRESSION={run.spec}")
    print(f"BUDGET_LABEL={run.label}")
    print(f"VISUAL_TOKENS={run.visual_tokens if run.visual_tokens is not None else 'adaptive'}")


if __name__ == "__main__":
    main()
