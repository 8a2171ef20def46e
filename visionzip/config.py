"""Compression settings as data: a dataclass that lives in a model's ``config.json``.

A checkpoint trained or evaluated with VisionZip records *how* its visual tokens were compressed, so
that reloading it reproduces the same token budget. The dict form is what is persisted under the
``visual_compression`` key of the model config.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

METHODS = ("none", "visionzip", "vispruner")
# How LLaVA-NeXT (anyres) lays out compressed crop tokens:
#   "official": as the official VisionZip code (SPEC point 7): base image tokens, then the kept dominant
#               tokens of all crops in row-major order of the full grid, each crop's CLS, then all
#               contextual tokens; no unpad, no image_newline.
#   "spatial":  keep LLaVA-NeXT's own layout: only kept positions of the (unpadded) grid survive, with
#               ``image_newline`` after every grid row that still has tokens; contextual tokens follow.
ANYRES_LAYOUTS = ("official", "spatial")

# Paper budgets: total tokens -> (dominant, contextual) per image (LLaVA-1.5) or per crop (LLaVA-NeXT).
VISIONZIP_BUDGETS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}
VISIONZIP_NEXT_BUDGETS = {640: (108, 20), 320: (54, 10), 160: (27, 5)}


def check_count(name: str, value, minimum: int = 1) -> int:
    """Validate an integer budget: a clear ValueError naming the value and the limit."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


@dataclass
class CompressionConfig:
    """Which visual-token compression a model applies, and with what budget.

    method: "none", "visionzip" (``dominant`` + ``contextual`` tokens per image, or per crop for
        LLaVA-NeXT) or "vispruner" (``tokens`` per image/crop, ``important_ratio`` of them by attention).
    anyres_layout: see ``ANYRES_LAYOUTS``.
    """

    method: str = "none"
    dominant: int | None = None
    contextual: int | None = None
    tokens: int | None = None
    important_ratio: float = 0.5
    anyres_layout: str = "official"

    def __post_init__(self):
        self.validate()

    def validate(self) -> CompressionConfig:
        if self.method not in METHODS:
            raise ValueError(f"unknown compression method {self.method!r}; choose one of {METHODS}")
        if self.anyres_layout not in ANYRES_LAYOUTS:
            raise ValueError(f"anyres_layout must be one of {ANYRES_LAYOUTS}, got {self.anyres_layout!r}")
        if self.method == "visionzip":
            self.dominant = check_count("dominant", self.dominant)
            self.contextual = check_count("contextual", self.contextual)
        elif self.method == "vispruner":
            self.tokens = check_count("tokens", self.tokens)
            self.important_ratio = check_ratio("important_ratio", self.important_ratio)
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def tokens_per_image(self) -> int | None:
        """Visual tokens one image (or one anyres crop) contributes; None when uncompressed."""
        if self.method == "visionzip":
            return self.dominant + self.contextual
        if self.method == "vispruner":
            return self.tokens
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | CompressionConfig | None) -> CompressionConfig:
        if data is None:
            return cls()
        if isinstance(data, CompressionConfig):
            return data
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown compression settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def parse(cls, spec: str, **extra) -> CompressionConfig:
        """Parse a command-line spec: ``none``, ``visionzip:54,10``, ``vispruner:64`` or
        ``vispruner:64,0.5``; a bare ``54,10`` means VisionZip."""
        spec = spec.strip()
        if spec in ("", "none", "vanilla"):
            return cls(**extra)
        method, _, args = spec.partition(":")
        if not args:
            method, args = "visionzip", spec
        parts = [p.strip() for p in args.split(",") if p.strip()]
        usage = (
            f"cannot parse compression spec {spec!r}: use 'none', 'visionzip:D,C' (e.g. 54,10) "
            "or 'vispruner:T[,ratio]' (e.g. vispruner:64)"
        )
        try:
            if method == "visionzip" and len(parts) == 2:
                dominant, contextual = int(parts[0]), int(parts[1])
                return cls(method="visionzip", dominant=dominant, contextual=contextual, **extra)
            if method == "vispruner" and len(parts) in (1, 2):
                tokens, ratio = int(parts[0]), (float(parts[1]) if len(parts) == 2 else 0.5)
                return cls(method="vispruner", tokens=tokens, important_ratio=ratio, **extra)
        except ValueError as err:
            if "invalid literal" in str(err) or "could not convert" in str(err):
                raise ValueError(usage) from err
            raise
        raise ValueError(usage)
