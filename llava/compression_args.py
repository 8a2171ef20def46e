"""The one compression flag of every LLaVA command line: ``--compression SPEC``.

SPEC is ``none``, ``METHOD:TOKENS`` (the method's paper split for that many visual tokens per image, per
crop on LLaVA-NeXT) or ``METHOD:key=value,...`` for any registered method (``visionzip.registered_methods()``).
``--visionzip D,C`` stays as an alias of ``--compression visionzip:D,C``; ``--no-compression`` turns off
a compression saved in the checkpoint.
"""
from __future__ import annotations

import argparse

from visionzip import CompressionConfig
from visionzip.config import ANYRES_LAYOUTS


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--compression", metavar="SPEC", default=None,
        help="none | METHOD:TOKENS | METHOD:key=value,... (e.g. visionzip:64, vispruner:64, fastv:64); "
             "default: what the checkpoint's config says",
    )
    group.add_argument("--visionzip", metavar="D,C", help="alias of --compression visionzip:D,C")
    group.add_argument("--no-compression", action="store_true", help="ignore a compression saved in the checkpoint")
    parser.add_argument(
        "--anyres-layout", choices=ANYRES_LAYOUTS, default="official",
        help="LLaVA-NeXT layout of compressed crops (see docs/llava.md)",
    )


def compression_from_args(args) -> CompressionConfig | None:
    """The compression the command line asks for (ValueError on a bad spec); None keeps the checkpoint's."""
    layout = getattr(args, "anyres_layout", "official")
    if getattr(args, "visionzip", None):
        return CompressionConfig.parse(f"visionzip:{args.visionzip}", anyres_layout=layout)
    if getattr(args, "compression", None):
        return CompressionConfig.parse(args.compression, anyres_layout=layout)
    if getattr(args, "no_compression", False):
        return CompressionConfig(anyres_layout=layout)
    return None
