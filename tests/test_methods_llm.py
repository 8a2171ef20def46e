"""In-LLM methods (FastV, PyramidDrop): the fast path (SDPA, attention rows from q and k, per-sample
selection, pruned KV cache) against the re-enactments of the official code, on tiny random LLaVA-1.5 and
LLaVA-NeXT models with 4 LLM layers; batching, cached decoding, chat-style continuation, bad settings."""
from __future__ import annotations

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

import visionzip
from llava.mm_utils import process_images
from visionzip import CompressionConfig
from visionzip.methods.fastv import FastV, official_fastv, visual_keep_counts
from visionzip.methods.pdrop import PDrop, official_pdrop
from visionzip.methods.sparsevlm import SPARSEVLM_BUDGETS, SparseVLM, official_sparsevlm

LAYERS = 4
BUDGETS = (64, 128, 192)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("llm-methods"), layers=LAYERS)


@pytest.fixture(scope="module")
def spliced(models):
    """Per version: the left-padded batch of 3 (different images, prompts, lengths) and each sample alone."""
    return spliced_per_version(models)


def settings_for(method: str, budget: int):
    if method == "fastv":
        return FastV(tokens=budget, layer=2)
    if method == "sparsevlm":  # the official table's first two stages, on sparse layers that fit 4 layers
        return SparseVLM(layers=(1, 2), counts=SPARSEVLM_BUDGETS[budget][:2])
    # the paper-budget schedule, on stage layers that fit a 4-layer LLM
    return PDrop(layers=(1, 2, 3), ratios=PDrop.from_budget(budget).ratios)


def run_reference(method: str, settings, model, single):
    llm, head = model.get_model(), model.lm_head
    if method == "fastv":
        visual = int(single.visual_mask.sum())
        rank = int(visual_keep_counts(torch.tensor([visual]), settings.tokens, model.get_vision_tower().num_patches))
        return official_fastv(llm, head, single.inputs_embeds, single.visual_mask, rank, settings.layer)
    if method == "sparsevlm":
        visual = int(single.visual_mask.sum())
        counts = [visual * c // model.get_vision_tower().num_patches for c in settings.counts]
        return official_sparsevlm(llm, head, single.inputs_embeds, single.visual_mask, settings.layers, counts,
                                  noise_seed=settings.seed)
    return official_pdrop(llm, head, single.inputs_embeds, single.visual_mask, settings.layers, settings.ratios)


def run_fast(model, spliced_inputs, cache=None, use_cache=False):
    with torch.no_grad():
        out = model.get_model().pruned_forward(
            spliced_inputs.inputs_embeds, spliced_inputs.attention_mask, spliced_inputs.position_ids, cache,
            use_cache, spliced_inputs.visual_mask, model.llm_pruner(),
        )
    return model.lm_head(out.last_hidden_state), out


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_fast_path_matches_the_official_code_batch_1_and_3(method, version, models, spliced):
    _, model, _, _ = models[version]
    both, singles = spliced[version]
    for budget in BUDGETS:
        settings = settings_for(method, budget)
        model.set_visual_compression(CompressionConfig(method, settings))
        batch_logits, batch_out = run_fast(model, both)
        pad = (~both.attention_mask.bool()).sum(dim=1)  # left padding of each sample in the batch
        for row, single in enumerate(singles):
            ref_logits, ref_kept = run_reference(method, settings, model, single)
            visual = single.visual_mask[0]
            kept_visual = {int(i) for i in ref_kept if visual[i]}
            assert len(kept_visual) < int(visual.sum())  # something was pruned
            # batch 1
            logits, out = run_fast(model, single)
            assert out.kept_valid.all()
            assert out.kept_index[0].tolist() == ref_kept.tolist()
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
            # batch 3, left padded: the same tokens (as a set, in the sample's own index space) and logits
            valid = batch_out.kept_valid[row]
            kept = batch_out.kept_index[row][valid] - pad[row]
            assert set(kept.tolist()) == set(ref_kept.tolist()), (method, version, budget, row)
            assert {int(i) for i in kept if visual[i]} == kept_visual
            torch.testing.assert_close(batch_logits[row][valid], ref_logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
@pytest.mark.parametrize(
    "spec", ["fastv:tokens=64,layer=2", "pdrop:layers=1/3,ratios=0.5/0.125", "sparsevlm:layers=1/2,counts=66/30"]
)
def test_decoding_on_the_pruned_cache_equals_replaying_the_selection_without_cache(spec, version, models, spliced):
    tokenizer, model, _, _ = models[version]
    model.set_visual_compression(spec)
    both, _ = spliced[version]
    llm = model.get_model()
    replay = ReplayPruner(model.llm_pruner())
    embeds, mask, positions = both.inputs_embeds, both.attention_mask.bool(), both.position_ids
    with torch.no_grad():
        # prefill with a cache, then a chat-style 4-token chunk and 3 greedy steps, each against the replay
        prefill = llm.pruned_forward(embeds, mask, positions, None, True, both.visual_mask, replay)
        cache = prefill.cache
        assert llm.pruned_prefix(cache) is not None
        lengths = [cache.get_seq_length(layer) for layer in range(LAYERS)]
        first = replay.layers[0]
        assert lengths[0] == embeds.shape[1] and lengths[first] < lengths[first - 1]
        replay_decoding(model, tokenizer, both, replay, cache, chunk_tokens=4, steps=3)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_generate_from_images_batched_equals_one_by_one(version, models, spliced):
    """generate(ids, images) carries the splice's visual positions into the pruned prefill; the batch
    (left padded, each sample its own selection) gives what each sample gives alone."""
    tokenizer, model, processor, _ = models[version]
    model.set_visual_compression("fastv:tokens=32,layer=2")
    images = make_images()
    ids = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    longest = max(len(i) for i in ids)
    batch = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros(3, longest, dtype=torch.long)
    for row, sample in enumerate(ids):
        batch[row, longest - len(sample) :] = sample
        mask[row, longest - len(sample) :] = 1
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    _, singles = spliced[version]
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, images=process_images(images, processor, model.config),
                                  image_sizes=[im.size for im in images], **kwargs)
        for row, single in enumerate(singles):
            alone = model.generate(inputs_embeds=single.inputs_embeds, visual_mask=single.visual_mask, **kwargs)
            assert together[row].tolist() == alone[0].tolist()
            # the same selection, step by step: the prefill's last-token logits
            plain = model(inputs_embeds=single.inputs_embeds, visual_mask=single.visual_mask).logits[0, -1]
            assert int(plain.argmax()) == int(alone[0, 0])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fastv:tokens=64,layer=4", "layer 4 is outside [1, 3]"),
        ("fastv:tokens=64,layer=0", "layer must be >= 1"),
        ("fastv:tokens=0", "tokens must be >= 1"),
        ("pdrop:layers=1/5/3,ratios=0.5/0.25/0.1", "layer 5 is outside [1, 3]"),
        ("pdrop:layers=2/1,ratios=0.5/0.25", "strictly ascending"),
        ("pdrop:layers=1/2,ratios=0.25/0.5", "must not increase"),
        ("pdrop:layers=1/2,ratios=0.5", "2 layers [1, 2] but 1 ratios"),
        ("pdrop:layers=1,ratios=1.5", "ratios must be in [0, 1]"),
        ("pdrop:1000", "1000 visual tokens exceed the 576"),
        ("sparsevlm:100", "tables for [64, 96, 128, 192] visual tokens only, got 100"),
        ("sparsevlm:layers=2/6/15,counts=66/30/17", "sparse layer 6 is outside [0, 2]"),
        ("sparsevlm:counts=66/30", "without layers (the paper's [2, 6, 15], scaled to shallow LLMs) give 3 counts"),
        ("sparsevlm:layers=1/2,counts=66", "2 layers [1, 2] but 1 counts"),
    ],
)
def test_bad_settings_raise_before_any_model_runs(spec, message, models):
    _, model, _, _ = models["v1.5"]
    model.set_visual_compression(None)
    with pytest.raises(ValueError) as err:
        model.set_visual_compression(spec)
    assert message in str(err.value)
    assert not model.get_visual_compression().enabled


def test_pdrop_budget_needs_four_layers_and_fastv_schedule():
    with pytest.raises(ValueError, match="quarters of the depth need an LLM of >= 4 layers, got 2"):
        PDrop.from_budget(64).check_llm(2)
    assert PDrop.from_budget(64).llm_pruner(32).layers == (8, 16, 24)
    assert PDrop.from_budget(72).tokens_per_view() == 72
    assert FastV.from_budget(64).llm_token_schedule(32, 576) == [576, 576] + [64] * 30
    # NeXT: 5 views of 576 keep 5 x 64
    assert FastV.from_budget(64).llm_token_schedule(4, 2880, view_tokens=576) == [2880, 2880, 320, 320]
    assert PDrop(layers=(1, 3), ratios=(0.5, 0.125)).llm_token_schedule(4, 576) == [576, 288, 288, 72]
    assert {"fastv", "pdrop", "sparsevlm"} <= set(visionzip.registered_methods())
    # SparseVLM at 64 on 32 layers: 576 through layer 2; then 66 kept + int((int(510 * 0.3) + 1) / 10) + 1 = 16
    # clusters; after layer 6: 30 + 2 (52 pruned -> 16 recycled -> 2); after layer 15: 17 + 1 (15 -> 5 -> 1)
    schedule = SparseVLM.from_budget(64).llm_token_schedule(32, 576)
    assert schedule[:3] == [576] * 3 and schedule[3] == 66 + 16 and schedule[7] == 30 + 2 and schedule[-1] == 17 + 1
    assert SparseVLM.from_budget(64).tokens_per_view() == 18
    # a budget's sparse layers: the official 2 / 6 / 15 wherever they fit (7B's 32 layers, 13B's 40),
    # the same fractions of the depth on a shallower LLM
    for depth, layers in ((32, (2, 6, 15)), (40, (2, 6, 15)), (17, (2, 6, 15)), (16, (1, 3, 8)), (4, (0, 1, 2))):
        assert SparseVLM.from_budget(64).llm_pruner(depth).sparse_layers == layers, depth
    assert SparseVLM.from_budget(64).llm_token_schedule(4, 576) == [576, 66 + 16, 30 + 2, 17 + 1]
    with pytest.raises(ValueError, match="scaled to the depth, need an LLM of >= 4 layers .*got 3"):
        SparseVLM.from_budget(64).check_llm(3)


def test_sparsevlm_without_text_after_the_image_raises(models):
    _, model, _, _ = models["v1.5"]
    model.set_visual_compression("sparsevlm:layers=1/2,counts=66/30")
    embeds = torch.randn(1, 600, model.config.hidden_size)
    visual = torch.zeros(1, 600, dtype=torch.bool)
    visual[0, 24:] = True
    with torch.no_grad(), pytest.raises(ValueError, match="0 text tokens after its last visual token"):
        model(inputs_embeds=embeds, visual_mask=visual)


@pytest.mark.parametrize("spec", ["fastv:tokens=576,layer=1", "pdrop:layers=1/3,ratios=1/1"])
def test_keeping_every_token_equals_the_vanilla_model_logits_and_loss(spec, models, spliced):
    """A schedule that keeps every visual token changes nothing (logits, loss with labels, positions);
    with labels and a real drop the loss is computed on the kept tokens' labels."""
    _, model, _, _ = models["v1.5"]
    both, _ = spliced["v1.5"]
    labels = torch.randint(0, 100, both.attention_mask.shape).masked_fill(both.visual_mask, -100)
    labels = labels.masked_fill(~both.attention_mask.bool(), -100)
    kwargs = dict(inputs_embeds=both.inputs_embeds, attention_mask=both.attention_mask,
                  position_ids=both.position_ids, visual_mask=both.visual_mask, labels=labels, use_cache=False)
    with torch.no_grad():
        model.set_visual_compression(None)
        vanilla = model(**kwargs)
        model.set_visual_compression(spec)
        kept_all = model(**kwargs)
        model.set_visual_compression("fastv:tokens=8,layer=1")
        pruned = model(**kwargs)
    valid = both.attention_mask.bool()
    torch.testing.assert_close(kept_all.logits[valid], vanilla.logits[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(kept_all.loss, vanilla.loss, atol=1e-5, rtol=0)
    assert pruned.logits.shape[1] < vanilla.logits.shape[1] and torch.isfinite(pruned.loss)
    # text labels all survive a drop of visual tokens: the last token's prediction is scored in both
    assert pruned.loss != vanilla.loss


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_sparsevlm_matches_the_official_code_batch_1_and_3(version, models, spliced):
    """SparseVLM: the visual tokens left after each sparse layer (kept + recycled clusters) and the logits
    equal the official code's, per sample, batch 1 and batch 3 (left padded), for 3 budgets."""
    _, model, _, _ = models[version]
    both, singles = spliced[version]
    for budget in BUDGETS:
        settings = settings_for("sparsevlm", budget)
        model.set_visual_compression(CompressionConfig("sparsevlm", settings))
        batch_logits, batch_out = run_fast(model, both)
        for row, single in enumerate(singles):
            ref_logits, ref_visual = run_reference("sparsevlm", settings, model, single)
            logits, out = run_fast(model, single)
            assert logits.shape[1] == ref_logits.shape[1] < single.inputs_embeds.shape[1]
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
            valid = batch_out.kept_valid[row]
            torch.testing.assert_close(batch_logits[row][valid], ref_logits[0], atol=1e-4, rtol=0)
            expected = settings.llm_token_schedule(LAYERS, int(single.visual_mask.sum()),
                                                   model.get_vision_tower().num_patches)
            assert ref_visual == expected[-1]


@pytest.mark.parametrize("spec", ["fastv:tokens=64,layer=2", "dart:tokens=64,layer=2",
                                  "sparsevlm:layers=1/2,counts=66/30", "pdrop:layers=1/3,ratios=0.5/0.125"])
def test_a_cached_prefill_keeps_what_an_uncached_one_keeps_and_builds_the_mask_once_per_drop(spec, models, spliced,
                                                                                             monkeypatch):
    """With a KV cache the scoring layer's keys are read from it (FastV, DART, SparseVLM score by a layer that
    has run): the same kept tokens and logits as the prefill without a cache, which projects them again.
    The causal mask (and the rotary tables) are built before layer 0 and after each drop only, not per layer
    (create_causal_mask returns None for SDPA without padding: that must not read as 'not built yet')."""
    from visionzip import decoder_loop

    _, model, _, _ = models["v1.5"]
    model.set_visual_compression(spec)
    calls = []
    real = decoder_loop.create_causal_mask
    monkeypatch.setattr(decoder_loop, "create_causal_mask", lambda **kw: calls.append(kw["layer_idx"]) or real(**kw))
    both, singles = spliced["v1.5"]
    drops = list(model.llm_pruner().layers)
    for inputs in (singles[0], both):
        plain_logits, plain = run_fast(model, inputs)
        calls.clear()
        cached_logits, cached = run_fast(model, inputs, use_cache=True)
        assert calls == [0] + drops
        assert torch.equal(cached.kept_index[cached.kept_valid], plain.kept_index[plain.kept_valid])
        torch.testing.assert_close(cached_logits, plain_logits, atol=1e-5, rtol=0)
