"""The eval scripts' ``METHOD BUDGET``: a paper budget to a ``--compression`` spec and a results folder name.

The papers state budgets as the total number of visual tokens the LLM sees per image, over the views of a
budget family (``visionzip.budgets``: LLaVA-1.5 one view; LLaVA-NeXT the base image and 4 crops, so
640 / 320 / 160 give a method a fifth of it per view). Any registered method takes a budget (its own paper
split, owned by its file in ``visionzip/methods/``); a budget with ``,`` or ``=`` is the method's explicit
per-view settings (e.g. VisionZip ``54,10`` or ``dominant=54,contextual=10``, FastV ``tokens=64,layer=3``).
The parsing is ``llava.compression_args.compression_from_flags``, shared with the eval engine's
``--method/--budget`` and training's ``--visual_tokens``.

Command line (used by the eval scripts): ``python -m llava.eval.budgets --family v1.5 visionzip 64``
prints shell assignments ``METHOD=... COMPRESSION=... BUDGET_LABEL=... VISUAL_TOKENS=...``.
"""
from __future__ import annotations

import argparse

from visionzip.budgets import BUDGET_FAMILIES, family_of

from ..compression_args import VANILLA_LABEL, FlagCompression, compression_from_flags

__all__ = ["VANILLA_LABEL", "RunBudget", "family_of", "resolve_budget"]

# a resolved budget: .compression, .method, .label, .spec, .visual_tokens (per image at most), .family
RunBudget = FlagCompression


def resolve_budget(method: str, budget: str | int | None, family: str = "v1.5") -> RunBudget:
    """``("visionzip", 64, "v1.5")`` -> VisionZip (54, 10), label "64", 64 tokens; ``("none", ...)`` -> vanilla."""
    return compression_from_flags(method=method or "none", budget=budget, family=family)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.budgets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="v1.5", choices=sorted(BUDGET_FAMILIES))
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
