"""``python -m llava.convert``: the official fixtures' tiny LLaVA-1.5 / NeXT checkpoints converted to llava-hf
and run through transformers' own classes with our compression reproduce the official records; the
conversion round-trips; a projector-only checkpoint converts on its base.

As in tests/test_llava_parity.py: the records were made by the original builder, which loads every model
in float16 and then ran in float32 with float16-rounded RoPE tables (transformers 4.x computed them in
the creation dtype); we load the llava-hf folder in float16, cast to float32, and round the rotary
tables with a forward hook on this instance's rotary embedding. Towers run eager, as the official code
did (it asked for attention maps).
"""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_llava_parity import CASES, CROSS_MACHINE_TOLERANCE, fixture_images
from transformers import (
    CLIPImageProcessorPil,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

import visionzip
from llava.convert import to_hf, to_llava
from llava.convert.__main__ import main as convert_main
from llava.mm_utils import process_images

HF_CLASSES = {"llava-v1.5-tiny": LlavaForConditionalGeneration, "llava-v1.6-tiny": LlavaNextForConditionalGeneration}


@pytest.fixture(scope="module")
def checkpoints(official_checkpoints):
    """The module's copies of the fixtures (conftest: v1.5's mm_vision_tower made absolute) and their
    llava-hf conversions, v1.5 through the command line."""
    root = official_checkpoints
    convert_main(["to-hf", str(root / "llava-v1.5-tiny"), str(root / "hf-v1.5")])
    to_hf(str(root / "llava-v1.6-tiny"), str(root / "hf-v1.6"))
    return root


def round_rope_tables(module, args, output):
    cos, sin = output
    return cos.to(torch.float16).to(cos.dtype), sin.to(torch.float16).to(sin.dtype)


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    models = {}
    for name, folder in (("llava-v1.5-tiny", "hf-v1.5"), ("llava-v1.6-tiny", "hf-v1.6")):
        model = HF_CLASSES[name].from_pretrained(str(checkpoints / folder), dtype=torch.float16).float().eval()
        model.model.vision_tower.set_attn_implementation("eager")
        model.model.language_model.rotary_emb.register_forward_hook(round_rope_tables)
        original = json.loads((checkpoints / name / "config.json").read_text())
        models[name] = (model, SimpleNamespace(**original), original["vocab_size"])
    return models


@pytest.fixture(scope="module")
def records(official_dir):
    return torch.load(official_dir / "llava_outputs_seed0.pt", weights_only=True)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_hf_model_with_our_compression_matches_the_official_records(case, hf_models, records, checkpoints,
                                                                            reproduces_recorded_features):
    """1e-4 where this machine reproduces the recording machine's tower features; elsewhere a near-tie in
    the selection may resolve otherwise (tests/test_llava_parity.py holds our path to the official path
    re-enacted on such a machine), so the records are held to CROSS_MACHINE_TOLERANCE with equal tokens."""
    checkpoint, budget = CASES[case]
    model, original_config, vocab = hf_models[checkpoint]
    image_processor = CLIPImageProcessorPil.from_pretrained(str(checkpoints / "clip-vit-tiny-336"))
    visionzip.apply_compression(model, budget and f"visionzip:{budget}")  # CASES hold visionzip budgets
    try:
        for image, record in zip(fixture_images(), records[case]):
            pixels = process_images([image], image_processor, original_config)
            extra = {}
            if isinstance(model, LlavaNextForConditionalGeneration):
                pixels = pixels[0][None] if isinstance(pixels, list) else pixels
                extra["image_sizes"] = torch.tensor([[image.size[1], image.size[0]]])  # HF: (height, width)
            with torch.no_grad():  # one tower pass, shared by forward and generate (as generate() itself does)
                encoded = {"image": model.model.get_image_features(pixel_values=pixels, **extra)}
            count = encoded["image"].pooler_output[0].shape[0]
            ids = record["input_ids"][0].tolist()
            at = ids.index(-200)
            input_ids = torch.tensor([ids[:at] + [model.config.image_token_id] * count + ids[at + 1 :]])
            if input_ids.shape[1] > original_config.tokenizer_model_max_length:
                # the original cut this (uncompressed NeXT) sequence at tokenizer_model_max_length; transformers'
                # classes have no such cut, so this record is out of their reach
                assert record["seq_len"] == original_config.tokenizer_model_max_length and budget is None
                continue
            with torch.no_grad():
                logits = model(input_ids=input_ids, mm_encoder_outputs=dict(encoded)).logits
                generated = model.generate(
                    input_ids=input_ids, mm_encoder_outputs=dict(encoded), max_new_tokens=8, do_sample=False
                )
            assert logits.shape[1] == record["seq_len"]
            error = (logits[:, -32:, :vocab] - record["last_logits"]).abs().max().item()
            bound = 1e-4 if reproduces_recorded_features or budget is None else CROSS_MACHINE_TOLERANCE
            assert error < bound, f"{case} {image.size}: max |logit diff| {error:.2e}"
            assert generated[:, input_ids.shape[1] :].tolist() == record["generated"][:, 1:].tolist()
    finally:
        visionzip.apply_compression(model, "none")


def test_round_trip_gives_back_the_original_tensors(checkpoints, tmp_path):
    for name, folder in (("llava-v1.5-tiny", "hf-v1.5"), ("llava-v1.6-tiny", "hf-v1.6")):
        back = tmp_path / name
        to_llava(str(checkpoints / folder), str(back))
        original = load_file(str(checkpoints / name / "model.safetensors"))
        restored = load_file(str(back / "model.safetensors"))
        expected = {k: v for k, v in original.items() if not k.startswith("model.vision_tower.")}
        assert set(restored) == set(expected)
        for key, value in expected.items():
            assert torch.equal(restored[key], value), key
        tower = load_file(str(back / "vision-tower" / "model.safetensors"))
        clip = load_file(str(checkpoints / "clip-vit-tiny-336" / "model.safetensors"))
        assert {k: v.shape for k, v in tower.items()} == {k.removeprefix("vision_model."): v.shape for k, v in clip.items()}
        config = json.loads((back / "config.json").read_text())
        source = json.loads((checkpoints / name / "config.json").read_text())
        for key in ("model_type", "vocab_size", "mm_vision_select_layer", "mm_projector_type", "image_aspect_ratio", "hidden_size"):
            assert config[key] == source[key], key
        if source["image_aspect_ratio"] == "anyres":
            assert config["image_grid_pinpoints"] == source["image_grid_pinpoints"]
            hf_config = json.loads((checkpoints / folder / "config.json").read_text())
            assert hf_config["image_grid_pinpoints"] == [[h, w] for w, h in source["image_grid_pinpoints"]]


def test_projector_only_checkpoint_converts_on_its_base(checkpoints, tmp_path):
    base = checkpoints / "llava-v1.5-tiny"
    projector = {k: v + 1.0 for k, v in load_file(str(base / "model.safetensors")).items() if k.startswith("model.mm_projector.")}
    tuned = tmp_path / "projector"
    tuned.mkdir()
    save_file(projector, str(tuned / "mm_projector.safetensors"))
    shutil.copy(base / "config.json", tuned / "config.json")
    with pytest.raises(ValueError, match="pass model_base"):
        to_hf(str(tuned), str(tmp_path / "no-base"))
    to_hf(str(tuned), str(tmp_path / "hf"), model_base=str(base))
    converted = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(converted["model.multi_modal_projector.linear_1.weight"], projector["model.mm_projector.0.weight"])
    assert torch.equal(converted["model.multi_modal_projector.linear_2.bias"], projector["model.mm_projector.2.bias"])
    base_weights = load_file(str(base / "model.safetensors"))
    assert torch.equal(converted["model.language_model.norm.weight"], base_weights["model.norm.weight"])
    # the <image> row appended at id = vocab size, the mean of the others
    embed = converted["model.language_model.embed_tokens.weight"]
    assert embed.shape[0] == base_weights["model.embed_tokens.weight"].shape[0] + 1
    torch.testing.assert_close(embed[-1], base_weights["model.embed_tokens.weight"].mean(0))
    back = tmp_path / "back"
    to_llava(str(tmp_path / "hf"), str(back), projector_only=True)
    assert set(load_file(str(back / "mm_projector.safetensors"))) == set(projector)
