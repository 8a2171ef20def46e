"""Command-line arguments of ``python -m llava.train.train``: LLaVA's three dataclasses plus compression.

The names and meanings follow the original LLaVA training script, so its launch scripts keep working.
Arguments that describe the multimodal wiring (``vision_tower``, ``mm_projector_type``, ...) default to
``None`` here and are resolved against the checkpoint being trained (see ``resolve_multimodal_settings``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import transformers

from llava.compression_args import compression_from_flags
from visionzip import CompressionConfig
from visionzip.budgets import family_of

BAD_SAMPLE_POLICIES = ("skip", "error")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "LLaVA checkpoint (efficient tuning) or base LLM (full fine-tuning)."}
    )
    # [VisionZip-LLaVA] default "v1" (vicuna_v1), the template of every LLaVA-1.5 recipe; the original's
    # default "v0" is a LLaVA-1.0 template this codebase does not ship.
    version: str = field(default="v1", metadata={"help": "conversation template (llava.conversation)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the language model"})
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "train only mm_projector (stage 1 / VisionZip efficient tuning)"}
    )
    # [VisionZip-LLaVA] the multimodal settings below default to None = "take the checkpoint's value" (then
    # LLaVA-1.5's); the original's fixed defaults (linear projector, layer -1, ...) silently rewrote the
    # config of a LLaVA checkpoint whose projector is mlp2x_gelu.
    vision_tower: str | None = field(default=None, metadata={"help": "vision tower (CLIP) path or hub name"})
    mm_vision_select_layer: int | None = field(default=None)
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "stage-1 mm_projector.bin to start from"}
    )
    mm_projector_type: str | None = field(default=None, metadata={"help": "linear, mlp2x_gelu, identity"})
    mm_use_im_start_end: bool | None = field(default=None)
    mm_use_im_patch_token: bool | None = field(default=None)
    mm_patch_merge_type: str | None = field(default=None, metadata={"help": "flat, spatial, spatial_unpad"})
    mm_vision_select_feature: str | None = field(default=None, metadata={"help": "patch or cls_patch"})


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "LLaVA conversation data: a JSON list (llava_v1_5_mix665k.json) or JSONL"}
    )
    # Accepted for compatibility with the original scripts; the dataset is always lazy.
    lazy_preprocess: bool = True
    is_multimodal: bool = False
    image_folder: str | None = field(default=None, metadata={"help": "root the samples' 'image' paths are under"})
    image_aspect_ratio: str | None = field(
        default=None, metadata={"help": "pad, square or anyres (default: the checkpoint's, else square)"}
    )
    check_image_files: bool = field(
        default=True, metadata={"help": "check before training that every referenced image file exists"}
    )
    check_image_decode: str = field(
        default="auto",
        metadata={"help": "decode every image before the model loads: yes, no, or auto (yes up to 2000 images)"},
    )


@dataclass
class CompressionArguments:
    """Visual-token compression applied in the training forward (the model's ``visual_compression``)."""

    compression: str = field(
        default="none",
        metadata={"help": "none | METHOD (with --visual_tokens) | METHOD:TOKENS | METHOD:key=value,... "
                          "(any registered method, e.g. visionzip:64, fastv:tokens=64,layer=2)"},
    )
    # the aliases below parse into the same spec as --compression (llava.compression_args.compression_from_flags)
    dominant: int | None = field(
        default=None, metadata={"help": "alias: with --compression visionzip, its dominant tokens per image/crop"}
    )
    contextual: int | None = field(
        default=None, metadata={"help": "alias: with --compression visionzip, its contextual tokens per image/crop"}
    )
    visual_tokens: int | None = field(
        default=None,
        metadata={
            "help": "alias: with --compression METHOD, the paper's budget: tokens per image for LLaVA-1.5 "
            "(192/128/64), the total over the views of a LLaVA-NeXT anyres image (640/320/160)"
        },
    )
    important_ratio: float | None = field(
        default=None, metadata={"help": "alias: with --compression vispruner, its share of important tokens"}
    )
    anyres_layout: str = field(default="official", metadata={"help": "official or spatial (LLaVA-NeXT only)"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False)
    mpt_attn_impl: str | None = field(default="triton")
    # [VisionZip-LLaVA] default 2048 (every LLaVA-1.5 recipe's value); the original's 512 is shorter than
    # one uncompressed image (576 tokens), which leaves no reply to learn.
    model_max_length: int = field(
        default=2048, metadata={"help": "maximum sequence length; sequences are right-padded (and truncated)"}
    )
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: quantise the quantisation statistics"})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA: fp4 or nf4"})
    bits: int = field(default=16, metadata={"help": "4 or 8 loads the LLM quantised (QLoRA); 16 = no quantisation"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = ""
    lora_bias: str = "none"
    mm_projector_lr: float | None = None
    group_by_modality_length: bool = field(default=False)
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa, eager or flash_attention_2 (default: transformers' choice)"}
    )
    # transformers 5 dropped this flag; the training script implements it (see llava.train.output_dir).
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in an output directory that holds a finished run"}
    )
    bad_sample_policy: str = field(
        default="skip",
        metadata={"help": "skip: replace a sample with no learnable tokens (counted, reported); error: stop"},
    )
    check_tokenization: bool = field(
        default=True,
        metadata={"help": "compare each sample's piecewise tokenization with the whole prompt's (mismatches reported)"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.bad_sample_policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"bad_sample_policy must be one of {BAD_SAMPLE_POLICIES}, got {self.bad_sample_policy!r}"
            )
        if self.bits not in (4, 8, 16, 32):
            raise ValueError(f"bits must be 4, 8, 16 or 32, got {self.bits}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora_bias must be none, all or lora_only, got {self.lora_bias!r}")
        if self.model_max_length < 2:
            raise ValueError(f"model_max_length must be >= 2, got {self.model_max_length}")


def build_compression_config(args: CompressionArguments, image_aspect_ratio: str | None) -> CompressionConfig:
    """The ``CompressionConfig`` the command line asks for; a ValueError names any inconsistent value.

    ``--compression SPEC`` (``METHOD:TOKENS`` per image/view, ``METHOD:key=value,...``) gives everything.
    The aliases (``llava.compression_args``): ``--compression METHOD`` with a paper budget ``--visual_tokens``
    (per image for LLaVA-1.5, over the views of a LLaVA-NeXT anyres image: ``visionzip.budgets``) and/or the
    method's settings ``--dominant/--contextual/--important_ratio``.
    """
    spec = args.compression.strip()
    settings = {"dominant": args.dominant, "contextual": args.contextual, "important_ratio": args.important_ratio}
    family = family_of(image_aspect_ratio)
    if ":" in spec or "," in spec:
        return compression_from_flags(
            spec, budget=args.visual_tokens, settings=settings, family=family, anyres_layout=args.anyres_layout
        ).compression
    return compression_from_flags(
        method=spec, budget=args.visual_tokens, settings=settings, family=family, anyres_layout=args.anyres_layout
    ).compression
