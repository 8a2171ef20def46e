"""A deterministic tiny LLaVA checkpoint, built locally in about a second: the embedded default model.

``build_tiny_llava(output_dir, version="v1.5" | "v1.6", seed=0)`` writes a complete checkpoint in the
original LLaVA format (random weights, so its answers are gibberish; the shapes and code paths are real):

- ``clip-vit-tiny-336/``: a CLIP vision tower in the real ViT-L/14-336 geometry (336 px, patch 14,
  24 layers, 577 tokens) with a small width, plus its image-processor config; referenced relatively by
  ``mm_vision_tower`` ("clip-vit-tiny-336", resolved inside the checkpoint folder);
- ``tokenizer.model``: a SentencePiece BPE model trained on a small embedded corpus (no download);
- ``config.json`` (``llava_llama``, the ``mm_*`` keys; v1.6 = anyres + spatial_unpad + image_newline)
  and ``model.safetensors`` with the released checkpoints' parameter names (tower copy included).

A folder that already holds the same build (same version, seed and sizes) is reused as is.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from io import BytesIO

import torch
from safetensors.torch import save_file
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

TOWER_DIR = "clip-vit-tiny-336"
STAMP = "tiny_llava_build.json"
BUILD_FORMAT = 1
VISION_LAYERS = 24  # ViT-L/14-336's depth
IMAGE_SIZE = 336  # ViT-L/14-336's input: 24 x 24 patches of 14 px
# not in a build's stamp when they have these values (the stamps of default builds stay what they were)
DEFAULT_GEOMETRY = {"vision_layers": VISION_LAYERS, "image_size": IMAGE_SIZE}
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Text the tokenizer is trained on: the prompt templates and the kind of questions and answers the
# demos use, so that prompts tokenize into sensible pieces.
CORPUS = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is in the picture? Describe it. ASSISTANT: The picture shows a red square in the top left corner on a noisy background.
USER: What color is the car? ASSISTANT: The car is red.
USER: How many people are in the image? ASSISTANT: There are two people in the image.
USER: Is there a dog in the image? Answer the question using a single word or phrase. ASSISTANT: Yes.
USER: What is the man holding? ASSISTANT: The man is holding an umbrella.
USER: Where was this photo taken? ASSISTANT: This photo was taken in a kitchen.
USER: Describe the image in detail. ASSISTANT: A cat is sitting on a wooden table next to a window, looking outside at the garden.
USER: What is written on the sign? ASSISTANT: The sign says stop.
USER: What is the weather like? ASSISTANT: It is sunny with a few clouds in the blue sky.
USER: Which animal is larger? ASSISTANT: The elephant is larger than the horse.
Answer with the option's letter from the given choices directly. A. red B. green C. blue D. yellow
Please answer yes or no. Is the object on the left side of the table?
Provide a one-sentence caption for the provided image. A group of children playing football in a park.
The image shows a street with buses, cars, bicycles and pedestrians near a tall building.
A plate of food with rice, vegetables and a piece of chicken on a white table.
Two zebras standing in the grass under a tree, with mountains in the distance.
A train on the tracks at a station, people waiting on the platform.
What is the number on the jersey? The number is 23. How much does it cost? It costs 5 dollars.
You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.
Answer the questions. The visual content will be provided with the following format: <Image>visual content</Image>.
"""


def _stamp(version: str, seed: int, sizes: dict, extra_corpus: str = "") -> dict:
    stamp = {"format": BUILD_FORMAT, "version": version, "seed": seed,
             **{k: v for k, v in sizes.items() if DEFAULT_GEOMETRY.get(k) != v}}
    if extra_corpus:  # only then, so that the stamps of default builds stay what they were
        stamp["extra_corpus_sha256"] = hashlib.sha256(extra_corpus.encode()).hexdigest()
    return stamp


def _train_tokenizer(directory: str, vocab_size: int, extra_corpus: str = "") -> int:
    """Train the SentencePiece model into ``directory/tokenizer.model``; returns its vocabulary size."""
    import sentencepiece as spm

    model = BytesIO()
    lines = [line for line in (CORPUS + extra_corpus).splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    with open(os.path.join(directory, "tokenizer.model"), "wb") as handle:
        handle.write(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return processor.get_piece_size()


def _tower_config(sizes: dict) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=sizes["vision_hidden"],
        intermediate_size=2 * sizes["vision_hidden"],
        num_hidden_layers=sizes.get("vision_layers", VISION_LAYERS),
        num_attention_heads=4,
        image_size=sizes.get("image_size", IMAGE_SIZE),
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",
    )


def _llava_config(version: str, vocab_size: int, sizes: dict):
    from llava.model import LlavaConfig

    next_style = version == "v1.6"
    return LlavaConfig(
        vocab_size=vocab_size,
        hidden_size=sizes["hidden"],
        intermediate_size=2 * sizes["hidden"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower=TOWER_DIR,
        mm_hidden_size=sizes["vision_hidden"],
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="spatial_unpad" if next_style else "flat",
        image_aspect_ratio="anyres" if next_style else "pad",
        image_grid_pinpoints=GRID_PINPOINTS if next_style else None,
        tokenizer_padding_side="right",
        tokenizer_model_max_length=2048,
        use_mm_proj=True,
    )


def _write(directory: str, version: str, seed: int, sizes: dict, extra_corpus: str = "") -> None:
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.tokenizer import LlavaLlamaTokenizer

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        tower_dir = os.path.join(directory, TOWER_DIR)
        tower = CLIPVisionModel(_tower_config(sizes)).eval()
        tower.save_pretrained(tower_dir)
        side = sizes.get("image_size", IMAGE_SIZE)
        CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ).save_pretrained(tower_dir)

        vocab_size = _train_tokenizer(directory, sizes["vocab"], extra_corpus)
        tokenizer = LlavaLlamaTokenizer(vocab_file=os.path.join(directory, "tokenizer.model"))
        tokenizer.save_pretrained(directory)

        config = _llava_config(version, vocab_size, sizes)
        config.mm_vision_tower = tower_dir  # absolute while building, relative in the saved config
        torch.manual_seed(seed + 1)
        model = LlavaLlamaForCausalLM(config).eval()
        model.get_model().get_vision_tower().load_model()
        config.mm_vision_tower = TOWER_DIR
        config.save_pretrained(directory)
        model.generation_config.save_pretrained(directory)
        # the released checkpoints' names: transformers 4.x nested CLIP's modules under `.vision_model`
        tower_prefix = "model.vision_tower.vision_tower."
        state = {
            (tower_prefix + "vision_model." + k[len(tower_prefix) :] if k.startswith(tower_prefix) else k): v
            for k, v in model.state_dict().items()
            if not k.endswith("position_ids")
        }
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"),
                  metadata={"format": "pt"})
    finally:
        torch.random.set_rng_state(generator_state)


def build_tiny_llava(
    output_dir: str,
    version: str = "v1.5",
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    vision_hidden: int = 64,
    vocab: int = 512,
    extra_corpus: str = "",
    vision_layers: int = VISION_LAYERS,
    image_size: int = IMAGE_SIZE,
) -> str:
    """Write the tiny checkpoint to ``output_dir`` (or reuse the same build there); returns the path.

    version: "v1.5" (pad, flat) or "v1.6" (anyres, spatial_unpad, image_newline). Deterministic in
    ``seed``; the global torch RNG state is left as it was. A folder holding something else is refused.
    vision_layers: the tower's depth (24 as ViT-L; the toy model uses a shallower one: the token geometry,
    576 patches + CLS, is what the methods depend on). image_size: the tower's input (336: 24 x 24
    patches; the toy task's CI test uses a smaller geometry).
    extra_corpus: more lines for the tokenizer's training text (a task's own words then become whole
    pieces: the toy task's colour names, ``llava.toy``).
    """
    if version not in ("v1.5", "v1.6"):
        raise ValueError(f"version must be 'v1.5' or 'v1.6', got {version!r}")
    sizes = {"hidden": hidden, "layers": layers, "vision_hidden": vision_hidden, "vocab": vocab,
             "vision_layers": vision_layers, "image_size": image_size}
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if image_size % 14:
        raise ValueError(f"image_size must be a multiple of the 14 px patch, got {image_size}")
    if version == "v1.6" and image_size != IMAGE_SIZE:
        raise ValueError(f"the v1.6 build's grid pinpoints are for {IMAGE_SIZE} px views; got image_size {image_size}")
    if vision_layers < 2:
        raise ValueError(f"vision_layers must be >= 2 (LLaVA reads the features of layer -2), got {vision_layers}")
    if hidden % 4 or vision_hidden % 4:
        raise ValueError(f"hidden ({hidden}) and vision_hidden ({vision_hidden}) must be multiples of the 4 heads")
    stamp = _stamp(version, seed, sizes, extra_corpus)
    return write_stamped_build(output_dir, STAMP, stamp, "LLaVA",
                               lambda staging: _write(staging, version, seed, sizes, extra_corpus))


def write_stamped_build(output_dir: str, stamp_name: str, stamp: dict, what: str, write) -> str:
    """Build a tiny checkpoint folder once, atomically: ``write(staging)`` fills a temporary sibling that is
    renamed to ``output_dir`` with ``stamp`` in ``stamp_name``. The same stamp already there: nothing is
    done; another stamp, or a folder this did not write: a ValueError, nothing touched. Returns the folder.
    Shared by the tiny builders of every family (LLaVA, Mini-Gemini, CogVLM)."""
    output_dir = os.path.abspath(output_dir)
    stamp_file = os.path.join(output_dir, stamp_name)
    if os.path.isfile(stamp_file):
        with open(stamp_file, encoding="utf-8") as handle:
            existing = json.load(handle)
        if existing == stamp:
            return output_dir
        raise ValueError(f"{output_dir} holds another tiny build ({existing}); asked for a tiny {what} build {stamp}")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ValueError(f"{output_dir} exists and is not a tiny {what} build: refusing to write into it")

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".tiny-{what.lower()}-", dir=parent)
    try:
        write(staging)
        with open(os.path.join(staging, stamp_name), "w", encoding="utf-8") as handle:
            json.dump(stamp, handle, indent=2)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (checked above)
        try:
            os.replace(staging, output_dir)
        except OSError:
            # another process finished the same build first: keep theirs if it is the same build
            if not os.path.isfile(stamp_file):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
