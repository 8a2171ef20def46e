"""Every registered method on every Hugging Face family's tiny model: it runs, or it is refused by name
before any forward. Vision-side methods run with views x tokens_per_view placeholders (= features); in-LLM
methods (stage "llm") keep the model's own placeholder count and drop tokens inside the LLM
(``visionzip.decoder_loop``; held to our LLaVA stack and to the no-cache replay in
tests/test_hf_llm_methods.py). This is the table of docs/models.md ("Families x methods"); a method added
to the registry is placed here by its stage, or by a refusal of its own named below."""
from __future__ import annotations

import pytest
import torch
from test_hf_llm_methods import two_layer_spec

import visionzip
from llava.bench.hf_families import FAMILIES
from visionzip import CompressionConfig
from visionzip.methods import get_method, registered_methods

# Qwen2.5-VL: the methods see each image's merged tokens (no CLS position); the tower runs in one pass
QWEN_NO_CLS = "image 0 \\(64 merged tokens\\): {} ranks patches by CLS attention; Qwen2_5_VisionTransformerPretrainedModel has no CLS"
INTERNVL_NO_CLS = ("InternVLVisionModel has a CLS token, but the sequence InternViTUnits hands to the methods has no "
                   "CLS position")
# refusals by stage: a tower-stage method would act inside a tower whose output has no per-image grid left
TOWER_REFUSALS = {
    "qwen2_5_vl": "{} acts inside the vision tower \\(stage 'tower'\\); Qwen2.5-VL's tower runs all images as one "
                  "window-ordered sequence",
    "internvl": "{} acts inside the vision tower \\(stage 'tower'\\).* before the pixel shuffle",
}
# refusals of a method's own (its check names the reason)
OWN_REFUSALS = {
    "onevision": {"prumerge": "prumerge ranks patches by CLS attention; SiglipVisionModel has no CLS token",
                  "prumerge+": "prumerge\\+ ranks patches by CLS attention; SiglipVisionModel has no CLS token"},
    "qwen2_5_vl": {"prumerge": QWEN_NO_CLS.format("prumerge"), "prumerge+": QWEN_NO_CLS.format("prumerge\\+")},
    "internvl": {"prumerge": INTERNVL_NO_CLS, "prumerge+": INTERNVL_NO_CLS},
}
# per view: ToMe needs >= 21 on the 3-layer CLIP / SigLIP towers; InternVL tiles have 16 units
BUDGET = {"internvl": 4, "qwen2_5_vl": 16}


def expected(family: str, method: str) -> str | None:
    """None: the method runs on the family; else the refusal's message (a regex)."""
    stage = get_method(method).stage
    if stage == "tower" and family in TOWER_REFUSALS:
        return TOWER_REFUSALS[family].format(method.replace("+", "\\+"))
    return OWN_REFUSALS.get(family, {}).get(method)


EXPECTED = {family: {method: expected(family, method) for method in registered_methods()} for family in FAMILIES}


def spec_for(family: str, method: str) -> str:
    """``METHOD:budget`` per view; in-LLM methods on the tiny models' 2 LLM layers (test_hf_llm_methods)."""
    if get_method(method).stage == "llm":
        return two_layer_spec(method, BUDGET.get(family, 24))
    return f"{method}:{BUDGET.get(family, 24)}"


def test_the_matrix_covers_every_registered_method_and_family():
    assert sorted(FAMILIES) == sorted(OWN_REFUSALS.keys() | {"llava", "llava_next", "video_llava"})
    for family in EXPECTED.values():
        assert sorted(family) == registered_methods()
    in_llm = [m for m in registered_methods() if get_method(m).stage == "llm"]
    assert {"fastv", "pdrop", "sparsevlm"} <= set(in_llm)
    assert all(EXPECTED[family][m] is None for family in EXPECTED for m in in_llm)  # no refusal of ours


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_method_runs_with_its_count_or_is_refused_by_name(family):
    case = FAMILIES[family]
    vanilla = case.sample(None)
    for method, refusal in EXPECTED[family].items():
        spec = spec_for(family, method)
        if refusal is not None:
            with pytest.raises(ValueError, match=refusal):
                case.sample(spec)
            continue
        sample = case.sample(spec)
        settings = CompressionConfig.parse(spec).settings
        with torch.no_grad():
            logits = sample.model(**sample.inputs).logits
        assert torch.isfinite(logits).all(), spec
        if settings.stage == "llm":
            # the model's own placeholders; the LLM's output covers the tokens left after the drops
            assert sample.visual_tokens == vanilla.visual_tokens, spec
            assert logits.shape[1] < sample.inputs["input_ids"].shape[1], spec
        else:
            assert sample.visual_tokens == sample.views * settings.tokens_per_view(), spec
            assert logits.shape[1] == sample.inputs["input_ids"].shape[1], spec


@pytest.mark.parametrize("family", ["llava", "video_llava"])
def test_hf_features_are_the_methods_own_tokens_projected(family):
    """The HF path adds nothing to a method: its features are the projector applied to what the method
    returns on the same tower (``visionzip.compress``), per image / per frame, for every method that runs.
    The methods themselves are held to their official code or definition in tests/test_methods_vision.py
    and tests/test_visionzip_core.py."""
    case = FAMILIES[family]
    for method, refusal in EXPECTED[family].items():
        if refusal is not None or get_method(method).stage == "llm":  # in-LLM: the model's own features
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
