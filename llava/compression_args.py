"""The one compression flag of every LLaVA command line, ``--compression SPEC``, and its aliases.

SPEC is ``none``, ``METHOD:TOKENS`` (the method's paper split for that many visual tokens per view: per
image, per crop on LLaVA-NeXT) or ``METHOD:key=value,...`` for any registered method
(``visionzip.registered_methods()``). ``METHOD:v1,v2`` (VisionZip's ``visionzip:54,10``, VisPruner's
``vispruner:64,0.5``) is accepted as input for the command lines of the released VisionZip / VisPruner code;
what is printed and recorded is always ``METHOD:key=value,...``.

The aliases, each documented where it is declared and each parsed by ``compression_from_flags`` into the
same ``CompressionConfig``:

- ``--visionzip D,C`` (run_llava, serve.cli) = ``--compression visionzip:dominant=D,contextual=C``;
- ``--no-compression`` (run_llava, serve.cli) = ``--compression none`` over a checkpoint's saved setting;
- ``--method M --budget B`` (the eval engine, as the eval scripts call it) and ``--compression M
  --visual_tokens B`` (training): B is a paper budget, the total visual tokens per image over the budget
  family's views (``visionzip.budgets``: LLaVA-NeXT's 160 = 5 views x 32); ``--budget`` may instead carry
  per-view settings (``54,10``, ``dominant=54,contextual=10``);
- ``--dominant/--contextual/--important_ratio`` (training): the method's settings by name, over the
  budget's split when a budget is given too (they must give the same tokens per view).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from visionzip import CompressionConfig, get_method
from visionzip.budgets import budget_family, per_view_budget
from visionzip.config import ANYRES_LAYOUTS

VANILLA_LABEL = "full"
_NONE = ("", "none", "vanilla")


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--compression", metavar="SPEC", default=None,
        help="none | METHOD:TOKENS | METHOD:key=value,... (e.g. visionzip:64, vispruner:64, fastv:64); "
             "default: what the checkpoint's config says",
    )
    group.add_argument("--visionzip", metavar="D,C", help="alias of --compression visionzip:dominant=D,contextual=C")
    group.add_argument("--no-compression", action="store_true", help="ignore a compression saved in the checkpoint")
    parser.add_argument(
        "--anyres-layout", choices=ANYRES_LAYOUTS, default="official",
        help="LLaVA-NeXT layout of compressed crops (see docs/llava.md)",
    )


def compression_from_args(args) -> CompressionConfig | None:
    """The compression the command line asks for (ValueError on a bad spec); None keeps the checkpoint's."""
    layout = getattr(args, "anyres_layout", "official")
    if getattr(args, "visionzip", None):
        return compression_from_flags(method="visionzip", budget=args.visionzip, anyres_layout=layout).compression
    if getattr(args, "compression", None):
        return compression_from_flags(args.compression, anyres_layout=layout).compression
    if getattr(args, "no_compression", False):
        return CompressionConfig(anyres_layout=layout)
    return None


@dataclass(frozen=True)
class FlagCompression:
    """What the compression flags of a command line resolve to.

    compression: the config that runs (per-view settings); family: the budget family the flags were read
    in; label: the budget's name for results folders ("64", "54-10", "full" for vanilla; None for a
    ``--compression`` spec, which names no paper budget)."""

    compression: CompressionConfig
    family: str
    label: str | None

    @property
    def method(self) -> str:
        return self.compression.method

    @property
    def spec(self) -> str:
        """The ``--compression`` string that reproduces this config."""
        return self.compression.spec()

    @property
    def views(self) -> int:
        return budget_family(self.family).views

    @property
    def visual_tokens(self) -> int | None:
        """Visual tokens per image the LLM sees at most (None: the method's count depends on the image)."""
        if not self.compression.enabled:
            return budget_family(self.family).vanilla_tokens
        per_view = self.compression.tokens_per_image
        return None if per_view is None else self.views * per_view


def compression_from_flags(
    spec: str | None = None,
    *,
    method: str | None = None,
    budget: str | int | None = None,
    settings: dict | None = None,
    family: str = "v1.5",
    anyres_layout: str = "official",
) -> FlagCompression:
    """The one parser behind ``--compression`` and its aliases (module docstring); a ValueError names any
    inconsistent value.

    spec: a whole ``--compression`` SPEC. Or ``method`` with ``budget`` (a paper total per image in
    ``family``, or per-view settings ``54,10`` / ``key=value,...``) and/or ``settings`` (the method's
    settings by name, merged over the budget's split and required to give its tokens per view).
    """
    budget_family(family)  # a ValueError for an unknown family before anything else
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    if spec is not None and method is not None:
        raise ValueError(f"give either --compression ({spec!r}) or a method with its budget ({method!r}), not both")
    if spec is not None:
        if budget is not None or settings:
            raise ValueError(f"--compression {spec!r} already gives the budget; drop the budget / settings flags")
        return FlagCompression(CompressionConfig.parse(spec, anyres_layout=anyres_layout), family, None)
    method = (method or "none").strip().lower()
    if method in _NONE:
        if (budget is not None and str(budget).strip() not in ("", VANILLA_LABEL)) or settings:
            raise ValueError(f"method 'none' takes no budget or settings, got {budget!r} {settings or ''}".strip())
        return FlagCompression(CompressionConfig(anyres_layout=anyres_layout), family, VANILLA_LABEL)
    text = "" if budget is None else str(budget).strip()
    if text in ("", VANILLA_LABEL):
        if not settings:
            views = budget_family(family).views
            raise ValueError(f"method {method!r} needs a token budget (e.g. {64 * views}) or its settings")
        config, label = None, None
    elif "," in text or "=" in text:  # the method's own per-view settings
        config = CompressionConfig.parse(f"{method}:{text}", anyres_layout=anyres_layout)
        label = re.sub(r"[^A-Za-z0-9.+-]+", "-", text.replace(",", "-")).strip("-")
    else:
        config = CompressionConfig.parse(f"{method}:{per_view_budget(text, family)}", anyres_layout=anyres_layout)
        label = str(int(text))
    if settings:
        known = set(get_method(method).__dataclass_fields__)
        if set(settings) - known:
            raise ValueError(f"{method} has no setting {sorted(set(settings) - known)}; its settings: {sorted(known)}")
        explicit = CompressionConfig(method, **{**(config.settings.to_dict() if config else {}), **settings},
                                     anyres_layout=anyres_layout)
        if config is not None and explicit.tokens_per_image != config.tokens_per_image:
            views = budget_family(family).views
            raise ValueError(
                f"the budget {text} does not match the settings {settings} "
                f"(= {explicit.tokens_per_image * views}{f' over {views} views' if views > 1 else ''})"
            )
        config = explicit
    return FlagCompression(config, family, label)
