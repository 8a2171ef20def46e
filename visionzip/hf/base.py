"""How a Hugging Face vision-language model family takes visual-token compression, per instance.

A family (one file in this package) says, for each visual input it has (``Modality``: images, videos):

- ``features(model, config, pixels, **kwargs)``: the compressed replacement of the inner model's own
  ``get_image_features`` / ``get_video_features`` (same arguments, a ``BaseModelOutputWithPooling`` whose
  ``pooler_output`` holds the features the LLM sees);
- ``counts(model, settings, processor_output)``: how many placeholder tokens each image / video becomes,
  so that the processor writes that many into ``input_ids``;
- ``expected(model, settings, forward_kwargs)``: the total the model's forward needs for its pixels;

and ``check(model, config)``: the budget against the encoder (ValueError naming the value and the
limit), run when the compression is applied, before any forward.

``install`` sets each modality's compressed method as an *instance* attribute of the model's inner
``*Model`` (the one module whose ``forward`` asks for the features), and a forward pre-hook on that module
that refuses ``input_ids`` whose placeholder count is not the compressed count (inputs of a processor that
was not made compression-aware). No class and no method is replaced globally;
``apply_compression(model, "none")`` removes both again.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import CompressionConfig
from ..methods import MethodSettings

# inner model -> (hook handle, compression config) of what ``install`` put on it
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Modality:
    """One visual input of a family (images, videos): the inner model's method that encodes it, the
    forward argument with its pixels, the placeholder token, and the family's functions for it."""

    name: str
    # (model, config, pixel arguments as the model's own method takes them) -> BaseModelOutputWithPooling
    features: Callable[..., Any]
    # (model, settings, processor output dict) -> placeholder count per image / video
    counts: Callable[[Any, MethodSettings, dict], list[int]]
    # (model, settings, forward kwargs holding the pixels) -> total placeholder count they need
    expected: Callable[[Any, MethodSettings, dict], int]
    method: str = "get_image_features"
    pixels: str = "pixel_values"
    token_id: str = "image_token_id"
    # (processor, count) -> the text one placeholder becomes; None: the placeholder token ``count`` times
    placeholder_text: Callable[[Any, int], str] | None = None


@dataclass
class HFFamily:
    """One Hugging Face model family: the classes it covers, its budget check and its modalities."""

    name: str
    class_names: tuple[str, ...]
    check: Callable[[Any, CompressionConfig], None]
    modalities: tuple[Modality, ...]
    # the inner model holding ``get_image_features`` and the placeholder id
    inner: Callable[[Any], Any] = lambda model: model.model
    # further instance methods of the inner model, (model, config) -> {name: function}: what the model
    # calls on its own besides the features (Qwen2.5-VL: ``get_rope_index`` of the compressed layout)
    methods: Callable[[Any, CompressionConfig], dict] | None = None
    # (model, config, forward kwargs) -> kwargs, run by the pre-hook after the placeholder check: what
    # the forward needs besides the features (Qwen2.5-VL: the kept tokens' original M-RoPE positions)
    prepare: Callable[[Any, CompressionConfig, dict], dict] | None = None

    def matches(self, model) -> bool:
        return type(model).__name__ in self.class_names


_FAMILIES: list[HFFamily] = []


def register_family(family: HFFamily) -> HFFamily:
    """Add a family and teach ``visionzip.apply_compression`` its classes."""
    from ..apply import register_model_adapter

    _FAMILIES.append(family)
    register_model_adapter(family.matches, lambda model, config: install(family, model, config))
    return family


def supported_classes() -> list[str]:
    """Names of the Hugging Face model classes ``apply_compression`` accepts."""
    return [name for family in _FAMILIES for name in family.class_names]


def family_of(model) -> HFFamily:
    for family in _FAMILIES:
        if family.matches(model):
            return family
    raise TypeError(
        f"no visual-token compression adapter for {type(model).__name__}; supported Hugging Face classes: "
        f"{', '.join(supported_classes())}"
    )


def vision_settings(config: CompressionConfig) -> MethodSettings:
    """The settings of a vision-side method (the HF adapters compress before the LLM)."""
    settings = config.settings
    if settings.stage == "llm":
        raise ValueError(
            f"{settings.name} acts inside the language model (stage 'llm'); the Hugging Face adapters take "
            "vision-side methods (stage 'tower' or 'encoder_output')"
        )
    return settings


def single_layer(layer, family: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"{family}: visual-token compression scores one encoder layer, but vision_feature_layer is {layer!r}; "
            "use a single integer layer"
        )
    return layer


def fixed_count(settings: MethodSettings, num_tokens: int) -> int:
    """Tokens one view becomes; a ValueError for methods whose count depends on the image."""
    count = settings.llm_input_tokens_per_view(num_tokens)
    if count is None:
        raise ValueError(
            f"{settings.name} keeps an image-dependent number of tokens, but a processor must write the "
            "placeholder count before the image is encoded; use a method with a fixed budget"
        )
    return int(count)


def current_compression(model) -> CompressionConfig:
    """The compression ``install`` put on ``model`` (``CompressionConfig()`` when none)."""
    family = family_of(model)
    state = _INSTALLED.get(family.inner(model))
    return CompressionConfig() if state is None else state[1]


def uninstall(family: HFFamily, model) -> None:
    inner = family.inner(model)
    state = _INSTALLED.pop(inner, None)
    if state is not None:
        state[0].remove()
        for name in state[2]:
            inner.__dict__.pop(name, None)
    for modality in family.modalities:
        inner.__dict__.pop(modality.method, None)


def _count(encoded) -> int:
    """Features in an encoder output's pooler_output (a list of (T_i, C) or a (N, T, C) tensor)."""
    return sum(int(features.numel() // features.shape[-1]) for features in encoded.pooler_output)


def install(family: HFFamily, model, config: CompressionConfig):
    """Put ``config`` on this instance (module docstring); ``none`` removes it. Returns the model.
    A config that does not fit is refused before anything changes (the previous setting stays)."""
    if config.enabled:
        settings = vision_settings(config)
        family.check(model, config)
    uninstall(family, model)
    if not config.enabled:
        model.config.visual_compression = None
        return model
    inner = family.inner(model)

    def check_placeholders(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or not isinstance(input_ids, torch.Tensor):
            return None
        for modality in family.modalities:
            found = int((input_ids == getattr(model.config, modality.token_id)).sum())
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get(modality.name)
            if kwargs.get(modality.pixels) is not None:
                expected = modality.expected(model, settings, kwargs)
            elif encoded is not None and found:  # generate() encodes the pixels before the first forward
                expected = _count(encoded)
            else:
                continue
            if found != expected:
                raise ValueError(
                    f"input_ids hold {found} {modality.name} placeholder tokens but {config.spec()} gives {expected} "
                    f"{modality.name} features for these inputs: build the inputs with visionzip.hf."
                    "compression_aware_processor(processor, model), whose placeholder count is the compressed count"
                )
        if family.prepare is not None:
            return args, family.prepare(model, config, kwargs)
        return None

    for modality in family.modalities:

        def features(*args, _modality=modality, **kwargs):
            return _modality.features(model, config, *args, **kwargs)

        # generate() passes the method the model kwargs its signature names: keep the class's signature
        own = inspect.signature(getattr(type(inner), modality.method))
        features.__signature__ = own.replace(parameters=list(own.parameters.values())[1:])
        # an instance attribute: shadows the class's method for this model only (nothing global)
        setattr(inner, modality.method, features)
    extra = family.methods(model, config) if family.methods is not None else {}
    for name, method in extra.items():
        setattr(inner, name, method)  # instance attributes, as the features above
    handle = inner.register_forward_pre_hook(check_placeholders, with_kwargs=True)
    _INSTALLED[inner] = (handle, config, tuple(extra))
    model.config.visual_compression = config.to_dict()
    return model
