"""CogVLM (cogvlm-chat-v1.1) natively: a tiny checkpoint in the hub's remote-code layout, loaded through
``load_pretrained_model``, held to a re-enactment of the official forward (``llava.model.cogvlm.reference``),
with VisionZip / VisPruner on its EVA2-CLIP tower, batching, the KV cache and run_llava."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import visionzip
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.builder import load_pretrained_model
from llava.model.cogvlm import CogVLMForCausalLM, CogVLMProcessor, UnsupportedCompression
from llava.model.cogvlm import reference as ref
from llava.model.cogvlm.modeling import VISION_TOKEN_TYPE, cogvlm_position_ids, vision_expert_mask
from llava.model.cogvlm.tiny import build_tiny_cogvlm
from visionzip.llm import Selection
from visionzip.methods.pooling import reference_pooling
from visionzip.methods.random_tokens import reference_random

QUESTIONS = ["What is in the image?", "Describe the picture in a few words."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_cogvlm(str(tmp_path_factory.mktemp("cogvlm") / "tiny"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    tokenizer, model, image_processor, context_len = load_pretrained_model(checkpoint, None, None, device="cpu")
    return tokenizer, model, image_processor, context_len


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in ((100, 120, 3), (90, 70, 3))]


@pytest.fixture()
def model(loaded):
    model = loaded[1]
    yield model
    model.set_visual_compression(None)


def processor(loaded):
    tokenizer, model, image_processor, _ = loaded
    return model.build_processor(tokenizer, image_processor)


def test_checkpoint_has_the_remote_layout_and_loads_key_for_key(checkpoint, loaded):
    with safe_open(os.path.join(checkpoint, "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        boi = handle.get_tensor("model.vision.boi")
    for key in ("model.layers.0.self_attn.language_expert_query_key_value.weight",
                "model.layers.0.self_attn.vision_expert_query_key_value.weight",
                "model.layers.1.self_attn.vision_expert_dense.weight",
                "model.layers.0.self_attn.rotary_emb.inv_freq",
                "model.layers.0.mlp.language_mlp.gate_proj.weight", "model.layers.0.mlp.vision_mlp.down_proj.weight",
                "model.vision.linear_proj.linear_proj.weight", "model.vision.linear_proj.norm1.bias",
                "model.vision.linear_proj.dense_4h_to_h.weight", "model.vision.eoi",
                "model.vision.patch_embedding.cls_embedding", "model.vision.patch_embedding.position_embedding.weight",
                "model.vision.transformer.layers.2.attention.query_key_value.bias",
                "model.vision.transformer.layers.0.post_attention_layernorm.weight", "lm_head.weight"):
        assert key in keys, key
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    # as the hub's: no model_type (the remote config class declares none), known by its architecture
    assert "model_type" not in config and config["architectures"] == ["CogVLMForCausalLM"]
    model = loaded[1]
    assert isinstance(model, CogVLMForCausalLM)
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model.state_dict()["model.vision.boi"], boi)


def test_processor_builds_the_official_prompt_and_pixels(loaded, images):
    tokenizer, model, image_processor, _ = loaded
    inputs = processor(loaded)([QUESTIONS[0]], [images[0]])
    assert inputs.prompts == ["Question: What is in the image? Answer:"]
    ids, types, _ = ref.official_input_ids(tokenizer, model.config, QUESTIONS[0])
    image_span = types == VISION_TOKEN_TYPE
    expected = torch.cat([ids[:1], torch.tensor([IMAGE_TOKEN_INDEX]), ids[1:][~image_span[1:]]])
    assert inputs.input_ids[0].tolist() == expected.tolist()
    # Resize((S, S), BICUBIC) on the PIL image, ToTensor, Normalize(CLIP mean, std)
    side = model.config.vision_config["image_size"]
    resized = np.asarray(images[0].resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    expected_pixels = (resized - np.array(ref_mean())) / np.array(ref_std())
    torch.testing.assert_close(inputs.images[0], torch.from_numpy(expected_pixels.transpose(2, 0, 1)).float())
    with pytest.raises(ValueError, match="at most one image"):
        processor(loaded)([QUESTIONS[0]], [[images[0], images[1]]])


def ref_mean():
    return (0.48145466, 0.4578275, 0.40821073)


def ref_std():
    return (0.26862954, 0.26130258, 0.27577711)


def official_batch(loaded, question, pixels=None, vision_token_num=None):
    tokenizer, model, _, _ = loaded
    ids, types, mask = ref.official_input_ids(tokenizer, model.config, question, pixels is not None or vision_token_num is not None,
                                              vision_token_num=vision_token_num)
    return ids[None], types[None], mask[None]


@torch.no_grad()
def test_vanilla_logits_equal_the_official_forward(loaded, model, images):
    proc = processor(loaded)
    for question, image in ((QUESTIONS[0], images[0]), (QUESTIONS[1], images[1])):
        inputs = proc([question], [image])
        ours = model(**inputs.generate_kwargs(), use_cache=False).logits
        official = ref.official_logits(model, *official_batch(loaded, question, inputs.images), images=inputs.images)
        assert ours.shape == official.shape
        torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)
    # text only: no image span, every token through the language expert
    inputs = proc([QUESTIONS[0]])
    ours = model(**inputs.generate_kwargs(), use_cache=False).logits
    official = ref.official_logits(model, *official_batch(loaded, QUESTIONS[0]))
    torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)


def test_positions_and_expert_routing_follow_the_official_code():
    # bos, boi, 3 patches, eoi, 2 text tokens
    types = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0]])
    assert ref.build_position_ids(types).tolist() == [[0, 1, 2, 2, 2, 3, 4, 5]]
    assert cogvlm_position_ids(types).tolist() == ref.build_position_ids(types).tolist()
    assert vision_expert_mask(types).tolist() == ref.get_expert_mask(types)[0].tolist()
    assert vision_expert_mask(types)[0, 5].item() is False  # eoi takes the language expert
    # left padding: ours numbers from the first real token; the official batched numbering is one ahead
    padded = torch.tensor([[0, 0, 0, 1, 1, 1, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    unpadded = torch.tensor([[0, 1, 1, 1, 0]])
    assert cogvlm_position_ids(padded, mask)[0, 2:].tolist() == ref.build_position_ids(unpadded).tolist()[0]
    assert (ref.build_position_ids(padded, mask)[0, 2:] - cogvlm_position_ids(padded, mask)[0, 2:]).tolist() == [1] * 5


@torch.no_grad()
@pytest.mark.parametrize("spec", ["none", "visionzip:64", "vispruner:64", "pooling:16"])
def test_batch_of_two_equals_one_by_one(loaded, model, images, spec):
    model.set_visual_compression(spec)
    proc = processor(loaded)
    batch = proc(QUESTIONS, images)
    logits = model(**batch.generate_kwargs(), use_cache=False).logits
    tokens = model.generate(**batch.generate_kwargs(), max_new_tokens=4)
    for row, (question, image) in enumerate(zip(QUESTIONS, images)):
        single = proc([question], [image])
        alone = model(**single.generate_kwargs(), use_cache=False).logits[0]
        torch.testing.assert_close(logits[row, -alone.shape[0]:], alone, atol=1e-4, rtol=0)
        assert tokens[row].tolist() == model.generate(**single.generate_kwargs(), max_new_tokens=4)[0].tolist()


@torch.no_grad()
def test_cached_decoding_equals_the_official_forward_recomputed(loaded, model, images):
    inputs = processor(loaded)([QUESTIONS[0]], [images[0]])
    ours = model.generate(**inputs.generate_kwargs(), max_new_tokens=4)[0].tolist()
    ids, types, mask = official_batch(loaded, QUESTIONS[0], inputs.images)
    official = []
    for _ in range(4):
        token = int(ref.official_logits(model, ids, types, mask, images=inputs.images)[0, -1].argmax())
        official.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        types = torch.cat([types, torch.zeros(1, 1, dtype=torch.long)], dim=1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
    assert ours == official


def defined_tokens(settings, vision, pixels):
    """The method by its definition on the official tower's last layer, through the official adapter."""
    spec = settings.spec()
    if spec.startswith("vispruner:"):
        return ref.defined_vispruner(vision, pixels, settings.tokens, settings.important_ratio)
    if spec.startswith("visionzip:"):
        return ref.defined_visionzip(vision, pixels, settings.dominant, settings.contextual)
    hidden = ref.official_tower(vision, pixels)[0]
    if spec.startswith("pooling:"):
        return ref.official_adapter(vision, reference_pooling(hidden, settings.rows, settings.cols))
    return ref.official_adapter(vision, reference_random(hidden, settings.tokens, settings.seed)[0])


@torch.no_grad()
@pytest.mark.parametrize("spec", ["vispruner:64", "vispruner:tokens=20,important_ratio=0.3", "visionzip:64",
                                  "visionzip:dominant=12,contextual=4", "pooling:16", "random:tokens=30,seed=3"])
def test_compressed_image_equals_the_methods_definition_and_keeps_expert_routing(loaded, model, images, spec):
    model.set_visual_compression(spec)
    settings = model.visual_compression.settings
    inputs = processor(loaded)([QUESTIONS[0]], [images[0]])
    features = model.get_image_features(inputs.images).per_image[0]
    vision = model.model.vision
    expected = defined_tokens(settings, vision, inputs.images)
    kept = settings.tokens_per_view()
    assert features.shape[0] == kept + 2
    torch.testing.assert_close(features, expected[0], atol=1e-5, rtol=0)
    # the token types shrink with the kept tokens: boi + kept + eoi are image positions, boi and the kept
    # tokens go through the vision expert, eoi through the language expert
    spliced = model.splice(inputs.input_ids, inputs.attention_mask, inputs.images)
    assert int((spliced.token_type_ids == VISION_TOKEN_TYPE).sum()) == kept + 2
    assert int(vision_expert_mask(spliced.token_type_ids).sum()) == kept + 1
    # and the LLM treats them as the official forward treats an image span of that length
    ours = model(**inputs.generate_kwargs(), use_cache=False).logits
    official = ref.official_logits(model, *official_batch(loaded, QUESTIONS[0], vision_token_num=kept + 2),
                                   image_features=features[None])
    torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)


def test_compression_is_configured_and_saved_with_the_model(loaded, model, tmp_path):
    visionzip.apply_compression(model, "vispruner:64")
    assert model.config.visual_compression["method"] == "vispruner"
    model.save_pretrained(tmp_path / "saved")
    shutil.copy(os.path.join(loaded_path(loaded), "tokenizer.model"), tmp_path / "saved")
    _, again, _, _ = load_pretrained_model(str(tmp_path / "saved"), None, None, device="cpu")
    assert again.visual_compression == model.visual_compression
    assert again.visual_compression.spec() == "vispruner:tokens=64,important_ratio=0.5"


def loaded_path(loaded):
    return loaded[1].name_or_path


@pytest.mark.parametrize("spec,error,match", [
    ("fastv:tokens=200,layer=1", ValueError, "more than the 100 visual tokens"),
    ("tome:64", UnsupportedCompression, "inside the vision tower"),
    ("prumerge:32", UnsupportedCompression, "CLIP tower's own modules"),
    ("vispruner:200", ValueError, "200"),
    ("visionzip:dominant=100,contextual=10", ValueError, "exceeds the 101 tokens"),
])
def test_methods_that_cannot_run_are_refused_with_the_reason(model, spec, error, match):
    with pytest.raises(error, match=match):
        model.set_visual_compression(spec)
    assert not model.visual_compression.enabled


def test_run_llava_answers_with_and_without_compression(checkpoint, images, tmp_path):
    from llava.eval import run_llava

    path = str(tmp_path / "image.png")
    images[0].save(path)
    answers = {}
    for spec in ("none", "visionzip:64", "vispruner:64"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_llava.main(["--model-path", checkpoint, "--image-file", path, "--query", QUESTIONS[0],
                            "--compression", spec, "--device", "cpu", "--temperature", "0", "--max_new_tokens", "5"])
        answers[spec] = out.getvalue().strip()
        assert answers[spec]
    tokenizer, model, image_processor, _ = load_pretrained_model(checkpoint, None, None, device="cpu")
    inputs = model.build_processor(tokenizer, image_processor)([QUESTIONS[0]], [images[0]])
    with torch.no_grad():
        direct = model.generate(**inputs.generate_kwargs(), max_new_tokens=5)
    assert answers["none"] == tokenizer.batch_decode(direct, skip_special_tokens=True)[0].strip()
    assert isinstance(processor_of(model, tokenizer, image_processor), CogVLMProcessor)


def processor_of(model, tokenizer, image_processor):
    return model.build_processor(tokenizer, image_processor, "vicuna_v1")


def test_a_checkpoint_without_tokenizer_is_refused_naming_the_way_out(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(checkpoint, name), bare / name)
    with pytest.raises(ValueError, match="tokenizer_path"):
        load_pretrained_model(str(bare), None, None, device="cpu")
    _, model, _, _ = load_pretrained_model(str(bare), None, None, device="cpu", tokenizer_path=checkpoint)
    assert isinstance(model, CogVLMForCausalLM)


LLM_SPECS = ["fastv:64", "pdrop:16", "sparsevlm:64", "sparsevlm:layers=1,counts=30,recycle=false", "dart:32",
             "cdpruner:32", "divprune:32"]


class ReplayPruner:
    """Wraps a method's pruner: the first prefill records its selections, later ones replay them with every
    token after the recorded prompt kept (the decoded tokens), so a no-cache forward over prompt + answer
    sees the prefill's drops."""

    def __init__(self, inner):
        self.inner, self.layers = inner, inner.layers
        self.keep_original_positions = inner.keep_original_positions
        self.recorded = {}

    def score_layer(self, layer):
        return self.inner.score_layer(layer)

    def select(self, context):
        if context.layer not in self.recorded:
            self.recorded[context.layer] = self.inner.select(context)
            return self.recorded[context.layer]
        chosen = self.recorded[context.layer]
        keep = chosen.keep if isinstance(chosen, Selection) else chosen
        extra = torch.ones(keep.shape[0], context.valid_mask.shape[1] - keep.shape[1], dtype=torch.bool)
        keep = torch.cat([keep, extra], dim=1)
        return Selection(keep, chosen.extra, chosen.extra_valid, chosen.insert_after) if isinstance(chosen, Selection) else keep


@torch.no_grad()
@pytest.mark.parametrize("spec", LLM_SPECS)
def test_in_llm_methods_batch_and_cached_decoding_equal_their_replay(loaded, model, images, spec, monkeypatch):
    model.set_visual_compression(spec)
    proc = processor(loaded)
    batch = proc(QUESTIONS, images)
    tokens = model.generate(**batch.generate_kwargs(), max_new_tokens=4)
    single = proc([QUESTIONS[0]], [images[0]])
    assert tokens[0].tolist() == model.generate(**single.generate_kwargs(), max_new_tokens=4)[0].tolist()
    assert tokens[1].tolist() == model.generate(**proc([QUESTIONS[1]], [images[1]]).generate_kwargs(), max_new_tokens=4)[0].tolist()
    # cached decoding over per-layer caches of different lengths = a no-cache forward replaying the drops
    replay = ReplayPruner(model.llm_pruner())
    monkeypatch.setattr(model, "llm_pruner", lambda: replay)
    answer = model.generate(**single.generate_kwargs(), max_new_tokens=4)[0]
    ids = torch.cat([single.input_ids, answer[None, :-1]], dim=1)
    logits = model(input_ids=ids, images=single.images, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert logits[0, -4:].argmax(dim=-1).tolist() == answer.tolist()


@torch.no_grad()
def test_an_in_llm_method_keeping_every_token_equals_the_unpruned_model(loaded, model, images):
    inputs = processor(loaded)(QUESTIONS, images)
    vanilla = model(**inputs.generate_kwargs(), use_cache=False).logits
    model.set_visual_compression(f"fastv:tokens={model.config.num_patches},layer=1")
    kept_all = model(**inputs.generate_kwargs(), use_cache=False).logits
    torch.testing.assert_close(kept_all, vanilla, atol=1e-5, rtol=0)
    model.set_visual_compression("fastv:tokens=20,layer=2")
    pruned = model(**inputs.generate_kwargs(), use_cache=False).logits
    assert pruned.shape[1] == vanilla.shape[1] - (model.config.num_patches - 20)


@torch.no_grad()
@pytest.mark.parametrize("spec", ["none", "vispruner:64", "fastv:64"])
def test_a_batch_mixing_an_image_prompt_and_a_text_prompt_equals_one_by_one(loaded, model, images, spec):
    model.set_visual_compression(spec)
    proc = processor(loaded)
    tokens = model.generate(**proc(QUESTIONS, [images[0], []]).generate_kwargs(), max_new_tokens=4)
    assert tokens[0].tolist() == model.generate(**proc([QUESTIONS[0]], [images[0]]).generate_kwargs(), max_new_tokens=4)[0].tolist()
    assert tokens[1].tolist() == model.generate(**proc([QUESTIONS[1]]).generate_kwargs(), max_new_tokens=4)[0].tolist()
