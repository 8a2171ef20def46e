"""From (method, token budget) on the command line to a ``CompressionConfig`` and a results folder name.

The paper states budgets as the total number of visual tokens the LLM sees:

- LLaVA-1.5 (``v1.5``): 192 / 128 / 64 tokens per image, VisionZip (dominant, contextual) from
  ``visionzip.VISIONZIP_BUDGETS`` (162+30, 108+20, 54+10).
- LLaVA-NeXT (``v1.6``): 640 / 320 / 160 tokens over the 5 anyres crops (base image + 4), so per crop
  ``visionzip.VISIONZIP_NEXT_BUDGETS`` (108+20, 54+10, 27+5).

VisPruner's budget is its token count per image (per crop for NeXT: the total divided by 5).
A VisionZip budget can also be given as ``D,C`` per image/crop (e.g. ``54,10``).

Command line (used by the eval scripts): ``python -m llava.eval.budgets --family v1.5 visionzip 64``
prints shell assignments ``COMPRESSION=... BUDGET_LABEL=... VISUAL_TOKENS=...``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from visionzip.config import VISIONZIP_BUDGETS, VISIONZIP_NEXT_BUDGETS, CompressionConfig

# family -> (VisionZip budget table, crops per image at most, vanilla visual tokens at most)
FAMILIES = {
    "v1.5": (VISIONZIP_BUDGETS, 1, 576),
    "v1.6": (VISIONZIP_NEXT_BUDGETS, 5, 5 * 576),
}
VANILLA_LABEL = "full"


@dataclass(frozen=True)
class RunBudget:
    method: str  # none / visionzip / vispruner
    label: str  # results folder name for the budget: "64", "54-10", or "full" for vanilla
    compression: CompressionConfig
    visual_tokens: int  # total visual tokens per image the LLM sees (at most, for anyres)

    @property
    def spec(self) -> str:
        """The ``--compression`` string that reproduces this config."""
        c = self.compression
        if c.method == "visionzip":
            return f"visionzip:{c.dominant},{c.contextual}"
        if c.method == "vispruner":
            return f"vispruner:{c.tokens},{c.important_ratio:g}"
        return "none"


def _family(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def resolve_budget(method: str, budget: str | int | None, family: str = "v1.5") -> RunBudget:
    """``("visionzip", 64, "v1.5")`` -> VisionZip (54, 10), label "64", 64 tokens; ``("none", ...)`` -> vanilla."""
    table, crops, vanilla_tokens = _family(family)
    method = (method or "none").strip().lower()
    if method in ("none", "vanilla"):
        return RunBudget("none", VANILLA_LABEL, CompressionConfig(), vanilla_tokens)
    if budget is None or str(budget).strip() in ("", VANILLA_LABEL):
        raise ValueError(f"method {method!r} needs a token budget (e.g. {sorted(table, reverse=True)})")
    text = str(budget).strip()
    if method == "visionzip":
        if "," in text:
            try:
                dominant, contextual = (int(x) for x in text.split(","))
            except ValueError as err:
                raise ValueError(f"VisionZip budget {text!r} is not 'D,C' (e.g. 54,10)") from err
            config = CompressionConfig(method="visionzip", dominant=dominant, contextual=contextual)
            return RunBudget("visionzip", f"{dominant}-{contextual}", config, crops * (dominant + contextual))
        total = _int_budget(text)
        if total not in table:
            raise ValueError(
                f"no paper VisionZip split for {total} tokens on {family}; known budgets "
                f"{sorted(table, reverse=True)}, or give the per-{'crop' if crops > 1 else 'image'} split as D,C"
            )
        dominant, contextual = table[total]
        config = CompressionConfig(method="visionzip", dominant=dominant, contextual=contextual)
        return RunBudget("visionzip", str(total), config, total)
    if method == "vispruner":
        total = _int_budget(text)
        if total % crops:
            raise ValueError(f"VisPruner budget {total} on {family} must split evenly over {crops} crops")
        config = CompressionConfig(method="vispruner", tokens=total // crops)
        return RunBudget("vispruner", str(total), config, total)
    raise ValueError(f"unknown compression method {method!r}; choose none, visionzip or vispruner")


def _int_budget(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise ValueError(f"token budget {text!r} is not an integer") from err
    if value < 1:
        raise ValueError(f"token budget must be positive, got {value}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.budgets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="v1.5", choices=sorted(FAMILIES))
    parser.add_argument("method", help="none | visionzip | vispruner")
    parser.add_argument("budget", nargs="?", help="total visual tokens (e.g. 64) or D,C for VisionZip")
    args = parser.parse_args(argv)
    try:
        run = resolve_budget(args.method, args.budget, args.family)
    except ValueError as err:
        parser.error(str(err))
    print(f"METHOD={run.method}")
    print(f"COMPRESSION={run.spec}")
    print(f"BUDGET_LABEL={run.label}")
    print(f"VISUAL_TOKENS={run.visual_tokens}")


if __name__ == "__main__":
    main()
