"""Parity of our LLaVA stack with the original LLaVA + official VisionZip (fixture records).

The fixture README describes the three images, the prompt and the seven cases. The records were made by
the original builder, which loads every model in float16, and then run in float32: we load the same way
(``load_dtype=torch.float16, torch_dtype=torch.float32``), which also rounds the RoPE tables as
transformers 4.x did (see ``LlavaRotaryEmbedding``). ``generated`` in the records starts with the BOS
token that transformers 4.37 put in front of tokens generated from embeddings; ours are the new tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from visionzip import CompressedTokens, register_method
from visionzip.methods.base import unregister_method
from visionzip.methods.visionzip import VisionZip
from visionzip.reference import official_visionzip

# Where this machine's float32 kernels do not reproduce the recording machine's tower features (an AVX-512
# x86 CPU here, by about 2e-5 on the tiny tower's layer -2 features), VisionZip's top-k and argmax can
# resolve a near-tie the other way than on the recording machine: a different token then moves the last
# logits by up to ~1e-2 while sequence length and greedy tokens stay the same. The records are then checked
# at this bound, and our path is held to the original tolerance against the official path re-enacted on
# this machine (OfficialVisionZipHere), which is what the records would be here.
CROSS_MACHINE_TOLERANCE = 5e-2


@dataclass
class OfficialVisionZipHere(VisionZip):
    """The official VisionZip code path (eager tower with every attention map, dense one-hot merge;
    ``visionzip.reference.official_visionzip``) as a method, so that LLaVA runs it in place of ours."""

    name: ClassVar[str] = "official-visionzip-here"

    def encode(self, adapter, pixel_values, select_layer=-2, early_exit=True) -> CompressedTokens:
        with torch.no_grad():
            tokens, keep = official_visionzip(adapter.model, pixel_values, self.dominant, self.contextual, select_layer)
        return CompressedTokens(tokens, keep.sort(dim=1).values, adapter.has_cls, cls_kept=True)


@pytest.fixture(scope="module", autouse=True)
def official_here():
    register_method(OfficialVisionZipHere)
    yield
    unregister_method(OfficialVisionZipHere.name)



CASES = {
    "v15_vanilla": ("llava-v1.5-tiny", None),
    "v15_visionzip_54_10": ("llava-v1.5-tiny", "54,10"),
    "v15_visionzip_108_20": ("llava-v1.5-tiny", "108,20"),
    "v15_visionzip_162_30": ("llava-v1.5-tiny", "162,30"),
    "v16_vanilla": ("llava-v1.6-tiny", None),
    "v16_visionzip_27_5": ("llava-v1.6-tiny", "27,5"),
    "v16_visionzip_54_10": ("llava-v1.6-tiny", "54,10"),
}
QUESTION = "<image>\nWhat is in the picture? Describe it."


def fixture_images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    images = []
    for w, h in [(500, 375), (336, 336), (300, 640)]:
        a = (rng.random((h, w, 3)) * 255).astype("uint8")
        a[: h // 3, : w // 2] = [200, 30, 30]
        images.append(Image.fromarray(a))
    return images


@pytest.fixture(scope="module")
def records(official_dir):
    return torch.load(official_dir / "llava_outputs_seed0.pt", weights_only=True)


@pytest.fixture(scope="module")
def checkpoints(official_checkpoints):
    """The module's copy of the two checkpoints (conftest: v1.5's tower absolute, v1.6's relative)."""
    return official_checkpoints


@pytest.fixture(scope="module")
def models(checkpoints):
    loaded = {}
    for name in ("llava-v1.5-tiny", "llava-v1.6-tiny"):
        loaded[name] = load_pretrained_model(
            str(checkpoints / name), None, name, device="cpu",
            torch_dtype=torch.float32, load_dtype=torch.float16,
        )
    return loaded


def test_relative_vision_tower_resolves_beside_the_checkpoint(models, checkpoints):
    _, model, _, _ = models["llava-v1.6-tiny"]
    assert model.get_vision_tower().vision_tower_name == str(checkpoints / "clip-vit-tiny-336")
    assert json.loads((checkpoints / "llava-v1.6-tiny" / "config.json").read_text())["mm_vision_tower"] == "clip-vit-tiny-336"


def test_prompts_and_input_ids_match_the_records(models, records):
    tokenizer = models["llava-v1.5-tiny"][0]
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    for case in records.values():
        for record in case:
            assert record["prompt"] == prompt
            assert tokenizer_image_token(prompt, tokenizer, return_tensors="pt").tolist() == record["input_ids"][0].tolist()


def run_case(model, input_ids, pixels, image, full_path: bool):
    with torch.no_grad():
        if full_path:
            logits = model(input_ids=input_ids, images=pixels, image_sizes=[image.size]).logits
            # the official run cut the NeXT prompt (2463 positions) at tokenizer_model_max_length 2048; we
            # refuse that unless asked to reproduce it (issue 22: one prompt-length policy)
            generated = model.generate(
                input_ids, images=pixels, image_sizes=[image.size], max_new_tokens=8, do_sample=False,
                prompt_too_long="truncate",
            )
        else:
            embeds = model.splice_multimodal(input_ids, pixels, [image.size]).inputs_embeds
            logits = model(inputs_embeds=embeds).logits
            generated = model.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)
    return logits, generated


def check_case(case, models, records, tolerance, full_path: bool, exact_machine: bool = True) -> None:
    """seq_len equal, last 32 logits within ``tolerance``, greedy ids equal. ``full_path``: through
    ``forward(images=...)`` and ``generate(ids, images=...)``; else one splice shared by both (one tower pass).
    ``exact_machine`` False: the records within ``CROSS_MACHINE_TOLERANCE`` and our logits within
    ``tolerance`` of the official path re-enacted on this machine (see the module's note)."""
    checkpoint, budget = CASES[case]
    tokenizer, model, image_processor, _ = models[checkpoint]
    try:
        for image, record in zip(fixture_images(), records[case]):
            input_ids = record["input_ids"]
            assert image.size == tuple(record["image_size"])
            pixels = process_images([image], image_processor, model.config)
            model.set_visual_compression(budget and f"visionzip:{budget}")
            logits, generated = run_case(model, input_ids, pixels, image, full_path)
            assert logits.shape[1] == record["seq_len"]
            error = (logits[:, -32:] - record["last_logits"]).abs().max().item()
            bound = tolerance if exact_machine or budget is None else CROSS_MACHINE_TOLERANCE
            assert error < bound, f"{case} {image.size}: max |logit diff| {error:.2e}"
            assert record["generated"][0, 0].item() == tokenizer.bos_token_id
            assert generated.tolist() == record["generated"][:, 1:].tolist()
            if not exact_machine and budget is not None:
                model.set_visual_compression(f"{OfficialVisionZipHere.name}:{budget}")
                official_logits, official_generated = run_case(model, input_ids, pixels, image, full_path)
                here = (logits[:, -32:] - official_logits[:, -32:]).abs().max().item()
                assert here < tolerance, f"{case} {image.size}: max |logit diff| to the official path here {here:.2e}"
                assert generated.tolist() == official_generated.tolist()
    finally:
        model.set_visual_compression(None)


@pytest.fixture
def eager_towers(models):
    """The official code ran the tower with eager attention (it asked for attention maps)."""
    towers = [m.get_vision_tower().vision_tower for _, m, _, _ in models.values()]
    for tower in towers:
        tower.set_attn_implementation("eager")
    yield
    for tower in towers:
        tower.set_attn_implementation("sdpa")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_official_outputs_with_eager_towers(case, models, records, eager_towers,
                                                   reproduces_recorded_features):
    """The acceptance check. Towers in eager attention, as the official run had them, through
    forward(images=...) and generate(ids, images=...): we agree to ~1e-5 (bound 1e-4, 10x tighter than
    the issue's 1e-3)."""
    check_case(case, models, records, tolerance=1e-4, full_path=True, exact_machine=reproduces_recorded_features)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_official_outputs_with_sdpa_towers(case, models, records, reproduces_recorded_features):
    """Our default (SDPA towers), one splice shared by forward and generate: the same tokens and
    sequence. SDPA's last-bit differences from eager attention can flip exact near-ties in VisionZip's
    contextual merge on the black padding of NeXT crops (identical padding tokens), which moved the logits
    by up to 9.4e-4 on the recorded seed; the bound leaves room for other seeds."""
    check_case(case, models, records, tolerance=5e-3, full_path=False, exact_machine=reproduces_recorded_features)


def test_exact_float32_load_differs_only_by_the_original_float16_rounding(models, checkpoints, records):
    """Loading the float32 weights as they are (our default on CPU) gives the same sequence and nearly the
    same logits: the gap to the records is the original's float16 load, not a different computation."""
    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(checkpoints / "llava-v1.5-tiny"), None, None, device="cpu"
    )
    assert model.get_model().rotary_emb.table_dtype is None
    image, record = fixture_images()[1], records["v15_vanilla"][1]
    with torch.no_grad():
        logits = model(input_ids=record["input_ids"], images=process_images([image], image_processor, model.config)).logits
    error = (logits[:, -32:] - record["last_logits"]).abs().max().item()
    assert logits.shape[1] == record["seq_len"]
    assert 1e-3 < error < 0.1
