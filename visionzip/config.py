"""Compression settings as data: the method's name plus that method's settings, persisted in a model's
``config.json`` under ``visual_compression``.

A checkpoint trained or evaluated with compression records *how* its visual tokens were compressed, so
that reloading it reproduces the same token budget. The persisted dict is flat:
``{"method": "visionzip", "dominant": 54, "contextual": 10, "anyres_layout": "official"}``: the method and
its own settings, nothing else (a key the method does not have is refused, naming it).

One spec string selects a method everywhere (``--compression SPEC``, ``apply_compression(model, SPEC)``):

- ``none``;
- ``METHOD:TOKENS``: the method's paper split for that many visual tokens per image (per crop on
  LLaVA-NeXT), e.g. ``visionzip:64`` = 54 dominant + 10 contextual;
- ``METHOD:key=value,...``: explicit settings, e.g. ``visionzip:dominant=54,contextual=10`` (the canonical
  form: what ``spec()`` prints);
- ``METHOD:v1,v2,...``: the positional form of the released VisionZip / VisPruner command lines
  (``visionzip:54,10``, ``vispruner:64,0.5``), accepted as input only.
"""
from __future__ import annotations

from typing import Any

from .methods.base import CompressionMethod, check_count, check_ratio, get_method, registered_methods

__all__ = [
    "ANYRES_LAYOUTS",
    "CompressionConfig",
    "check_count",
    "check_ratio",
    "parse_spec",
]

# How LLaVA-NeXT (anyres) lays out compressed crop tokens:
#   "official": as the official VisionZip code (docs/visionzip.md): base image tokens, then the kept tokens
#               of all crops in row-major order of the full grid, each crop's CLS, then all merged tokens;
#               no unpad, no image_newline.
#   "spatial":  keep LLaVA-NeXT's own layout: only kept positions of the (unpadded) grid survive, with
#               ``image_newline`` after every grid row that still has tokens; merged tokens follow.
ANYRES_LAYOUTS = ("official", "spatial")

_NONE = ("", "none", "vanilla")


def parse_spec(spec: str) -> CompressionMethod | None:
    """A spec string (see the module docstring) -> the method's settings, or None for ``none``."""
    if not isinstance(spec, str):
        raise ValueError(f"a compression spec must be a string, got {type(spec).__name__}")
    spec = spec.strip()
    if spec.lower() in _NONE:
        return None
    method, colon, args = spec.partition(":")
    if not colon:
        if method in registered_methods():
            raise ValueError(f"compression spec {spec!r} needs a budget: '{method}:TOKENS' or '{method}:key=value,...'")
        else:
            raise ValueError(
                f"cannot parse compression spec {spec!r}: use 'none', 'METHOD:TOKENS' or 'METHOD:key=value,...' "
                f"with METHOD one of {registered_methods()}"
            )
    return get_method(method.strip().lower()).from_args(args)


class CompressionConfig:
    """Which visual-token compression a model applies: ``method`` and that method's ``settings``.

    ``CompressionConfig()`` is no compression. ``CompressionConfig(method="visionzip", dominant=54,
    contextual=10)`` builds the method's settings from keyword arguments; ``CompressionConfig.parse(spec)``
    from a spec string. The method's settings are also readable as attributes (``config.dominant``).
    """

    def __init__(
        self,
        method: str = "none",
        settings: CompressionMethod | None = None,
        anyres_layout: str = "official",
        **settings_kwargs: Any,
    ):
        method = (method or "none").strip().lower()
        if method in _NONE:
            method = "none"
            if settings is not None or settings_kwargs:
                raise ValueError(f"method 'none' takes no settings, got {settings or settings_kwargs}")
        elif settings is None:
            settings = get_method(method)(**settings_kwargs)
        elif settings_kwargs:
            raise ValueError("give either settings or keyword settings, not both")
        elif settings.name != method:
            raise ValueError(f"settings for {settings.name!r} given with method {method!r}")
        if anyres_layout not in ANYRES_LAYOUTS:
            raise ValueError(f"anyres_layout must be one of {ANYRES_LAYOUTS}, got {anyres_layout!r}")
        self.method = method
        self.settings = settings
        self.anyres_layout = anyres_layout

    # ----- views ----------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.settings is not None

    @property
    def stage(self) -> str | None:
        return None if self.settings is None else self.settings.stage

    @property
    def tokens_per_image(self) -> int | None:
        """Visual tokens one image (or one anyres crop) contributes; None when uncompressed or when it
        depends on the image (e.g. adaptive PruMerge)."""
        return None if self.settings is None else self.settings.tokens_per_view()

    def __getattr__(self, name: str):
        # the method's own settings read as attributes (config.dominant); only called for missing names
        settings = self.__dict__.get("settings")
        if settings is not None and name in {f for f in settings.to_dict()}:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__} ({self.__dict__.get('method')}) has no attribute {name!r}")

    def validate(self) -> CompressionConfig:
        if self.settings is not None:
            self.settings.validate()
        return self

    def spec(self) -> str:
        """The spec string that gives back this config (without the anyres layout)."""
        return "none" if self.settings is None else self.settings.spec()

    def label(self) -> str:
        return "vanilla" if self.settings is None else self.settings.label()

    def __eq__(self, other) -> bool:
        return isinstance(other, CompressionConfig) and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(self.spec())

    def __repr__(self) -> str:
        return f"CompressionConfig({self.spec()!r}, anyres_layout={self.anyres_layout!r})"

    # ----- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"method": self.method}
        if self.settings is not None:
            out.update(self.settings.to_dict())
        out["anyres_layout"] = self.anyres_layout
        return out

    @classmethod
    def from_dict(cls, data: dict | CompressionConfig | None) -> CompressionConfig:
        if data is None:
            return cls()
        if isinstance(data, CompressionConfig):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"visual_compression must be a dict, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", "none") or "none"
        layout = data.pop("anyres_layout", "official")
        if method in _NONE:
            if data:
                raise ValueError(f"unknown compression settings {sorted(data)} for method 'none'")
            return cls(anyres_layout=layout)
        settings_cls = get_method(method)
        known = {f for f in settings_cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown compression settings {sorted(unknown)} for {method}; known: {sorted(known)}")
        return cls(method, settings_cls(**data), anyres_layout=layout)

    @classmethod
    def parse(cls, spec: str | CompressionConfig | dict | None, anyres_layout: str = "official") -> CompressionConfig:
        """A spec string (or a config / dict, returned as a config) -> ``CompressionConfig``."""
        if spec is None:
            return cls(anyres_layout=anyres_layout)
        if isinstance(spec, CompressionConfig):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        settings = parse_spec(spec)
        if settings is None:
            return cls(anyres_layout=anyres_layout)
        return cls(settings.name, settings, anyres_layout=anyres_layout)
