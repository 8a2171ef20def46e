"""The conversion itself (see the package docstring for the mapping)."""
from __future__ import annotations

import json
import os
import shutil

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from ..model.multimodal_encoder.builder import resolve_vision_tower_path
from ..output_folder import output_folder

IMAGE_TOKEN = "<image>"
TEXT_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral"}
# keys of an original LLaVA config.json that describe the multimodal part or training, not the LLM
LLAVA_ONLY_KEYS = (
    "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "use_mm_proj",
    "visual_compression", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
)
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
PROJECTOR = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
             "model.mm_projector.2.": "model.multi_modal_projector.linear_2."}
FULL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded with an index)."""
    for name in FULL_WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return _read_file(path)
        with open(path, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(_read_file(os.path.join(folder, shard)))
        return weights
    raise FileNotFoundError(f"no weights in {folder!r}: expected one of {FULL_WEIGHT_FILES}")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _tower_folder(config: dict, checkpoint: str) -> str:
    tower = resolve_vision_tower_path(config.get("mm_vision_tower") or config.get("vision_tower", ""), checkpoint)
    if not os.path.isfile(os.path.join(tower, "config.json")):
        raise FileNotFoundError(
            f"the vision tower {tower!r} named by {checkpoint}/config.json is not a local folder with a config.json "
            "(download it first, or point mm_vision_tower at it)"
        )
    return tower


def _transpose(pinpoints):
    return [[int(b), int(a)] for a, b in pinpoints]


def _text_config(config: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not an original LLaVA type; known: {sorted(TEXT_MODEL_TYPES)}")
    text = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in LLAVA_ONLY_KEYS}
    return CONFIG_MAPPING[TEXT_MODEL_TYPES[model_type]](**text)


def _check_projector(config: dict) -> None:
    kind = config.get("mm_projector_type", "linear")
    if kind != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {kind!r}: llava-hf has the mlp2x_gelu projector only")


HF_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


def _read_config(folder: str, command: str) -> dict:
    """A checkpoint folder's config.json, or a ValueError naming the folder (before anything is written)."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{command}: {folder!r} is not a checkpoint folder (it has no config.json)")
    return _read_json(config_file)


def read_original_config(src: str) -> dict:
    """The config of an original LLaVA checkpoint; a ValueError that says what ``src`` is otherwise (a
    llava-hf folder, a vision tower, another model), checked before the projector or any tensor."""
    config = _read_config(src, "to-hf")
    model_type = config.get("model_type")
    if model_type in TEXT_MODEL_TYPES:
        return config
    archs = config.get("architectures") or []
    if any(a in HF_ARCHITECTURES for a in archs):
        hint = "it is already a llava-hf folder (use to-llava to go back)"
    elif "vision" in str(model_type):
        hint = "it is a vision tower, not a LLaVA checkpoint"
    else:
        hint = "it is not an original LLaVA checkpoint"
    raise ValueError(
        f"to-hf: {src!r} has model_type {model_type!r} (architectures {archs}): {hint}; to-hf takes an original "
        f"LLaVA checkpoint with model_type in {sorted(TEXT_MODEL_TYPES)}"
    )


def to_hf(src: str, dst: str, model_base: str | None = None) -> str:
    """An original LLaVA checkpoint (full, or projector-only on ``model_base``) -> a llava-hf folder."""
    from transformers import AutoConfig, LlavaConfig, LlavaNextConfig

    config = read_original_config(src)
    _check_projector(config)
    projector_file = next((os.path.join(src, n) for n in PROJECTOR_FILES if os.path.isfile(os.path.join(src, n))), None)
    has_full = any(os.path.isfile(os.path.join(src, n)) for n in FULL_WEIGHT_FILES)
    if has_full and model_base is not None:
        raise ValueError(f"{src!r} holds full weights; model_base is only for projector-only checkpoints")
    if not has_full:
        if projector_file is None or model_base is None:
            raise ValueError(f"{src!r} has no full weights: pass model_base for its projector ({PROJECTOR_FILES})")
        weights = read_weights(model_base)
        weights.update({k: v for k, v in _read_file(projector_file).items()})
        tokenizer_dir = model_base
    else:
        weights = read_weights(src)
        tokenizer_dir = src
    tower_dir = _tower_folder(config, src)
    tower_config = AutoConfig.from_pretrained(tower_dir)
    tower_config = getattr(tower_config, "vision_config", tower_config)
    tower_weights = read_weights(tower_dir)

    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key.startswith("model.vision_tower."):
            continue  # the original loads the tower from mm_vision_tower, not from this copy
        for old, new in PROJECTOR.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            if key == "model.image_newline" or key == "lm_head.weight":
                out[key] = value
            elif key.startswith("model."):
                out["model.language_model." + key[len("model."):]] = value
            else:
                raise ValueError(f"unexpected tensor {key!r} in {src!r}")
    for key, value in tower_weights.items():
        key = key[len("vision_model."):] if key.startswith("vision_model.") else key
        out["model.vision_tower." + key] = value

    text_config = _text_config(config)
    image_token_id = int(text_config.vocab_size)
    embed = out["model.language_model.embed_tokens.weight"][:image_token_id]
    head = out["lm_head.weight"][:image_token_id]
    out["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    out["lm_head.weight"] = torch.cat([head, head.mean(0, keepdim=True)])
    text_config.vocab_size = image_token_id + 1

    common = dict(
        vision_config=tower_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")],
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    anyres = config.get("image_aspect_ratio") == "anyres"
    if anyres:
        if "model.image_newline" not in out and "unpad" in config.get("mm_patch_merge_type", ""):
            raise ValueError(f"{src!r} is spatial_unpad but has no model.image_newline")
        hf_config = LlavaNextConfig(image_grid_pinpoints=_transpose(config["image_grid_pinpoints"]), **common)
        hf_config.architectures = ["LlavaNextForConditionalGeneration"]
    else:
        out.pop("model.image_newline", None)
        hf_config = LlavaConfig(**common)
        hf_config.architectures = ["LlavaForConditionalGeneration"]
    if "visual_compression" in config:
        hf_config.visual_compression = config["visual_compression"]

    with output_folder(dst, "llava.convert to-hf", inputs=(src, model_base, tower_dir)) as staging:
        hf_config.save_pretrained(staging)
        save_torch_state_dict({k: v.contiguous() for k, v in out.items()}, str(staging))
        _write_processor(tokenizer_dir, tower_dir, str(staging), hf_config, tower_config, config, anyres)
        generation = os.path.join(tokenizer_dir, "generation_config.json")
        if os.path.isfile(generation):
            shutil.copy(generation, staging / "generation_config.json")
    return dst


# Chat templates for the converted processor, written from the conversation template the original LLaVA
# uses for the checkpoint (``llava.model.builder.default_conv_mode``): ``processor.apply_chat_template``
# then writes exactly the prompt ``llava.conversation`` writes (tests/test_convert_outputs.py holds them
# equal). A message's content is a string or a list of {"type": "image"} / {"type": "text", "text": ...}
# parts; an image part becomes "<image>\n" in front of the text, as the original's first turn.
_CONTENT = (
    "{%- macro content_of(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)
CHAT_TEMPLATES = {
    # SeparatorStyle.TWO: "SYSTEM USER: ... ASSISTANT: ...</s>USER: ... ASSISTANT:"
    "vicuna_v1": _CONTENT + (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{ content_of(messages[0]) + ' ' }}{%- set turns = messages[1:] -%}"
        "{%- else -%}{{ SYSTEM + ' ' }}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + content_of(message) + ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + content_of(message) + '</s>' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
    # SeparatorStyle.LLAMA_2 with sep "" and sep2 "</s>": "[INST] ... [/INST] ... </s>[INST] ... [/INST]"
    "mistral_instruct": _CONTENT + (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = content_of(messages[0]) -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first and system -%}{{ '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content_of(message) + ' [/INST]' }}"
        "{%- else -%}{{ '[INST] ' + content_of(message) + ' [/INST]' }}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' + content_of(message) + ' </s>' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
}


def chat_template_for(config: dict) -> str:
    """The Jinja chat template of an original checkpoint's conversation template."""
    from ..conversation import conv_templates
    from ..model.builder import default_conv_mode

    mode = default_conv_mode(config)
    if mode not in CHAT_TEMPLATES:
        raise ValueError(f"no chat template for the conversation template {mode!r}; known: {sorted(CHAT_TEMPLATES)}")
    system = conv_templates[mode].system.replace("\\", "\\\\").replace("'", "\\'")
    return "{%- set SYSTEM = '" + system + "' -%}" + CHAT_TEMPLATES[mode]


def _write_processor(tokenizer_dir: str, tower_dir: str, dst: str, hf_config, tower_config, config: dict,
                     anyres: bool) -> None:
    """What transformers' ``AutoProcessor`` needs to load the folder and write prompts as the original does:

    - the tokenizer with ``<image>`` added (at ``image_token_id``), BOS added in front as the original
      LLaVA's tokenizer does (``add_bos_token``), and a pad token (the original sets ``pad = unk``);
    - ``preprocessor_config.json``: the image processor (LLaVA: pad to square; NeXT: the crop grid);
    - ``processor_config.json``: patch size, feature strategy and the CLS token count, from which the
      processor computes the placeholder count per image;
    - ``chat_template.jinja``: the checkpoint's conversation template (``chat_template_for``).
    """
    from transformers import CLIPImageProcessorPil

    from ..model.tokenizer import TOKENIZER_CONFIG, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != hf_config.image_token_id:
        raise ValueError(
            f"the tokenizer put {IMAGE_TOKEN} at id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
            f"not at the model's image_token_id {hf_config.image_token_id}"
        )
    tokenizer.save_pretrained(dst)
    tokenizer_config_file = os.path.join(dst, TOKENIZER_CONFIG)
    tokenizer_config = _read_json(tokenizer_config_file)
    tokenizer_config.setdefault("add_bos_token", bool(getattr(tokenizer, "add_bos_token", True)))
    tokenizer_config.setdefault("add_eos_token", bool(getattr(tokenizer, "add_eos_token", False)))
    if not tokenizer_config.get("pad_token"):
        tokenizer_config["pad_token"] = tokenizer_config.get("unk_token") or "<unk>"
    with open(tokenizer_config_file, "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle, indent=2, sort_keys=True, ensure_ascii=False)
    clip = CLIPImageProcessorPil.from_pretrained(tower_dir)
    settings = dict(
        size=dict(clip.size), crop_size=dict(clip.crop_size), image_mean=list(clip.image_mean),
        image_std=list(clip.image_std), do_center_crop=clip.do_center_crop,
    )
    if anyres:
        processor = {"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": hf_config.image_grid_pinpoints}
    else:
        processor = {"image_processor_type": "LlavaImageProcessor", "do_pad": config.get("image_aspect_ratio") == "pad"}
    processor.update(settings)
    with open(os.path.join(dst, "preprocessor_config.json"), "w", encoding="utf-8") as handle:
        json.dump(processor, handle, indent=2)
    has_cls = getattr(tower_config, "model_type", "clip_vision_model") == "clip_vision_model"
    processor_config = {
        "processor_class": "LlavaNextProcessor" if anyres else "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": int(tower_config.patch_size),
        "vision_feature_select_strategy": hf_config.vision_feature_select_strategy,
        "num_additional_image_tokens": int(has_cls),
    }
    with open(os.path.join(dst, "processor_config.json"), "w", encoding="utf-8") as handle:
        json.dump(processor_config, handle, indent=2)
    with open(os.path.join(dst, "chat_template.jinja"), "w", encoding="utf-8") as handle:
        handle.write(chat_template_for(config))


def to_llava(src: str, dst: str, projector_only: bool = False, tower_name: str = "vision-tower") -> str:
    """A llava-hf folder -> an original LLaVA checkpoint (or its projector only)."""
    hf = _read_config(src, "to-llava")
    archs = hf.get("architectures") or []
    if not any(a in HF_ARCHITECTURES for a in archs):
        hint = " (it is an original LLaVA checkpoint: use to-hf)" if hf.get("model_type") in TEXT_MODEL_TYPES else ""
        raise ValueError(f"to-llava: {src!r} is not a llava-hf LLaVA / LLaVA-NeXT checkpoint (architectures {archs}){hint}")
    if hf.get("projector_hidden_act", "gelu") != "gelu" or isinstance(hf.get("vision_feature_layer"), list):
        raise ValueError("only the gelu projector and a single vision_feature_layer map to an original checkpoint")
    text = dict(hf["text_config"])
    text_type = text.pop("model_type")
    llava_type = {v: k for k, v in TEXT_MODEL_TYPES.items()}.get(text_type)
    if llava_type is None:
        raise ValueError(f"text model {text_type!r} has no original LLaVA class; known: {sorted(TEXT_MODEL_TYPES.values())}")
    weights = read_weights(src)
    image_token_id = int(hf.get("image_token_id", hf.get("image_token_index")))  # saved under either name
    vocab = int(text["vocab_size"])
    anyres = "LlavaNextForConditionalGeneration" in archs

    out, tower = {}, {}
    for key, value in weights.items():
        if key.startswith("model.vision_tower."):
            tower[key[len("model.vision_tower."):]] = value
        elif key.startswith("model.multi_modal_projector."):
            for old, new in PROJECTOR.items():
                if key.startswith(new):
                    out[old + key[len(new):]] = value
        elif key.startswith("model.language_model."):
            out["model." + key[len("model.language_model."):]] = value
        elif key in ("lm_head.weight", "model.image_newline"):
            out[key] = value
        else:
            raise ValueError(f"unexpected tensor {key!r} in {src!r}")
    if image_token_id == vocab - 1:  # the row to-hf appended: the original has no <image> token
        vocab -= 1
        out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"][:vocab].clone()
        out["lm_head.weight"] = out["lm_head.weight"][:vocab].clone()
    text["vocab_size"] = vocab
    config = {k: v for k, v in text.items() if k not in ("architectures", "dtype", "torch_dtype", "transformers_version")}
    config.update(
        architectures=["LlavaMistralForCausalLM" if llava_type == "llava_mistral" else "LlavaLlamaForCausalLM"],
        model_type=llava_type,
        mm_vision_tower=tower_name,
        mm_hidden_size=int(hf["vision_config"]["hidden_size"]),
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=int(hf.get("vision_feature_layer", -2)),
        mm_vision_select_feature={v: k for k, v in SELECT_FEATURE.items()}[hf.get("vision_feature_select_strategy", "default")],
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="spatial_unpad" if anyres else "flat",
        image_aspect_ratio="anyres" if anyres else "pad",
    )
    if anyres:
        config["image_grid_pinpoints"] = _transpose(hf["image_grid_pinpoints"])
    if hf.get("visual_compression"):
        config["visual_compression"] = hf["visual_compression"]
    # a projector-only folder and a full checkpoint are different artifacts: neither is written over the other
    command = "llava.convert to-llava --projector-only" if projector_only else "llava.convert to-llava"
    with output_folder(dst, command, inputs=(src,)) as staging:
        with open(staging / "config.json", "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        if projector_only:
            projector = {k: v.contiguous() for k, v in out.items() if k.startswith("model.mm_projector.")}
            from safetensors.torch import save_file

            save_file(projector, str(staging / "mm_projector.safetensors"))
            return dst
        save_torch_state_dict({k: v.contiguous() for k, v in out.items()}, str(staging))
        _write_tower(src, str(staging), tower_name, hf["vision_config"], tower)
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                     "generation_config.json"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), staging / name)
        _drop_image_token(str(staging))
    return dst


def _write_tower(src: str, dst: str, tower_name: str, vision_config: dict, weights: dict) -> None:
    from transformers import CLIPImageProcessorPil

    folder = os.path.join(dst, tower_name)
    os.makedirs(folder, exist_ok=True)
    model_type = vision_config.get("model_type", "clip_vision_model")
    architecture = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel"}.get(model_type)
    if architecture is None:
        raise ValueError(f"vision tower {model_type!r}: only CLIP and SigLIP towers map to an original checkpoint")
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump({**vision_config, "architectures": [architecture]}, handle, indent=2)
    save_torch_state_dict({k: v.contiguous() for k, v in weights.items()}, folder)
    hf_processor = _read_json(os.path.join(src, "preprocessor_config.json")) if os.path.isfile(
        os.path.join(src, "preprocessor_config.json")) else {}
    keys = ("size", "crop_size", "image_mean", "image_std", "do_center_crop")
    CLIPImageProcessorPil(**{k: hf_processor[k] for k in keys if k in hf_processor}).save_pretrained(folder)


def _drop_image_token(dst: str) -> None:
    """The original tokenizer has no ``<image>`` token (it splices at id -200)."""
    config_file = os.path.join(dst, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return
    config = _read_json(config_file)
    decoder = config.get("added_tokens_decoder") or {}
    config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v.get("content") != IMAGE_TOKEN}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, list):
        key = "extra_special_tokens" if "extra_special_tokens" in config else "additional_special_tokens"
        config[key] = [t for t in extra if t != IMAGE_TOKEN]
    with open(config_file, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
