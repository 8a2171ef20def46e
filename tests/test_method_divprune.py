"""DivPrune: the batched max-min selection against the official ``DivPrune`` loop, the fast path (a drop
before LLM layer 0 on the spliced input) against the re-enactment of the official LLaVA path on tiny random
LLaVA-1.5 and LLaVA-NeXT models (kept positions, logits), batch = one by one, cached decoding = a no-cache
replay, bad settings, and run_llava on the official tiny checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from llm_method_cases import (
    QUESTIONS,
    ReplayPruner,
    make_images,
    prompt_ids,
    replay_decoding,
    spliced_per_version,
    tiny_models,
)
from PIL import Image

import visionzip
from llava.mm_utils import process_images
from visionzip import CompressionConfig
from visionzip.methods.divprune import DivPrune, divprune_keep, official_divprune, official_divprune_indices

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("divprune"), layers=LAYERS)


@pytest.fixture(scope="module")
def spliced(models):
    """Per version: the left-padded batch of 3 (different images, prompts, lengths) and each sample alone."""
    return spliced_per_version(models)


def run_fast(model, inputs, cache=None, use_cache=False, pruner=None):
    with torch.no_grad():
        out = model.get_model().pruned_forward(
            inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, cache, use_cache, inputs.visual_mask,
            pruner or model.llm_pruner(),
        )
    return model.lm_head(out.last_hidden_state), out


# ----- the selection ---------------------------------------------------------------------------------
def test_batched_selection_equals_the_official_loop_per_row():
    """Rows with different candidate sets (text and padding around them) and counts: each row's kept set is
    the official loop's picks on its candidates alone; a far outlier is the first pick."""
    torch.manual_seed(0)
    features = torch.randn(3, 50, 16)
    features[1, 7] = 40.0 * torch.ones(16) - features[1, 7]  # no near neighbour: the official first pick
    candidates = torch.zeros(3, 50, dtype=torch.bool)
    candidates[0, 5:45] = True
    candidates[1, :50] = True
    candidates[2, 10:30] = True
    candidates[2, 33:40] = True  # two images in one sample
    counts = torch.tensor([12, 20, 1])
    keep = divprune_keep(features, candidates, counts)
    assert not (keep & ~candidates).any()
    for row in range(3):
        positions = torch.nonzero(candidates[row]).flatten()
        picks = official_divprune_indices(features[row, positions], len(positions), int(counts[row]) / len(positions))
        assert len(set(picks.tolist())) == int(counts[row])
        assert set(torch.nonzero(keep[row]).flatten().tolist()) == set(positions[picks].tolist()), row
    assert keep[1, 7]
    # a row with fewer candidates than another row's count, and one with none (a text-only sample)
    few = torch.zeros(3, 50, dtype=torch.bool)
    few[0, 3:8] = True
    few[1, :] = True
    keep = divprune_keep(features, few, torch.tensor([2, 20, 0]))
    assert keep.sum(dim=1).tolist() == [2, 20, 0] and not (keep & ~few).any()
    picks = official_divprune_indices(features[0, 3:8], 5, 2 / 5)
    assert set(torch.nonzero(keep[0]).flatten().tolist()) == set((picks + 3).tolist())


# ----- the fast path against the official LLaVA path ----------------------------------------------------
@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_fast_path_matches_the_official_code_batch_1_and_3(version, models, spliced):
    _, model, _, _ = models[version]
    both, singles = spliced[version]
    view = model.get_vision_tower().num_patches
    # the official loop re-reads every pick's row at each pick (K^2 V): NeXT's ~2000 visual tokens get two budgets
    specs = ("divprune:64", "divprune:128", "divprune:192", "divprune:ratio=0.098")
    for spec in specs if version == "v1.5" else ("divprune:32", "divprune:ratio=0.05"):
        model.set_visual_compression(spec)
        settings = model.get_visual_compression().settings
        batch_logits, batch_out = run_fast(model, both)
        pad = (~both.attention_mask.bool()).sum(dim=1)
        for row, single in enumerate(singles):
            visual = single.visual_mask[0]
            count = int(visual.sum())
            kept_count = round(settings.ratio * count) if settings.ratio else count * settings.tokens // view
            ratio = settings.ratio or kept_count / count  # the official rule, round(ratio * count) = kept_count
            ref_logits, ref_kept = official_divprune(model.get_model(), model.lm_head, single.inputs_embeds,
                                                     single.visual_mask, ratio)
            assert int(visual[ref_kept].sum()) == kept_count < count, (spec, row)
            logits, out = run_fast(model, single)
            assert out.kept_index[0].tolist() == ref_kept.tolist(), (spec, version, row)
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
            valid = batch_out.kept_valid[row]
            assert (batch_out.kept_index[row][valid] - pad[row]).tolist() == ref_kept.tolist(), (spec, version, row)
            torch.testing.assert_close(batch_logits[row][valid], ref_logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_decoding_on_the_pruned_cache_equals_replaying_the_selection_without_cache(version, models, spliced):
    tokenizer, model, _, _ = models[version]
    model.set_visual_compression("divprune:32")
    both, _ = spliced[version]
    llm = model.get_model()
    replay = ReplayPruner(model.llm_pruner())
    embeds, mask, positions = both.inputs_embeds, both.attention_mask.bool(), both.position_ids
    with torch.no_grad():
        cache = llm.pruned_forward(embeds, mask, positions, None, True, both.visual_mask, replay).cache
        kept = int(replay.recorded[0].sum(dim=1).max())  # the drop before layer 0
        assert [cache.get_seq_length(layer) for layer in range(LAYERS)] == [kept] * LAYERS  # every layer pruned
        # a chat-style 4-token chunk (a later turn: never pruned), then 2 greedy steps, each against the replay
        replay_decoding(model, tokenizer, both, replay, cache, chunk_tokens=4, steps=2)


def test_generate_from_images_batched_equals_one_by_one(models, spliced):
    tokenizer, model, processor, _ = models["v1.6"]
    model.set_visual_compression("divprune:64")
    images = make_images()
    ids = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    longest = max(len(i) for i in ids)
    batch = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros(3, longest, dtype=torch.long)
    for row, sample in enumerate(ids):
        batch[row, longest - len(sample) :] = sample
        mask[row, longest - len(sample) :] = 1
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    _, singles = spliced["v1.6"]
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, images=process_images(images, processor, model.config),
                                  image_sizes=[im.size for im in images], **kwargs)
        for row, single in enumerate(singles):
            alone = model.generate(inputs_embeds=single.inputs_embeds, visual_mask=single.visual_mask, **kwargs)
            assert together[row].tolist() == alone[0].tolist()


# ----- settings, budgets, entry points -------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, message",
    [
        ("divprune:0", "visual tokens must be >= 1, got 0"),
        ("divprune:tokens=0", "tokens must be >= 1, got 0"),
        ("divprune:tokens=64,ratio=0.1", "give tokens (per view) or ratio (of each image's visual tokens), not both"),
        ("divprune:ratio=1.5", "ratio must be in [0, 1], got 1.5"),
        ("divprune:ratio=0", "ratio must be in (0, 1], got 0"),
        ("divprune:1000", "keeps tokens = 1000 per view, more than the 576 visual tokens of a view"),
    ],
)
def test_bad_settings_raise_before_any_model_runs(spec, message, models):
    _, model, _, _ = models["v1.5"]
    model.set_visual_compression(None)
    with pytest.raises(ValueError) as err:
        model.set_visual_compression(spec)
    assert message in str(err.value)
    assert not model.get_visual_compression().enabled


def test_budgets_specs_and_schedule():
    assert "divprune" in visionzip.registered_methods()
    for spec, per_view in (("divprune:64", 64), ("divprune:ratio=0.098", 56), ("divprune:tokens=192", 192)):
        config = CompressionConfig.parse(spec)
        assert config.stage == "llm" and config.tokens_per_image == per_view
        assert CompressionConfig.parse(config.spec()) == config
        assert CompressionConfig.from_dict(config.to_dict()) == config
    assert DivPrune.from_budget(64).llm_token_schedule(32, 576) == [64] * 32
    # LLaVA-NeXT: 5 views' tokens (newlines included) keep the same share; the official ratio of the whole image
    assert DivPrune.from_budget(64).llm_token_schedule(4, 2928, view_tokens=576) == [2928 * 64 // 576] * 4
    assert DivPrune(ratio=0.098).llm_token_schedule(4, 2928, view_tokens=576) == [round(0.098 * 2928)] * 4
    assert DivPrune().tokens == 64 and DivPrune(ratio=0.5).tokens is None


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_run_llava_at_64_tokens_per_view(version, official_checkpoints, tmp_path, capsys):
    from llava.eval.run_llava import main as run_llava

    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(7).random((300, 420, 3)) * 255).astype("uint8")).save(image)
    assert run_llava(["--model-path", str(official_checkpoints / f"llava-{version}-tiny"), "--image-file", str(image),
                      "--query", "What is shown?", "--temperature", "0", "--max_new_tokens", "3", "--device", "cpu",
                      "--compression", "divprune:64"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_hugging_face_classes_prefill_the_divprune_sequence(family):
    """The transformers classes (in-LLM protocol, ``visionzip.hf``): the compressed prefill's logits are the
    plain model's on the sequence DivPrune keeps, its KV cache holds only that sequence, and a batch
    generates what each prompt generates alone."""
    from visionzip.hf import compression_aware_processor
    from visionzip.hf.tiny import tiny_llava, tiny_llava_next

    model, processor = tiny_llava() if family == "llava" else tiny_llava_next()
    rng = np.random.default_rng(0)
    pics = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in ((120, 50), (50, 120))]
    prompts = ["USER: <image> what is in the picture ASSISTANT:", "USER: <image> describe it ASSISTANT:"]
    inputs = processor(text=prompts[:1], images=pics[:1], return_tensors="pt")
    view = model.config.vision_config.image_size // model.config.vision_config.patch_size
    visionzip.apply_compression(model, "divprune:16")
    try:
        with torch.no_grad():
            compressed = model(**inputs, use_cache=True)
            aware = compression_aware_processor(processor, model)
            batch = aware(text=prompts, images=pics, return_tensors="pt", padding=True)
            together = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1]:]
            for row in range(2):
                alone = aware(text=prompts[row : row + 1], images=pics[row : row + 1], return_tensors="pt")
                single = model.generate(**alone, max_new_tokens=3, do_sample=False)[:, alone["input_ids"].shape[1]:]
                assert single.tolist() == together[row : row + 1].tolist()
    finally:
        visionzip.apply_compression(model, "none")
    with torch.no_grad():
        ids = inputs["input_ids"]
        visual = ids == model.config.image_token_id
        sizes = {} if family == "llava" else {"image_sizes": inputs["image_sizes"]}
        features = torch.cat(list(model.get_image_features(pixel_values=inputs["pixel_values"], **sizes).pooler_output))
        embeds = model.get_input_embeddings()(ids.masked_fill(visual, 0))
        embeds[visual] = features.to(embeds.dtype)
        count = int(visual.sum()) * 16 // (view * view)
        keep = divprune_keep(embeds, visual, torch.tensor([count])) | ~visual
        plain = model(inputs_embeds=embeds[keep][None]).logits
    assert int(keep.sum()) == int((~visual).sum()) + count < ids.shape[1]
    assert compressed.cache.get_seq_length(0) == int(keep.sum())
    torch.testing.assert_close(compressed.logits, plain, atol=1e-4, rtol=0)
