"""Bench of the non-LLaVA families at their real geometry, random weights (nothing is downloaded).

    # CPU (bfloat16): 2 LLM layers, EVA2-CLIP-E cut to 4 of its 63 layers, small embedding tables (see --vocab)
    python -m llava.bench.families --family mgm-7b --layers 2 --vocab 64 --methods none visionzip:64 vispruner:64
    python -m llava.bench.families --family cogvlm-17b --layers 2 --tower-layers 4 --vocab 64 --repeats 3 --json out.json
    # GPU: full depth
    python -m llava.bench.families --family qwen-vl-7b --device cuda --repeats 10 --warmup 2

Families (``FAMILIES``), each built from its own config classes at the real widths:

- ``mgm-7b`` / ``mgm-13b``: ``MGMLlamaForCausalLM`` (``llava/model/language_model/mgm_llama.py``): Vicuna-7B /
  13B (``llava.bench.geometry.LLAMA_7B`` / ``LLAMA_13B``), CLIP ViT-L/14-336 (``TowerGeometry()``, LR, 576
  tokens), OpenCLIP ConvNeXt-L at 768 px (HR: widths 192/384/768/1536, depths 3/3/27/3; ``image_size_aux``
  768 for MGM-7B / 13B, docs/mgm.md), patch-info mining, mlp2x_gelu projector;
- ``qwen-vl-7b``: ``QwenVLForCausalLM`` on ``QwenVLConfig()``'s defaults, which are Qwen-VL-Chat's config
  (Qwen-7B, ViT-bigG 448 px in 14 px patches, 48 layers of width 1664, a 256-query resampler; docs/qwen_vl.md);
- ``cogvlm-17b``: ``CogVLMForCausalLM`` on ``CogVLMConfig()``'s defaults, cogvlm-chat-v1.1's config
  (Vicuna-7B widths with a visual expert in every layer, EVA2-CLIP-E 490 px: 63 layers of width 1792, 1225
  patches + CLS; docs/cogvlm.md);
- ``mgm-tiny`` / ``qwen-vl-tiny`` / ``cogvlm-tiny``: the same code paths at toy widths (tests, smoke runs).

``--layers N`` builds the LLM with its first N layers (timings are of those N layers; the paper's FLOPs are
given for both N and the real depth); ``--tower-layers N`` (for CPU runs: EVA2-CLIP-E alone is 4.4 B
parameters) builds every transformer tower with N layers and each ConvNeXt stage with at most N blocks,
and the output says so. Without it the towers keep their full depth. ``--vocab`` shrinks the embedding
tables (the prefill computes the last position's logits only, so the work timed barely changes). Use it for
CPU runs in bfloat16: there torch 2.13 computes a linear on a (B, 1, C) slice, which is what the models'
``logits_to_keep=1`` passes their ``lm_head``, by first copying the whole transposed head (seconds for a
32000 x 4096 head on a shared core; float32 and 2D inputs are not affected). Parameters are created directly in
``--dtype`` (bfloat16 by default: a CPU with AMX runs it several times faster than float32), so a 17B-shaped
model with few layers is built without a float32 copy; the full model's parameter count is reported from a
meta-device build (no memory).

Per method, all methods measured round by round in one process (``visionzip.profiling.measure_interleaved``,
so that the ratios to vanilla come from one run): **tower** = the vision side up to the tokens the LLM
receives (towers, compression, mining / resampler / adapter, projector), **prefill** = the LLM over the
spliced sequence (KV cache on, the last position's logits), each the median of ``--repeats`` timed calls
after ``--warmup`` (min-max); visual tokens the LLM sees; KV cache bytes per sample (measured on the cache,
and the formula ``llava.bench.geometry.kv_cache_bytes``); the paper's LLM FLOPs
(``llava.bench.geometry.llm_prefill_flops``: 4nd^2 + 2n^2d + 2ndm per layer, m the FFN width; in-LLM
methods by their per-layer schedule). Each method runs on its own view of the one model (``method_view``:
shared weights, the method set once, outside the timed calls).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llava.constants import IMAGE_TOKEN_INDEX
from visionzip import CompressionConfig
from visionzip.profiling import measure_interleaved

from .geometry import (
    LLAMA_7B,
    LLAMA_13B,
    TINY_LLM,
    Geometry,
    LlmGeometry,
    TowerGeometry,
    kv_cache_bytes,
    llm_layer_flops,
    llm_prefill_flops,
)
from .runner import cache_bytes
from .setup import default_dtype, geometry_config

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# OpenCLIP's convnext_large_d_320 trunk (timm convnext_large), MGM's HR tower (docs/mgm.md,
# llava/model/mgm/convnext.py): the layout ``ConvNeXtAuxTower.build`` takes
CONVNEXT_LARGE = {"widths": [192, 384, 768, 1536], "depths": [3, 3, 27, 3], "downsample": [False, True, True, True],
                  "patch": 4, "kernel": 7, "mlp_ratio": 4.0, "layer_scale": True}
# the tiny MGM checkpoint's HR tower (llava/model/mgm/tiny.py)
CONVNEXT_TINY = {**CONVNEXT_LARGE, "widths": [8, 8, 16, 16], "depths": [1, 1, 2, 1]}
MGM_IMAGE_SIZE_AUX = 768  # MGM-7B / 13B (docs/mgm.md)


# ----- options and the built model ----------------------------------------------------------------
@dataclass(frozen=True)
class BuildOptions:
    """``layers`` / ``tower_layers`` / ``vocab``: None keeps the real value; ``device``: where the model is built
    and run ("cpu", "cuda")."""

    layers: int | None = None
    tower_layers: int | None = None
    vocab: int | None = None
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"


@dataclass
class BenchInputs:
    """One sample: input_ids (1, text_tokens + 1) with one ``IMAGE_TOKEN_INDEX``; images (1, 3, S, S) as the
    family's model takes them (MGM: the HR image)."""

    input_ids: torch.Tensor
    images: torch.Tensor
    text_tokens: int


@dataclass
class Spliced:
    """The LLM's input for one method: what ``prefill`` takes, its width and its visual tokens."""

    data: object
    seq_len: int
    visual_tokens: int


@dataclass
class FamilyModel:
    """A built model and the family's calls on it (or on a ``method_view`` of it): ``vision(model, images)`` (the
    tokens the LLM receives), ``splice(model, inputs)`` -> ``Spliced``, ``prefill(model, spliced)`` -> the KV
    cache. ``llm``: the LLM shape as built (``layers`` = the layers run); ``real_layers``: the real depth; ``ffn``: the FFN width of the paper's formula; ``view_tokens``:
    the visual tokens of one image, uncompressed, as the methods count them (in-LLM schedules); ``framing``: image
    tokens no method drops (CogVLM's boi / eoi)."""

    model: torch.nn.Module
    llm: LlmGeometry
    real_layers: int
    ffn: int
    view_tokens: int
    make_inputs: Callable[[int, int], BenchInputs]
    vision: Callable[[torch.nn.Module, torch.Tensor], object]
    splice: Callable[[torch.nn.Module, BenchInputs], Spliced]
    prefill: Callable[[torch.nn.Module, Spliced], object]
    towers: list[str] = field(default_factory=list)
    framing: int = 0


@dataclass(frozen=True)
class Family:
    key: str
    family: str
    description: str
    build: Callable[[BuildOptions], FamilyModel]
    full_params: Callable[[], int]
    tiny: bool = False


def _check_cap(name: str, value: int | None, limit: int) -> int:
    if value is None:
        return limit
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name} must be an integer in [1, {limit}], got {value!r}")
    return value


def _random_ids(count: int, vocab: int, generator: torch.Generator, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab, (count,), generator=generator)


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----- Mini-Gemini ---------------------------------------------------------------------------------
def _mgm_config(llm: LlmGeometry, tower: TowerGeometry, layout: dict, image_size_aux: int, tower_dir: str, layers: int):
    from llava.model.language_model.mgm_llama import MGMConfig

    base = geometry_config(Geometry("mgm", llm, tower), tower_dir, layers).to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        base.pop(key, None)
    return MGMConfig(**base, mm_vision_tower_aux="convnext (random weights)", mm_hidden_size_aux=sum(layout["widths"]),
                     image_size_aux=image_size_aux, optimize_vision_tower_aux=False, image_grid=1, image_global=False)


def _write_tower_folder(tower: TowerGeometry, tower_dir: str) -> None:
    """The CLIP tower folder as ``llava.bench.setup.build_geometry_model`` writes it: configs only."""
    from transformers import CLIPImageProcessorPil

    side = tower.image_size
    tower.clip_config().save_pretrained(tower_dir)
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(tower_dir)


def _mgm_builder(llm: LlmGeometry, tower: TowerGeometry, layout: dict, image_size_aux: int):
    def shapes(options: BuildOptions):
        real_tower_layers = tower.layers
        tower_layers = _check_cap("tower_layers", options.tower_layers, real_tower_layers)
        if tower_layers < 2:
            raise ValueError("tower_layers must be >= 2 for MGM: LLaVA's CLIP tower reads layer -2")
        built_llm = dataclasses.replace(llm, vocab=options.vocab or llm.vocab)
        built_tower = dataclasses.replace(tower, layers=tower_layers)
        built_layout = {**layout, "depths": [min(d, tower_layers) for d in layout["depths"]]} if options.tower_layers else layout
        return built_llm, built_tower, built_layout

    def build(options: BuildOptions) -> FamilyModel:
        from llava.model.language_model.mgm_llama import MGMLlamaForCausalLM

        layers = _check_cap("layers", options.layers, llm.layers)
        built_llm, built_tower, built_layout = shapes(options)
        with tempfile.TemporaryDirectory(prefix="llava-bench-mgm-") as tower_dir:
            _write_tower_folder(built_tower, tower_dir)
            config = _mgm_config(built_llm, built_tower, built_layout, image_size_aux, tower_dir, layers)
            torch.manual_seed(0)
            with torch.device(options.device), default_dtype(options.dtype):
                model = MGMLlamaForCausalLM(config)
                aux = model.get_vision_tower_aux()
                aux.build(built_layout)  # the structure MGM's OpenCLIP folder describes, random weights
        aux.is_loaded = True  # what ConvNeXtAuxTower.load_model sets once its modules exist
        model.requires_grad_(False).eval()

        def make_inputs(text_tokens: int, seed: int) -> BenchInputs:
            if text_tokens < 2:
                raise ValueError(f"text_tokens must be >= 2 (BOS and at least one more), got {text_tokens}")
            generator = torch.Generator().manual_seed(seed)
            ids = _random_ids(text_tokens, built_llm.vocab, generator)
            ids[0] = 1
            at = max(1, min(text_tokens - 1, (text_tokens * 5) // 8))  # vicuna_v1: system prompt, USER:, <image>
            input_ids = torch.cat([ids[:at], torch.tensor([IMAGE_TOKEN_INDEX]), ids[at:]])[None]
            images = torch.randn(1, 3, image_size_aux, image_size_aux, generator=generator).to(options.dtype)
            return BenchInputs(input_ids.to(options.device), images.to(options.device), text_tokens)

        def splice(model, inputs: BenchInputs) -> Spliced:
            out = model.splice_multimodal(inputs.input_ids, inputs.images, None, padding_side="left")
            n = int(out.inputs_embeds.shape[1])
            return Spliced(out, n, n - inputs.text_tokens)

        def prefill(model, spliced: Spliced):
            s = spliced.data
            return model(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, position_ids=s.position_ids,
                         use_cache=True, logits_to_keep=1, visual_mask=s.visual_mask).cache

        clip = model.get_vision_tower()
        depths = "/".join(str(d) for d in built_layout["depths"])
        real_depths = "/".join(str(d) for d in layout["depths"])
        towers = [
            f"CLIP ViT {built_tower.hidden} wide, {built_tower.layers} of {tower.layers} layers (runs to layer -2), "
            f"{built_tower.image_size} px",
            f"ConvNeXt widths {'/'.join(str(w) for w in layout['widths'])}, depths {depths} of {real_depths}, "
            f"{image_size_aux} px",
        ]
        return FamilyModel(
            model, dataclasses.replace(built_llm, layers=layers), llm.layers, llm.intermediate, clip.num_patches,
            make_inputs, lambda model, images: model.project_views(images).tokens, splice, prefill, towers,
        )

    def full_params() -> int:
        from llava.model.language_model.mgm_llama import MGMLlamaForCausalLM

        with tempfile.TemporaryDirectory(prefix="llava-bench-mgm-") as tower_dir:
            _write_tower_folder(tower, tower_dir)
            config = _mgm_config(llm, tower, layout, image_size_aux, tower_dir, llm.layers)
            with torch.device("meta"):
                model = MGMLlamaForCausalLM(config)
                model.get_vision_tower_aux().build(layout)
        return _parameter_count(model)

    return build, full_params


# ----- Qwen-VL ------------------------------------------------------------------------------------
def _qwen_builder(config_kwargs: dict):
    def config_for(options: BuildOptions | None):
        from llava.model.qwen_vl.config import QwenVLConfig

        reference = QwenVLConfig(**config_kwargs)
        if options is None:
            return reference, reference
        visual = dict(reference.visual)
        visual["layers"] = _check_cap("tower_layers", options.tower_layers, int(visual["layers"]))
        kwargs = {**config_kwargs, "visual": visual,
                  "num_hidden_layers": _check_cap("layers", options.layers, reference.num_hidden_layers)}
        if options.vocab is not None:
            kwargs["vocab_size"] = options.vocab
        return QwenVLConfig(**kwargs), reference

    def build(options: BuildOptions) -> FamilyModel:
        from llava.model.qwen_vl.model import QwenVLForCausalLM

        config, reference = config_for(options)
        torch.manual_seed(0)
        with torch.device(options.device), default_dtype(options.dtype):
            model = QwenVLForCausalLM(config)
        model.requires_grad_(False).eval()
        visual = config.visual
        size = int(visual["image_size"])
        vocab = int(config.vocab_size)
        start = config.image_start_id
        # <img> and </img> (image_start_id, + 1), or the last two ids of a shrunk vocabulary (--vocab)
        img_open, img_close = (start, start + 1) if start + 1 < vocab else (vocab - 2, vocab - 1)

        def make_inputs(text_tokens: int, seed: int) -> BenchInputs:
            if text_tokens < 3:
                raise ValueError(f"text_tokens must be >= 3 (<img>, </img> and at least one more), got {text_tokens}")
            generator = torch.Generator().manual_seed(seed)
            ids = _random_ids(text_tokens - 2, min(vocab - 2, start), generator, low=0)
            at = max(0, min(text_tokens - 3, (text_tokens * 5) // 8))  # system turn, "Picture 1:<img>", question
            span = torch.tensor([img_open, IMAGE_TOKEN_INDEX, img_close])
            input_ids = torch.cat([ids[:at], span, ids[at:]])[None]
            images = torch.randn(1, 3, size, size, generator=generator).to(options.dtype)
            return BenchInputs(input_ids.to(options.device), images.to(options.device), text_tokens)

        def splice(model, inputs: BenchInputs) -> Spliced:
            embeds, mask, positions, visual_mask = model.splice(inputs.input_ids, inputs.images)
            n = int(embeds.shape[1])
            return Spliced((embeds, mask, positions, visual_mask), n, n - inputs.text_tokens)

        def prefill(model, spliced: Spliced):
            embeds, mask, positions, visual_mask = spliced.data
            return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, visual_mask=visual_mask).cache

        llm = LlmGeometry(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                          intermediate=config.intermediate_size // 2, vocab=vocab)
        towers = [
            f"ViT {visual['width']} wide, {visual['layers']} of {reference.visual['layers']} layers, {size} px in "
            f"{visual['patch_size']} px patches; resampler of {config.num_queries} queries into {visual['output_dim']}",
        ]
        return FamilyModel(model, llm, reference.num_hidden_layers, config.intermediate_size // 2, config.num_queries,
                           make_inputs, lambda model, images: model.encode_images(images), splice, prefill, towers)

    def full_params() -> int:
        from llava.model.qwen_vl.model import QwenVLForCausalLM

        config, _ = config_for(None)
        with torch.device("meta"):
            return _parameter_count(QwenVLForCausalLM(config))

    return build, full_params


# ----- CogVLM -------------------------------------------------------------------------------------
def _cogvlm_builder(make_config: Callable[[], object]):
    def config_for(options: BuildOptions | None):
        from llava.model.cogvlm.config import CogVLMConfig

        reference = make_config()
        if options is None:
            return reference, reference
        kwargs = reference.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            kwargs.pop(key, None)
        vision = dict(reference.vision_config)
        vision["num_hidden_layers"] = _check_cap("tower_layers", options.tower_layers, int(vision["num_hidden_layers"]))
        kwargs["vision_config"] = vision
        kwargs["num_hidden_layers"] = _check_cap("layers", options.layers, reference.num_hidden_layers)
        if options.vocab is not None:
            kwargs["vocab_size"] = options.vocab
        return CogVLMConfig(**kwargs), reference

    def build(options: BuildOptions) -> FamilyModel:
        from transformers import DynamicCache

        from llava.model.cogvlm.modeling import CogVLMForCausalLM
        from llava.model.cogvlm.pruning import pruned_prefill

        config, reference = config_for(options)
        torch.manual_seed(0)
        with torch.device(options.device), default_dtype(options.dtype):
            model = CogVLMForCausalLM(config)
        model.requires_grad_(False).eval()
        vision = config.vision_namespace()
        size = int(vision.image_size)
        vocab = int(config.vocab_size)

        def make_inputs(text_tokens: int, seed: int) -> BenchInputs:
            if text_tokens < 2:
                raise ValueError(f"text_tokens must be >= 2 (BOS and at least one more), got {text_tokens}")
            generator = torch.Generator().manual_seed(seed)
            ids = _random_ids(text_tokens, vocab, generator)
            ids[0] = config.bos_token_id
            # CogVLM's prompt: bos, the image, "Question: ... Answer:" (build_conversation_input_ids)
            input_ids = torch.cat([ids[:1], torch.tensor([IMAGE_TOKEN_INDEX]), ids[1:]])[None]
            images = torch.randn(1, 3, size, size, generator=generator).to(options.dtype)
            return BenchInputs(input_ids.to(options.device), images.to(options.device), text_tokens)

        def splice(model, inputs: BenchInputs) -> Spliced:
            out = model.splice(inputs.input_ids, None, inputs.images)
            n = int(out.inputs_embeds.shape[1])
            return Spliced(out, n, n - inputs.text_tokens)

        def prefill(model, spliced: Spliced):
            # CogVLMForCausalLM.forward after its splice: the pruned loop for in-LLM methods, else the decoder
            s = spliced.data
            cache = DynamicCache()
            pruner = model.llm_pruner()
            if pruner is not None:
                hidden = pruned_prefill(model, s, pruner, cache).hidden
            else:
                hidden = model.decode(s.inputs_embeds, s.attention_mask, s.token_type_ids, s.position_ids, cache)
            # the last position's logits, as CogVLMForCausalLM.generate takes them (a 2D row: on CPU in bfloat16,
            # torch 2.13 computes a linear on a (B, 1, C) slice by copying the whole transposed head first)
            model.lm_head(hidden[:, -1])
            return cache

        llm = LlmGeometry(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                          intermediate=config.intermediate_size, vocab=vocab)
        towers = [
            f"EVA2-CLIP {vision.hidden_size} wide, {vision.num_hidden_layers} of "
            f"{reference.vision_config['num_hidden_layers']} layers, {size} px in {vision.patch_size} px patches; "
            "GLU adapter; boi / eoi",
        ]
        return FamilyModel(model, llm, reference.num_hidden_layers, config.intermediate_size, config.num_patches,
                           make_inputs, lambda model, images: model.get_image_features(images).per_image, splice, prefill,
                           towers, framing=2)

    def full_params() -> int:
        from llava.model.cogvlm.modeling import CogVLMForCausalLM

        config, _ = config_for(None)
        with torch.device("meta"):
            return _parameter_count(CogVLMForCausalLM(config))

    return build, full_params


def _real_qwen() -> dict:
    return {}  # QwenVLConfig's defaults are Qwen-VL-Chat's config.json


def _tiny_qwen() -> dict:
    from llava.model.qwen_vl.tiny import tiny_config

    config = tiny_config(400)
    for key in ("architectures", "auto_map", "model_type", "transformers_version"):
        config.pop(key, None)
    return config


def _real_cogvlm():
    from llava.model.cogvlm.config import CogVLMConfig

    return CogVLMConfig()  # the defaults are cogvlm-chat-v1.1's config.json


def _tiny_cogvlm():
    from llava.model.cogvlm.tiny import tiny_config

    return tiny_config(400, hidden=64, layers=2, vision_hidden=32, vision_layers=2)


def _family(key: str, family: str, description: str, builder, tiny: bool = False) -> Family:
    build, full_params = builder
    return Family(key, family, description, build, full_params, tiny)


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        _family("mgm-7b", "mgm", "MGM-7B: Vicuna-7B + CLIP ViT-L/14-336 (LR) + ConvNeXt-L 768 px (HR), patch-info mining",
                _mgm_builder(LLAMA_7B, TowerGeometry(), CONVNEXT_LARGE, MGM_IMAGE_SIZE_AUX)),
        _family("mgm-13b", "mgm", "MGM-13B: Vicuna-13B + CLIP ViT-L/14-336 (LR) + ConvNeXt-L 768 px (HR), patch-info mining",
                _mgm_builder(LLAMA_13B, TowerGeometry(), CONVNEXT_LARGE, MGM_IMAGE_SIZE_AUX)),
        _family("qwen-vl-7b", "qwen_vl", "Qwen-VL-7B: Qwen-7B + ViT-bigG 448 px + 256-query resampler",
                _qwen_builder(_real_qwen())),
        _family("cogvlm-17b", "cogvlm", "CogVLM-17B: Vicuna-7B with a visual expert + EVA2-CLIP-E 490 px",
                _cogvlm_builder(_real_cogvlm)),
        _family("mgm-tiny", "mgm", "MGM code path at toy widths and sizes (CLIP 112 px: 64 patches; ConvNeXt 256 px: "
                "8 x 8 HR features per LR token, as at 336 / 768 px)",
                _mgm_builder(TINY_LLM, TowerGeometry(hidden=32, layers=2, heads=4, intermediate=64, image_size=112),
                             CONVNEXT_TINY, 256), tiny=True),
        _family("qwen-vl-tiny", "qwen_vl", "Qwen-VL code path at toy widths (llava.model.qwen_vl.tiny's config)",
                _qwen_builder(_tiny_qwen()), tiny=True),
        _family("cogvlm-tiny", "cogvlm", "CogVLM code path at toy widths (llava.model.cogvlm.tiny's config)",
                _cogvlm_builder(_tiny_cogvlm), tiny=True),
    )
}


def get_family(key: str) -> Family:
    if key not in FAMILIES:
        raise ValueError(f"unknown family {key!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[key]


# ----- measuring ----------------------------------------------------------------------------------
@dataclass
class Settings:
    methods: tuple[str, ...] = ("none", "visionzip:64", "vispruner:64")
    repeats: int = 5
    warmup: int = 1
    text_tokens: int = 64
    stages: tuple[str, ...] = ("tower", "prefill")
    memory: str = "tensors"  # how measure_interleaved watches peak memory (visionzip.profiling.PeakMemory's cpu_mode)

    def check(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for spec in self.methods:
            CompressionConfig.parse(spec)  # a malformed spec is refused before any model is built
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat: {list(self.methods)}")


def _method_flops(built: FamilyModel, compression: CompressionConfig, text: int, visual: int, layers: int) -> int:
    """The paper's LLM FLOPs over ``layers`` layers; an in-LLM method's visual tokens per layer follow its
    schedule (``llm_token_schedule``, as ``llava.bench.runner.schedule_flops``)."""
    schedule = _schedule(built, compression, visual, layers)
    if schedule is not None:
        return sum(llm_layer_flops(text + v, built.llm.hidden, built.ffn) for v in schedule)
    return llm_prefill_flops(text + visual, built.llm.hidden, built.ffn, layers)


def _schedule(built: FamilyModel, compression: CompressionConfig, visual: int, layers: int) -> list[int] | None:
    """An in-LLM method's visual tokens in each of ``layers`` layers (None for other methods): its schedule over
    the droppable ones, plus the framing tokens (CogVLM's boi / eoi), which stay."""
    if not (compression.enabled and compression.settings.stage == "llm"):
        return None
    schedule = compression.settings.llm_token_schedule(layers, visual - built.framing, built.view_tokens)
    return [int(v) + built.framing for v in schedule]


def method_view(model: torch.nn.Module, compression: CompressionConfig) -> torch.nn.Module:
    """``model`` set to one method, for timing: a shallow copy (the same modules, weights and buffers) with a
    config of its own, ``compression`` set on it once (``set_visual_compression``: its checks, and CogVLM's
    probe run of the method, stay out of the timed calls). The families read the setting from the top-level
    model only (``config.visual_compression``; CogVLM also its parsed copy), so the views of one model do not
    see each other's."""
    view = copy.copy(model)
    view.config = copy.deepcopy(model.config)
    view.set_visual_compression(compression)
    return view


def run(family: Family | str, options: BuildOptions, settings: Settings, built: FamilyModel | None = None) -> dict:
    """Build the family's model (or take ``built``, made by ``family.build(options)``), measure every method;
    returns {"meta": ..., "rows": [...]}."""
    family = get_family(family) if isinstance(family, str) else family
    settings.check()
    compressions = {spec: CompressionConfig.parse(spec).validate() for spec in settings.methods}
    load_before = _load_average()
    started = time.perf_counter()
    if built is None:
        built = family.build(options)
    build_s = time.perf_counter() - started
    model = built.model
    inputs = built.make_inputs(settings.text_tokens, 0)
    rows: dict[str, dict] = {}
    views: dict[str, torch.nn.Module] = {}
    for spec, compression in compressions.items():
        rows[spec] = {"method": spec, "spec": compression.spec()}
        started = time.perf_counter()
        try:
            views[spec] = method_view(model, compression)
        except ValueError as err:
            rows[spec]["refused"] = str(err)
            continue
        rows[spec]["set_compression_s"] = time.perf_counter() - started
    spliced: dict[str, Spliced] = {}
    element = torch.empty((), dtype=options.dtype).element_size()
    layers = built.llm.layers
    with torch.inference_mode():
        for spec, view in views.items():
            compression = compressions[spec]
            s = spliced[spec] = built.splice(view, inputs)
            text = s.seq_len - s.visual_tokens
            rows[spec].update(
                visual_tokens=s.visual_tokens, seq_len=s.seq_len, text_tokens=text,
                kv_cache_bytes=cache_bytes(built.prefill(view, s)),
                kv_cache_bytes_formula=kv_cache_bytes(s.seq_len, layers, built.llm.num_kv_heads, built.llm.head_dim, 1,
                                                      element),
                llm_flops=_method_flops(built, compression, text, s.visual_tokens, layers),
                llm_visual_schedule=_schedule(built, compression, s.visual_tokens, layers),
                llm_flops_full_depth=_method_flops(built, compression, text, s.visual_tokens, built.real_layers),
            )
        if "tower" in settings.stages and views:
            images = inputs.images
            calls = {spec: (lambda view=view: built.vision(view, images)) for spec, view in views.items()}
            for spec, m in measure_interleaved(calls, repeats=settings.repeats, warmup=settings.warmup,
                                               device=options.device, cpu_mode=settings.memory).items():
                rows[spec].update(tower_s=m.times, tower_peak_bytes=m.peak_bytes)
        if "prefill" in settings.stages and views:
            calls = {spec: (lambda view=view, s=spliced[spec]: built.prefill(view, s)) for spec, view in views.items()}
            for spec, m in measure_interleaved(calls, repeats=settings.repeats, warmup=settings.warmup,
                                               device=options.device, cpu_mode=settings.memory).items():
                rows[spec].update(prefill_s=m.times, prefill_peak_bytes=m.peak_bytes)
    _add_ratios(list(rows.values()))
    meta = {
        "family": family.key, "description": family.description, "tiny": family.tiny,
        "llm": dataclasses.asdict(built.llm), "llm_layers_run": built.llm.layers, "llm_layers_real": built.real_layers,
        "ffn": built.ffn, "towers": built.towers, "tower_layers_reduced": options.tower_layers is not None,
        "vocab_reduced": options.vocab is not None,
        "params_built": _parameter_count(model), "params_full": family.full_params(),
        "dtype": str(options.dtype).replace("torch.", ""), "text_tokens": settings.text_tokens,
        "repeats": settings.repeats, "warmup": settings.warmup, "threads": torch.get_num_threads(),
        "device": _device_name(options.device),
        "torch": torch.__version__, "commit": _commit(), "build_s": build_s,
        "load_average": [load_before, _load_average()],  # (1, 5, 15 min) before the build and after the last call
    }
    return {"meta": meta, "rows": list(rows.values())}


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _add_ratios(rows: list[dict]) -> None:
    """Each measured figure of a row over the vanilla row's (the row whose spec is "none"), if there is one."""
    vanilla = next((r for r in rows if r.get("spec") == "none" and "refused" not in r), None)
    if vanilla is None:
        return
    for row in rows:
        if "refused" in row:
            continue
        for key in ("visual_tokens", "kv_cache_bytes", "llm_flops_full_depth"):
            row[f"{key}_ratio"] = row[key] / vanilla[key]
        for key in ("tower_s", "prefill_s"):
            if key in row and key in vanilla:
                row[f"{key}_ratio"] = statistics.median(row[key]) / statistics.median(vanilla[key])


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def _commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----- output -------------------------------------------------------------------------------------
def _ms(times: list[float]) -> str:
    median = statistics.median(times) * 1e3
    if len(times) == 1:
        return f"{median:.0f}"
    return f"{median:.0f} ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f})"


def _load(meta: dict) -> str:
    load = meta.get("load_average")
    if not load or None in load:
        return ""
    return f", load average {'/'.join(map(str, load[0]))} -> {'/'.join(map(str, load[1]))}"


def _count(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"


def _ratio(row: dict, key: str) -> str:
    return f" ({row[key]:.2f}x)" if key in row else ""


def markdown_table(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    towers = "; ".join(meta["towers"])
    tower_note = ("towers REDUCED (--tower-layers): timings of the reduced towers" if meta["tower_layers_reduced"]
                  else "towers at full depth")
    vocab_note = f"; embedding tables cut to {meta['llm']['vocab']} rows (--vocab)" if meta["vocab_reduced"] else ""
    lines = [
        f"**{meta['family']}**: {meta['description']}. Random weights, {meta['dtype']}, {meta['device']}, "
        f"{meta['threads']} thread(s), commit {meta['commit']}{_load(meta)}. LLM: {meta['llm_layers_run']} of "
        f"{meta['llm_layers_real']} layers run (width {meta['llm']['hidden']}, FFN {meta['ffn']}); {towers} "
        f"({tower_note}){vocab_note}. Parameters built {_count(meta['params_built'])} of "
        f"{_count(meta['params_full'])}. One sample, {meta['text_tokens']} text tokens; median of "
        f"{meta['repeats']} timed calls after {meta['warmup']} warm-up (min-max), all methods alternated in one "
        f"process; tower = vision side up to the LLM's input tokens; prefill = the {meta['llm_layers_run']} LLM "
        f"layers, KV cache on; KV per sample at the layers run; FLOPs = the paper's LLM formula at the real depth.",
        "",
        "| method | visual tokens | tower ms | prefill ms | KV cache MiB / sample | LLM TFLOPs (real depth) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "refused" in row:
            lines.append(f"| `{row['method']}` | refused: {row['refused']} | | | | |")
            continue
        tower = _ms(row["tower_s"]) + _ratio(row, "tower_s_ratio") if "tower_s" in row else "-"
        prefill = _ms(row["prefill_s"]) + _ratio(row, "prefill_s_ratio") if "prefill_s" in row else "-"
        schedule = row.get("llm_visual_schedule")
        in_llm = f", {schedule[-1]} in the LLM's last layer" if schedule else ""
        lines.append(
            f"| `{row['method']}` | {row['visual_tokens']}{_ratio(row, 'visual_tokens_ratio')}{in_llm} | {tower} "
            f"| {prefill} "
            f"| {row['kv_cache_bytes'] / 2**20:.1f}{_ratio(row, 'kv_cache_bytes_ratio')} "
            f"| {row['llm_flops_full_depth'] / 1e12:.3f}{_ratio(row, 'llm_flops_full_depth_ratio')} |"
        )
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".families-", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.bench.families", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=list(FAMILIES))
    parser.add_argument("--layers", type=int, help="LLM layers to build (default: the real depth)")
    parser.add_argument("--tower-layers", type=int,
                        help="build every transformer tower with this many layers and each ConvNeXt stage with at most "
                             "this many blocks (CPU runs; labelled in the output). Default: full depth")
    parser.add_argument("--vocab", type=int,
                        help="embedding rows (default: the real vocabulary); on CPU in bfloat16 use a small one (e.g. "
                             "64): torch 2.13 copies the whole head for the last position's logits there")
    parser.add_argument("--methods", nargs="+", default=list(Settings.methods))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", help="also write the result (meta, rows with every timed call) here")
    parser.add_argument("--markdown", help="also write the table here")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    settings = Settings(methods=tuple(args.methods), repeats=args.repeats, warmup=args.warmup,
                        text_tokens=args.text_tokens)
    try:
        settings.check()
        if args.vocab is not None and args.vocab < 8:
            raise ValueError(f"--vocab must be >= 8, got {args.vocab}")
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
        options = BuildOptions(args.layers, args.tower_layers, args.vocab, DTYPES[args.dtype], args.device)
        result = run(args.family, options, settings)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    text = markdown_table(result)
    print(text)
    if args.json:
        _write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        _write_atomic(args.markdown, text)
    return result


if __name__ == "__main__":
    main()
