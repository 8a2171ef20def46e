"""Every registered method on every Hugging Face family's tiny model: it runs with views x tokens_per_view
placeholders (= features), or it is refused by name before any forward. This is the table of
docs/models.md ("Families x methods"); a method added to the registry must be placed here."""
from __future__ import annotations

import pytest
import torch

import visionzip
from llava.bench.hf_families import FAMILIES
from visionzip import CompressionConfig
from visionzip.methods import registered_methods

IN_LLM = "acts inside the language model \\(stage 'llm'\\); the Hugging Face adapters take vision-side methods"
CLIP_LIKE = {"visionzip": None, "vispruner": None, "tome": None, "prumerge": None, "prumerge+": None, "random": None,
             "pooling": None}
# Qwen2.5-VL: the methods see each image's merged tokens (no CLS position); the tower runs in one pass
QWEN_NO_CLS = "image 0 \\(64 merged tokens\\): {} ranks patches by CLS attention; Qwen2_5_VisionTransformerPretrainedModel has no CLS"
# family -> method -> None (runs) or the refusal's message (a regex); in-LLM methods: IN_LLM everywhere
EXPECTED = {
    "llava": CLIP_LIKE,
    "llava_next": CLIP_LIKE,
    "video_llava": CLIP_LIKE,
    "onevision": {**CLIP_LIKE, "prumerge": "prumerge ranks patches by CLS attention; SiglipVisionModel has no CLS token",
                  "prumerge+": "prumerge\\+ ranks patches by CLS attention; SiglipVisionModel has no CLS token"},
    "qwen2_5_vl": {
        "visionzip": None, "vispruner": None, "random": None, "pooling": None,
        "tome": "tome acts inside the vision tower \\(stage 'tower'\\); Qwen2.5-VL's tower runs all images as one "
                "window-ordered sequence",
        "prumerge": QWEN_NO_CLS.format("prumerge"), "prumerge+": QWEN_NO_CLS.format("prumerge\\+"),
    },
    "internvl": {
        "visionzip": None, "vispruner": None, "random": None, "pooling": None,
        "tome": "tome acts inside the vision tower \\(stage 'tower'\\).* before the pixel shuffle",
        # the tower has a CLS token; the unit sequence the methods compress has no CLS position
        "prumerge": "InternVLVisionModel has a CLS token, but the sequence InternViTUnits hands to the methods has no "
                    "CLS position",
        "prumerge+": "InternVLVisionModel has a CLS token, but the sequence InternViTUnits hands to the methods has no "
                     "CLS position",
    },
}
# per view: ToMe needs >= 21 on the 3-layer CLIP / SigLIP towers; InternVL tiles have 16 units
BUDGET = {"internvl": 4, "qwen2_5_vl": 16}


def test_the_matrix_covers_every_registered_method():
    in_llm = [m for m in registered_methods() if CompressionConfig.parse(f"{m}:64").settings.stage == "llm"]
    assert sorted(in_llm) == ["fastv", "pdrop", "sparsevlm"]
    for family in EXPECTED.values():
        assert sorted(family) == sorted(m for m in registered_methods() if m not in in_llm)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_each_method_runs_with_its_count_or_is_refused_by_name(family):
    case = FAMILIES[family]
    for method, refusal in EXPECTED[family].items():
        spec = f"{method}:{BUDGET.get(family, 24)}"
        if refusal is not None:
            with pytest.raises(ValueError, match=refusal):
                case.sample(spec)
            continue
        sample = case.sample(spec)
        per_view = CompressionConfig.parse(spec).settings.tokens_per_view()
        assert sample.visual_tokens == sample.views * per_view, spec
        with torch.no_grad():
            logits = sample.model(**sample.inputs).logits
        assert logits.shape[1] == sample.inputs["input_ids"].shape[1] and torch.isfinite(logits).all(), spec
    for spec in ("fastv:16", "pdrop:16", "sparsevlm:64"):
        with pytest.raises(ValueError, match=IN_LLM):
            case.sample(spec)


@pytest.mark.parametrize("family", ["llava", "video_llava"])
def test_hf_features_are_the_methods_own_tokens_projected(family):
    """The HF path adds nothing to a method: its features are the projector applied to what the method
    returns on the same tower (``visionzip.compress``), per image / per frame, for every method that runs.
    The methods themselves are held to their official code or definition in tests/test_methods_vision.py
    and tests/test_visionzip_core.py."""
    case = FAMILIES[family]
    for method, refusal in EXPECTED[family].items():
        if refusal is not None:
            continue
        spec = f"{method}:{BUDGET.get(family, 24)}"
        sample = case.sample(spec)
        inner = sample.model.model
        with torch.no_grad():
            if family == "llava":
                pixels = sample.inputs["pixel_values"]
                features = torch.stack(list(inner.get_image_features(pixel_values=pixels).pooler_output))
                tower = inner.vision_tower
            else:
                pixels = sample.inputs["pixel_values_videos"].flatten(0, 1)
                features = inner.get_video_features(pixel_values_videos=sample.inputs["pixel_values_videos"]).pooler_output
                tower = inner.video_tower
            direct = visionzip.compress(tower, pixels, CompressionConfig.parse(spec), select_layer=-2)
            expected = inner.multi_modal_projector(direct.tokens)
        torch.testing.assert_close(features.reshape(expected.shape), expected, msg=spec)
