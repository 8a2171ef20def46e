"""How a Hugging Face vision-language model family takes visual-token compression, per instance.

A family (one file in this package) says, for each visual input it has (``Modality``: images, videos):

- ``features(model, config, pixels, **kwargs)``: the compressed replacement of the inner model's own
  ``get_image_features`` / ``get_video_features`` (same arguments, a ``BaseModelOutputWithPooling`` whose
  ``pooler_output`` holds the features the LLM sees);
- ``counts(model, settings, processor_output)``: how many placeholder tokens each image / video becomes,
  so that the processor writes that many into ``input_ids``;
- ``expected(model, settings, forward_kwargs)``: the total the model's forward needs for its pixels (None
  where only the encoded pixels tell: LLaVA-NeXT's spatial layout; the model's own check runs then);

and ``check(model, config)``: the budget against the encoder (ValueError naming the value and the
limit), run when the compression is applied, before any forward.

``install`` sets each modality's compressed method as an *instance* attribute of the model's inner
``*Model`` (the one module whose ``forward`` asks for the features), and a forward pre-hook on that module
that refuses ``input_ids`` whose placeholder count is not the compressed count (inputs of a processor that
was not made compression-aware). No class and no method is replaced globally;
``apply_compression(model, "none")`` removes both again.

In-LLM methods (stage ``llm``: FastV, PyramidDrop, SparseVLM, ...) leave the features and the placeholder
count as the model's own (``llm_input_tokens_per_view`` is the uncompressed count; the model's own
processor is the compression-aware one). ``install`` then asks the settings for their pruner
(``settings.llm_pruner``, with the family's ``llm_view_tokens`` for per-view budgets), sets the inner
language model's ``forward`` as an instance attribute that runs ``visionzip.decoder_loop`` (Llama, Mistral,
Qwen2, Qwen2.5-VL's text model), and a pre-hook on the inner model that tells it where the prompt's
placeholder tokens (the visual tokens) sit.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..config import CompressionConfig
from ..decoder_loop import check_language_model, pruned_decoder_forward, pruned_prefix
from ..llm import LLMTokenPruner
from ..methods import CompressionMethod
from ..model_adapters import register_model_adapter

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
    counts: Callable[[Any, CompressionMethod, dict], list[int]]
    # (model, settings, forward kwargs holding the pixels) -> total placeholder count they need
    expected: Callable[[Any, CompressionMethod, dict], int]
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
    # model -> the visual tokens one view (image, crop, tile, frame) puts into the LLM uncompressed, for
    # in-LLM budgets given per view (``settings.llm_pruner(view_tokens=...)``); None: no fixed view size
    # (Qwen2.5-VL's dynamic resolution), in-LLM budgets are then per sample
    llm_view_tokens: Callable[[Any], int | None] | None = None

    def matches(self, model) -> bool:
        return type(model).__name__ in self.class_names


_FAMILIES: list[HFFamily] = []


def register_family(family: HFFamily) -> HFFamily:
    """Add a family and teach ``visionzip.apply_compression`` its classes."""
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


def vision_settings(config: CompressionConfig) -> CompressionMethod:
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


def fixed_count(settings: CompressionMethod, num_tokens: int) -> int:
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


def llm_pruner(family: HFFamily, model, config: CompressionConfig) -> LLMTokenPruner:
    """The in-LLM pruning schedule of ``config`` (a stage ``llm`` method) on this model's language model:
    its decoder loop must be one ``visionzip.decoder_loop`` runs, the budget must fit a view and the
    layers the LLM (ValueErrors naming value and limit, before any forward)."""
    settings = config.settings
    language_model = family.inner(model).language_model
    check_language_model(language_model, settings.name)
    view_tokens = family.llm_view_tokens(model) if family.llm_view_tokens is not None else None
    if view_tokens is not None:
        settings.check_view(view_tokens)
    return settings.llm_pruner(int(language_model.config.num_hidden_layers), view_tokens=view_tokens)


class _Removable:
    """Undoes what ``_install_in_llm`` put on the instance (the pre-hook, the language model's forward)."""

    def __init__(self, handle, language_model):
        self.handle, self.language_model = handle, language_model

    def remove(self) -> None:
        self.handle.remove()
        self.language_model.__dict__.pop("forward", None)


def _install_in_llm(family: HFFamily, model, config: CompressionConfig, pruner: LLMTokenPruner):
    """In-LLM methods: the features and placeholder counts stay the model's own (``llm_input_tokens_per_view``
    is the uncompressed count, so the model's own processor writes the right number); a pre-hook on the inner
    model notes where the prompt's visual placeholders sit, and the language model's ``forward`` becomes an
    instance attribute that runs ``visionzip.decoder_loop.pruned_decoder_forward`` on a prefill with visual
    tokens and on every later call on a cache that prefill pruned; other calls run the class's forward."""
    inner = family.inner(model)
    language_model = inner.language_model
    # every visual placeholder the model has, also of inputs the family does not compress (Qwen2.5-VL videos)
    names = {m.token_id for m in family.modalities} | {"image_token_id", "video_token_id"}
    token_ids = sorted({getattr(model.config, n) for n in names if getattr(model.config, n, None) is not None})
    pending: dict = {}  # the visual mask of the inner forward now running, for its language-model call

    def mark_visual(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        visual = None
        if isinstance(input_ids, torch.Tensor):
            visual = torch.isin(input_ids, torch.tensor(token_ids, device=input_ids.device))
        pending["visual_mask"] = visual
        return None

    own_forward = type(language_model).forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        visual_mask = pending.pop("visual_mask", None)
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = language_model.embed_tokens(input_ids)
            input_ids = None
        if visual_mask is not None and (inputs_embeds is None or visual_mask.shape != inputs_embeds.shape[:2]):
            visual_mask = None
        if (visual_mask is None or not bool(visual_mask.any())) and pruned_prefix(cache) is None:
            return own_forward(language_model, input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                               use_cache=use_cache, **kwargs)
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                raise ValueError(f"{name} is not available while {config.spec()} prunes tokens inside the LLM")
        use_cache = language_model.config.use_cache if use_cache is None else use_cache
        out = pruned_decoder_forward(
            language_model, inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask, pruner
        )
        return BaseModelOutputWithPast(last_hidden_state=out.last_hidden_state, cache=out.cache)

    forward.__signature__ = inspect.signature(own_forward).replace(
        parameters=list(inspect.signature(own_forward).parameters.values())[1:]
    )
    handle = inner.register_forward_pre_hook(mark_visual, with_kwargs=True)
    # an instance attribute: shadows the class's forward for this language model only (nothing global)
    language_model.forward = forward
    _INSTALLED[inner] = (_Removable(handle, language_model), config, ())
    model.config.visual_compression = config.to_dict()
    return model


def install(family: HFFamily, model, config: CompressionConfig):
    """Put ``config`` on this instance (module docstring); ``none`` removes it. Returns the model.
    A config that does not fit is refused before anything changes (the previous setting stays)."""
    in_llm = config.enabled and config.settings.stage == "llm"
    if in_llm:
        pruner = llm_pruner(family, model, config)
    elif config.enabled:
        settings = vision_settings(config)
        family.check(model, config)
    uninstall(family, model)
    if not config.enabled:
        model.config.visual_compression = None
        return model
    if in_llm:
        return _install_in_llm(family, model, config, pruner)
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
            if expected is not None and found != expected:  # None: known once encoded (the model checks)
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
