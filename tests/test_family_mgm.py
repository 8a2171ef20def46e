"""Mini-Gemini (MGM) on our LLaVA stack: a tiny checkpoint in MGM's original layout loads with
``load_pretrained_model``; vanilla logits equal the re-enacted official forward (``llava.model.mgm.reference``);
every registered method runs on it, batch 2 equal to one by one; run_llava answers; what is refused is
refused by name."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import visionzip
from visionzip.methods import get_method, registered_methods

QUESTIONS = ["What is in the picture?", "Describe the image in detail."]
VISION_METHODS = [m for m in registered_methods() if get_method(m).stage != "llm"]
LLM_METHODS = [m for m in registered_methods() if get_method(m).stage == "llm"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from llava.model.mgm.tiny import build_tiny_mgm

    return build_tiny_mgm(str(tmp_path_factory.mktemp("mgm") / "mgm-tiny"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(checkpoint, None, device="cpu")
    return tokenizer, model, image_processor


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in ((300, 400), (420, 260))]


@pytest.fixture(scope="module")
def processor(loaded):
    from llava.processor import LlavaProcessor

    tokenizer, model, image_processor = loaded
    return LlavaProcessor.from_model(model, tokenizer, image_processor)  # left padding (generation)


@pytest.fixture(scope="module")
def batch(processor, images):
    return processor(QUESTIONS, images)


@pytest.fixture(scope="module")
def image_file(images, tmp_path_factory):
    path = tmp_path_factory.mktemp("mgm-image") / "image.png"
    images[0].save(path)
    return path


@pytest.fixture
def model(loaded):
    model = loaded[1]
    yield model
    model.set_visual_compression(None)


def test_checkpoint_is_in_mgms_layout_and_loads(checkpoint, loaded):
    from llava.model.builder import default_conv_mode
    from llava.model.language_model.mgm_llama import MGMLlamaForCausalLM

    config = json.load(open(f"{checkpoint}/config.json"))
    assert config["model_type"] == "mgm" and config["architectures"] == ["MGMLlamaForCausalLM"]
    assert config["image_size_aux"] == 768 and config["mm_hidden_size_aux"] == 48
    weight_map = json.load(open(f"{checkpoint}/model.safetensors.index.json"))["weight_map"]
    for key in ("model.vlm_uni_query_projector.1.weight", "model.vlm_uni_aux_projector.0.weight",
                "model.vlm_uni_val_projector.1.bias", "model.mm_projector.2.weight",
                "model.vision_tower_aux.vision_stem.0.weight", "model.vision_tower_aux.vision_stages.2.blocks.1.gamma",
                "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"):
        assert key in weight_map
    openclip = torch.load(f"{checkpoint}/openclip-convnext-tiny/open_clip_pytorch_model.bin", weights_only=True)
    assert "visual.trunk.stages.1.downsample.1.weight" in openclip
    _, model, image_processor = loaded
    assert isinstance(model, MGMLlamaForCausalLM) and default_conv_mode(model) == "vicuna_v1"
    # the HR tower comes from the OpenCLIP folder, and equals the checkpoint's copy of it
    shard = load_file(f"{checkpoint}/model-00001-of-00001.safetensors")
    for key, value in model.get_vision_tower_aux().state_dict().items():
        assert torch.equal(value, shard["model.vision_tower_aux." + key]), key
        assert torch.equal(value, openclip["visual.trunk." + key[len("vision_"):]]), key
    # the image processor makes MGM's input: the HR image
    assert image_processor.crop_size["height"] == 768


def test_vanilla_logits_equal_the_official_forward(loaded, images):
    from llava.model.mgm.images import lr_from_hr
    from llava.model.mgm.reference import official_logits
    from llava.processor import LlavaProcessor

    tokenizer, model, image_processor = loaded
    # the official forward pads as the config says (right); batch of two prompts of different lengths
    inputs = LlavaProcessor.from_model(model, tokenizer, image_processor, padding_side="right")(QUESTIONS, images)
    assert inputs.images.shape == (2, 3, 768, 768)
    with torch.no_grad():
        ours = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, images=inputs.images).logits
        official = official_logits(model, inputs.input_ids, inputs.attention_mask, inputs.images)
        # MGM's own call: images (LR) with images_aux (HR)
        lr = lr_from_hr(inputs.images, 336)
        mgm_call = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, images=lr,
                         images_aux=inputs.images).logits
    assert ours.shape == official.shape == (2, inputs.input_ids.shape[1] + 575, model.config.vocab_size)
    for row in range(2):
        valid = int(inputs.attention_mask[row].sum()) + 575
        torch.testing.assert_close(ours[row, :valid], official[row, :valid], atol=1e-4, rtol=0)
        torch.testing.assert_close(mgm_call[row, :valid], official[row, :valid], atol=1e-4, rtol=0)


def test_the_hr_path_and_mining_matter(model, batch):
    """The HR image reaches the tokens (a test of the mining that could fail): another HR image under the same
    LR view changes every token; the tokens are the official per-patch refinement of the CLIP features."""
    from llava.model.mgm.images import MGMImages, lr_from_hr

    hr = batch.images[:1]
    lr = lr_from_hr(hr, 336)
    with torch.no_grad():
        same = model.get_image_features(MGMImages(lr, hr)).per_image[0]
        other = model.get_image_features(MGMImages(lr, hr.flip(-1))).per_image[0]
    assert same.shape == (576, model.config.hidden_size)
    assert ((same - other).abs().amax(-1) > 1e-3).float().mean() > 0.9


@pytest.mark.parametrize("method", VISION_METHODS)
def test_vision_side_methods_batch_equals_one_by_one(model, processor, images, batch, method):
    visionzip.apply_compression(model, f"{method}:64")
    settings = model.get_visual_compression().settings
    with torch.no_grad():
        together = model.get_image_features(batch.images)
        alone = []
        for row, image in enumerate(images):
            if hasattr(settings, "seed"):  # a seeded draw: view b of a batch draws with seed + b
                model.set_visual_compression(dataclasses.replace(settings, seed=settings.seed + row).spec())
            alone.append(model.get_image_features(processor([QUESTIONS[row]], [image]).images).per_image[0])
        vanilla = None
        if settings.stage == "encoder_output":
            model.set_visual_compression(None)
            vanilla = model.get_image_features(batch.images).per_image
    expected = settings.tokens_per_view(576)
    for row in range(2):
        got = together.per_image[row]
        assert got.shape[0] == (expected if expected is not None else alone[row].shape[0])
        torch.testing.assert_close(got, alone[row], atol=1e-5, rtol=1e-5)
    compressed = together.views.compressed
    if vanilla is not None:
        # a patch kept as it is (PruMerge updates its kept tokens) mines its own HR cell: its token is the
        # vanilla MGM token of that patch
        from llava.model.mgm.images import lr_from_hr

        with torch.no_grad():
            raw = model.get_vision_tower().encode(lr_from_hr(batch.images, 336))[0]
        offset = int(compressed.has_cls)
        checked = 0
        for row in range(2):
            kept = compressed.keep_indices[row]
            patches = kept[kept >= offset] - offset
            rows = torch.nonzero(kept >= offset).flatten()
            if torch.equal(compressed.tokens[row, rows], raw[row, patches]):
                torch.testing.assert_close(together.per_image[row][rows], vanilla[row][patches], atol=1e-5, rtol=1e-5)
                checked += len(rows)
        if method in ("visionzip", "vispruner", "random"):
            assert checked


def test_visionzip_paper_budgets_on_mgm(model, batch):
    """VisionZip's MGM budgets (paper Table 8): 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30."""
    for total, (dominant, contextual) in {64: (54, 10), 128: (108, 20), 192: (162, 30)}.items():
        visionzip.apply_compression(model, f"visionzip:{total}")
        settings = model.get_visual_compression().settings
        assert (settings.dominant, settings.contextual) == (dominant, contextual)
    with torch.no_grad():
        features = model.get_image_features(batch.images)
    assert [f.shape[0] for f in features.per_image] == [192, 192]
    # mining runs for the 64 kept tokens, not for 576 (the [CLS] has no cell: its row is masked to zero)
    visionzip.apply_compression(model, "visionzip:64")
    seen = []
    hook = model.get_model().vlm_uni_aux_projector.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            model.get_image_features(batch.images)
    finally:
        hook.remove()
    assert seen == [torch.Size([2, 64, 64, 48])]  # (images, mined tokens, 8 x 8 HR cell, mm_hidden_size_aux)


@pytest.mark.parametrize("method", LLM_METHODS)
def test_in_llm_methods_batch_equals_one_by_one(model, processor, images, batch, method):
    # CDPruner at 32: its DPP kernel's rank is at most the LLM's width (64 here), and picks past it are ill-defined
    visionzip.apply_compression(model, f"{method}:{32 if method == 'cdpruner' else 64}")
    with torch.no_grad():
        together = model(**batch.generate_kwargs()).logits[:, -1]
        alone = [model(**processor([q], [image]).generate_kwargs()).logits[0, -1] for q, image in zip(QUESTIONS, images)]
        model.set_visual_compression(None)
        vanilla = model(**batch.generate_kwargs()).logits[:, -1]
    for row in range(2):
        torch.testing.assert_close(together[row], alone[row], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together, vanilla, atol=1e-4)  # the method did prune


@pytest.mark.parametrize("spec", ["none", "visionzip:64", "vispruner:64"])
def test_run_llava_answers(checkpoint, image_file, loaded, processor, images, spec, capsys):
    from llava.eval.run_llava import main as run_llava

    assert run_llava(["--model-path", checkpoint, "--image-file", str(image_file), "--query", QUESTIONS[0],
                      "--device", "cpu", "--temperature", "0", "--max_new_tokens", "4", "--compression", spec]) == 0
    answer = capsys.readouterr().out.strip()
    tokenizer, model, _ = loaded
    model.set_visual_compression(None if spec == "none" else spec)
    try:
        with torch.no_grad():
            ids = model.generate(**processor([QUESTIONS[0]], [images[0]]).generate_kwargs(), max_new_tokens=4,
                                 do_sample=False, use_cache=True, pad_token_id=processor.pad_token_id)
    finally:
        model.set_visual_compression(None)
    assert answer == tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_refusals_name_the_value(model, checkpoint, tmp_path):
    from llava.model.builder import load_pretrained_model
    from llava.model.language_model.mgm_llama import MGMConfig, MGMLlamaModel

    with pytest.raises(ValueError, match="image_grid=2.*MGM-HD"):
        MGMLlamaModel(MGMConfig(image_grid=2, hidden_size=16, num_attention_heads=2, num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"HR image, \(V, 3, 768, 768\).*got shape \(1, 3, 336, 336\)"):
        model.get_image_features(torch.zeros(1, 3, 336, 336))
    # a checkpoint without the mining projectors' weights is not run with untrained ones
    broken = tmp_path / "no-mining"
    shutil.copytree(checkpoint, broken)
    shard = broken / "model-00001-of-00001.safetensors"
    weights = {k: v for k, v in load_file(shard).items() if "vlm_uni" not in k}
    save_file(weights, shard, metadata={"format": "pt"})
    index = json.load(open(broken / "model.safetensors.index.json"))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "vlm_uni" not in k}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="patch-info mining"):
        load_pretrained_model(str(broken), None, device="cpu")


def test_eval_engine_runs_the_papers_budget(checkpoint, image_file, tmp_path):
    """What scripts/mgm/eval/*.sh run: the eval engine with the paper's METHOD BUDGET (VisionZip 64 = 54 + 10)."""
    from llava.eval import generate

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": image_file.name, "text": f"Question {i}?"}) + "\n"
                                 for i in range(3)))
    record = generate.main(["--model-path", checkpoint, "--question-file", str(questions), "--image-folder",
                            str(image_file.parent), "--answers-file", str(tmp_path / "answers.jsonl"), "--format", "vqa",
                            "--method", "visionzip", "--budget", "64", "--device", "cpu", "--max-new-tokens", "2",
                            "--batch-size", "2", "--no-progress"])
    assert record["num_answered"] == 3 and record["visual_tokens"] == 64
    assert record["compression_per_view"] == "visionzip:dominant=54,contextual=10"


def test_a_trained_hr_tower_comes_from_the_checkpoint(checkpoint, tmp_path):
    """``optimize_vision_tower_aux``: MGM reads the HR tower from the checkpoint's ``model.vision_tower_aux.*``
    (``initialize_uni_modules``); otherwise it comes from the OpenCLIP folder."""
    from llava.model.builder import load_pretrained_model

    trained = tmp_path / "trained-aux"
    shutil.copytree(checkpoint, trained)
    shard = trained / "model-00001-of-00001.safetensors"
    weights = load_file(shard)
    key = "model.vision_tower_aux.vision_stages.3.blocks.0.mlp.fc2.weight"
    weights[key] = weights[key] + 1.0
    save_file(weights, shard, metadata={"format": "pt"})
    _, untrained_model, _, _ = load_pretrained_model(str(trained), None, device="cpu")
    config = json.loads((trained / "config.json").read_text())
    config["optimize_vision_tower_aux"] = True
    (trained / "config.json").write_text(json.dumps(config))
    _, model, _, _ = load_pretrained_model(str(trained), None, device="cpu")
    name = key[len("model.vision_tower_aux."):]
    assert torch.equal(model.get_vision_tower_aux().state_dict()[name], weights[key])
    assert torch.equal(untrained_model.get_vision_tower_aux().state_dict()[name] + 1.0, weights[key])


def test_training_an_mgm_checkpoint_is_refused_before_it_loads(checkpoint, tmp_path):
    # the trainer builds LlavaLlamaForCausalLM: an MGM checkpoint would silently lose its HR path
    from llava.train.train import check_model_trainable

    with pytest.raises(ValueError, match=r"is a 'mgm' checkpoint; the trainer builds LLaVA-Llama models only"):
        check_model_trainable(checkpoint)
