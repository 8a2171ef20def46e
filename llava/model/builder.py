"""Load a LLaVA checkpoint of any kind: ``load_pretrained_model`` -> (tokenizer, model, image_processor,
context_len), as in the original LLaVA.

The kind of checkpoint is read from its files, never from its folder name:

- "lora":      ``adapter_config.json`` (peft) + ``config.json`` (+ ``non_lora_trainables.bin``), on ``model_base``;
- "projector": ``mm_projector.bin`` / ``mm_projector.safetensors`` + ``config.json``, no full weights, on
               ``model_base``;
- "llava":     full weights whose config has the LLaVA keys (``model_type`` llava_llama or ``mm_vision_tower``);
- "language_model": full weights of a plain causal LM (no vision: ``image_processor`` is None);
- "native":    full weights of a family implemented here natively that is not a LLaVA fork (its ``model_type``
               is a key of ``NATIVE_FAMILIES``: the hub's remote-code checkpoints, loaded without their code).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, BitsAndBytesConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import is_flash_attn_2_available

from visionzip import CompressionConfig

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .language_model.llava_mistral import CONV_MODE as MISTRAL_CONV_MODE
from .language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from .language_model.mgm_llama import MGMConfig, MGMLlamaForCausalLM
from .llava_arch import load_weights_file
from .multimodal_encoder.builder import resolve_vision_tower_path
from .tokenizer import load_tokenizer

FULL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PROJECTOR_WEIGHTS = ("mm_projector.safetensors", "mm_projector.bin")
NON_LORA_WEIGHTS = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
# model_type of an original LLaVA checkpoint -> (config class, model class)
LLAVA_CLASSES = {
    "llava_llama": (LlavaConfig, LlavaLlamaForCausalLM),
    "llava_mistral": (LlavaMistralConfig, LlavaMistralForCausalLM),
    "mgm": (MGMConfig, MGMLlamaForCausalLM),  # Mini-Gemini (LLaVA fork, second HR tower): docs/mgm.md
}
LLAVA_MODEL_TYPES = tuple(LLAVA_CLASSES)
# model_type of a natively implemented family that is not a LLaVA fork -> "module:function" of its loader,
# imported only when such a checkpoint is loaded. The loader is called as
# ``fn(info: CheckpointInfo, load_kwargs: dict, torch_dtype, compression)`` and returns what
# ``load_pretrained_model`` returns: ``(tokenizer, model, image_processor, context_len)``.
NATIVE_FAMILIES: dict[str, str] = {
    "cogvlm": "llava.model.cogvlm.loader:load",  # CogVLM (THUDM/cogvlm-chat-hf remote-code layout): docs/cogvlm.md
    "qwen": "llava.model.qwen_vl.loader:load",  # Qwen-VL(-Chat) (Qwen/Qwen-VL-Chat remote-code layout): docs/qwen_vl.md
}
# architectures of remote-code checkpoints whose config.json has no model_type (their config class declares
# none: THUDM/cogvlm-chat-hf) -> their key in NATIVE_FAMILIES
NATIVE_ARCHITECTURES: dict[str, str] = {"CogVLMForCausalLM": "cogvlm"}


@dataclass
class CheckpointInfo:
    kind: str  # "lora" | "projector" | "llava" | "language_model" | "native"
    path: str
    config: dict


def _first_existing(path: str, names) -> str | None:
    for name in names:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def local_checkpoint_dir(model_path: str) -> str:
    """A local folder for ``model_path``: itself, or the hub snapshot (from the cache when offline)."""
    if os.path.isdir(model_path):
        return model_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_path)
    except Exception as err:  # huggingface_hub raises several unrelated error types here
        raise ValueError(f"{model_path!r} is neither a local folder nor a hub repository available here: {err}") from err


def inspect_checkpoint(model_path: str) -> CheckpointInfo:
    """Tell what a checkpoint folder holds from its files (see the module docstring)."""
    path = local_checkpoint_dir(model_path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"cannot tell what {model_path!r} holds: it has no config.json")
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    model_type = config.get("model_type") or next(
        (NATIVE_ARCHITECTURES[a] for a in config.get("architectures") or () if a in NATIVE_ARCHITECTURES), None
    )
    if model_type in NATIVE_FAMILIES:
        config["model_type"] = model_type
    is_llava = model_type in LLAVA_MODEL_TYPES or bool(config.get("mm_vision_tower"))
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        kind = "lora"
    elif _first_existing(path, FULL_WEIGHTS):
        if model_type in NATIVE_FAMILIES:
            kind = "native"
        elif is_llava:
            if model_type not in LLAVA_MODEL_TYPES:
                raise ValueError(
                    f"{model_path!r} is a LLaVA checkpoint with model_type {model_type!r}; supported: {LLAVA_MODEL_TYPES}"
                )
            kind = "llava"
        elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            kind = "language_model"
        elif model_type in CONFIG_MAPPING:
            # e.g. the CLIP tower folder given as --model-path: refused here, not deep inside loading
            raise ValueError(
                f"{model_path!r} holds a {model_type!r} model, which is neither a LLaVA checkpoint nor a language "
                "model: pass the LLaVA checkpoint folder (its config.json names the vision tower in mm_vision_tower)"
            )
        else:
            raise ValueError(f"cannot tell what {model_path!r} holds: unknown model_type {model_type!r}")
    elif _first_existing(path, PROJECTOR_WEIGHTS):
        kind = "projector"
    else:
        raise ValueError(
            f"cannot tell what {model_path!r} holds: no model weights ({', '.join(FULL_WEIGHTS)}), "
            f"no projector ({', '.join(PROJECTOR_WEIGHTS)}) and no adapter_config.json (LoRA)"
        )
    if kind in ("lora", "projector") and not is_llava:
        raise ValueError(f"{model_path!r} holds a {kind} checkpoint but its config.json has no mm_vision_tower")
    return CheckpointInfo(kind, path, config)


# model_type of an original LLaVA checkpoint -> the conversation template its LLM was tuned with;
# others (llava_llama: LLaVA-1.5, LLaVA-NeXT on Vicuna) use DEFAULT_CONV_MODE
CONV_MODES = {"llava_mistral": MISTRAL_CONV_MODE}
DEFAULT_CONV_MODE = "vicuna_v1"


def default_conv_mode(model_or_config) -> str:
    """The conversation template for a checkpoint when ``--conv-mode`` is not given, from its
    ``model_type`` (never from its folder name): ``mistral_instruct`` for ``llava_mistral``
    (llava-v1.6-mistral-7b), ``vicuna_v1`` otherwise. ``model_or_config``: a loaded model, its config, a
    ``config.json`` dict, or a local checkpoint folder."""
    if isinstance(model_or_config, (str, os.PathLike)):
        config_file = os.path.join(model_or_config, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"cannot pick a conversation template for {str(model_or_config)!r}: it has no config.json")
        with open(config_file, encoding="utf-8") as handle:
            model_or_config = json.load(handle)
    if isinstance(model_or_config, dict):
        model_type = model_or_config.get("model_type")
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    return CONV_MODES.get(model_type, DEFAULT_CONV_MODE)


def default_attn_implementation(device: str, dtype: torch.dtype) -> str:
    """FlashAttention-2 where it is installed and usable (CUDA, half precision), else SDPA."""
    if str(device).startswith("cuda") and dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def _llava_config(path: str) -> LlavaConfig:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    config = LLAVA_CLASSES.get(model_type, LLAVA_CLASSES["llava_llama"])[0].from_pretrained(path)
    config.mm_vision_tower = resolve_vision_tower_path(config.mm_vision_tower, path)
    return config


def _resize_vocab(model, vocab_size: int) -> None:
    if model.get_input_embeddings().weight.shape[0] != vocab_size:
        model.resize_token_embeddings(vocab_size)


def _strip_prefixes(weights: dict) -> dict:
    """``non_lora_trainables`` keys as saved from a peft model (``base_model.model.model.x``) -> ``model.x``."""
    out = {}
    for key, value in weights.items():
        key = key[len("base_model.") :] if key.startswith("base_model.") else key
        out[key] = value
    if any(k.startswith("model.model.") for k in out):
        out = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in out.items()}
    return out


def load_pretrained_model(
    model_path: str,
    model_base: str | None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map="auto",
    device: str = "cuda",
    torch_dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    compression: CompressionConfig | dict | str | None = None,
    load_dtype: torch.dtype | None = None,
    **kwargs,
):
    """Load a LLaVA checkpoint -> ``(tokenizer, model, image_processor, context_len)``.

    model_path: the checkpoint (any kind, see the module docstring); model_base: the base language model
    for LoRA and projector-only checkpoints. model_name: kept for the original signature (logs only; the
    checkpoint kind comes from its files). device: "cuda", "cpu", ...; device_map: as in transformers
    ("auto" only on CUDA). torch_dtype: None = float16 on CUDA, float32 elsewhere. load_8bit / load_4bit:
    bitsandbytes (int8 / nf4 with double quantisation). attn_implementation: None = flash_attention_2 when
    installed and usable, else sdpa. compression: a ``CompressionConfig`` (or dict / spec string) set on
    the model, overriding what its config.json says; None keeps the checkpoint's own setting.
    load_dtype: load (round) the weights in this dtype before casting them to ``torch_dtype``: the original
    builder always loads float16, so ``load_dtype=torch.float16, torch_dtype=torch.float32`` reproduces the
    original LLaVA run in float32 (``model.float()`` after its builder), float16 RoPE tables included.
    """
    del model_name  # [VisionZip-LLaVA] the original dispatched on it ("llava" in the name); we read the files
    device = str(device)
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if load_8bit and load_4bit:
        raise ValueError("choose one of load_8bit and load_4bit")
    info = inspect_checkpoint(model_path)
    if info.kind in ("lora", "projector") and model_base is None:
        raise ValueError(f"{model_path!r} is a {info.kind} checkpoint: pass model_base (the language model it was trained on)")
    if info.kind in ("llava", "language_model", "native") and model_base is not None:
        raise ValueError(
            f"{model_path!r} holds full weights; model_base ({model_base!r}) is only for LoRA or projector-only checkpoints"
        )

    weights_dtype = load_dtype or torch_dtype
    load_kwargs = dict(kwargs)
    load_kwargs["device_map"] = device_map if device.startswith("cuda") else {"": device}
    load_kwargs["attn_implementation"] = attn_implementation or default_attn_implementation(device, weights_dtype)
    load_kwargs["dtype"] = weights_dtype
    if load_8bit:
        load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif load_4bit:
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        )

    if info.kind == "native":
        import importlib

        module, function = NATIVE_FAMILIES[info.config["model_type"]].split(":")
        return getattr(importlib.import_module(module), function)(info, load_kwargs, torch_dtype, compression)

    if info.kind == "language_model":
        if compression is not None and CompressionConfig.from_dict(
            CompressionConfig.parse(compression) if isinstance(compression, str) else compression
        ).enabled:
            raise ValueError(f"{model_path!r} is a language model without a vision tower: nothing to compress")
        tokenizer = load_tokenizer(info.path)
        model = AutoModelForCausalLM.from_pretrained(info.path, **load_kwargs)
        return tokenizer, _finish(model, torch_dtype, weights_dtype, load_8bit or load_4bit), None, _context_len(model)

    if info.kind == "llava":
        tokenizer = load_tokenizer(info.path)
        config = _llava_config(info.path)
        model = LLAVA_CLASSES[config.model_type][1].from_pretrained(info.path, config=config, **load_kwargs)
    elif info.kind == "projector":
        base = local_checkpoint_dir(model_base)
        tokenizer = load_tokenizer(base)
        config = _llava_config(info.path)
        model = LLAVA_CLASSES[config.model_type][1].from_pretrained(base, config=config, **load_kwargs)
        projector = load_weights_file(_first_existing(info.path, PROJECTOR_WEIGHTS))
        _load_partial(model, projector, "projector")
    else:
        model, tokenizer = _load_lora(info, model_base, load_kwargs)

    _add_image_tokens(model, tokenizer)
    model = _finish(model, torch_dtype, weights_dtype, load_8bit or load_4bit)
    if compression is not None:
        model.set_visual_compression(compression)
    image_processor = model.get_vision_tower().image_processor
    return tokenizer, model, image_processor, _context_len(model)


def _load_partial(model, weights: dict, what: str) -> None:
    """Load a subset of the parameters (projector, non-LoRA trainables): every key must be known."""
    target = model.state_dict()
    unknown = sorted(k for k in weights if k not in target)
    if unknown:
        raise ValueError(f"the {what} weights have keys this model does not: {unknown[:5]}")
    weights = {k: v.to(dtype=target[k].dtype) if target[k].is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=False)


def _load_lora(info: CheckpointInfo, model_base: str, load_kwargs: dict):
    from peft import PeftModel

    base = local_checkpoint_dir(model_base)
    tokenizer = load_tokenizer(base)
    config = _llava_config(info.path)
    with open(os.path.join(base, "config.json"), encoding="utf-8") as handle:
        base_vocab = json.load(handle).get("vocab_size", config.vocab_size)
    trained_vocab = config.vocab_size
    config.vocab_size = base_vocab
    model = LLAVA_CLASSES[config.model_type][1].from_pretrained(base, config=config, **load_kwargs)
    _resize_vocab(model, trained_vocab)
    non_lora = _first_existing(info.path, NON_LORA_WEIGHTS)
    if non_lora:
        _load_partial(model, _strip_prefixes(load_weights_file(non_lora)), "non-LoRA")
    model = PeftModel.from_pretrained(model, info.path)
    model = model.merge_and_unload()
    return model, tokenizer


def _add_image_tokens(model, tokenizer) -> None:
    """The image patch / start / end tokens the checkpoint was trained with, as in the original."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN

    added = 0
    if getattr(model.config, "mm_use_im_patch_token", False):
        added += tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        added += tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    if added and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def _finish(model, torch_dtype: torch.dtype, weights_dtype: torch.dtype, quantized: bool):
    """Cast a model loaded in ``weights_dtype`` to ``torch_dtype`` (emulating the original's float16
    load, RoPE tables included), and put it in eval mode."""
    if weights_dtype != torch_dtype and not quantized:
        model = model.to(dtype=torch_dtype)
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        if rotary is not None and hasattr(rotary, "table_dtype"):
            rotary.table_dtype = weights_dtype
    return model.eval()


def _context_len(model) -> int:
    return int(getattr(model.config, "max_sequence_length", 2048))
