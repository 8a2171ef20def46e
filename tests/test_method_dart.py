"""DART (in the LLM): the fast path (SDPA, keys of layer K-1 computed from its input, per-sample selection in
a left-padded batch, pruned KV cache) against the re-enactment of the official code, on tiny random
LLaVA-1.5 and LLaVA-NeXT models with 4 LLM layers; text-only samples, cached decoding, the prompt's part in
the selection, bad settings, and the entry points (run_llava on the official tiny checkpoints)."""
from __future__ import annotations

import pytest
import torch
from llm_method_cases import (
    ReplayPruner,
    make_images,
    replay_decoding,
    splice_batch,
    spliced_per_version,
    tiny_models,
)

import visionzip
from llava.eval.run_llava import main as run_llava_main
from llava.model.llava_arch import SplicedInputs
from visionzip import CompressionConfig
from visionzip.methods.dart import DART, claim_quotas, official_dart
from visionzip.methods.fastv import visual_keep_counts

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("dart"), layers=LAYERS)


@pytest.fixture(scope="module")
def spliced(models):
    """Per version: the left-padded batch of 3 (different images, prompts, lengths) and each sample alone."""
    return spliced_per_version(models)


def run_fast(model, inputs, pruner=None, cache=None, use_cache=False):
    with torch.no_grad():
        out = model.get_model().pruned_forward(
            inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, cache, use_cache, inputs.visual_mask,
            pruner or model.llm_pruner(),
        )
    return model.lm_head(out.last_hidden_state), out


def run_reference(settings: DART, model, single):
    """The official code with the settings' budget for this sample: its pivots claim ``kept - 4`` tokens."""
    visual = int(single.visual_mask.sum())
    kept = int(visual_keep_counts(torch.tensor([visual]), settings.tokens, model.get_vision_tower().num_patches))
    claimed = kept - settings.image_pivots
    pivots = settings.image_pivots + settings.text_pivots
    return official_dart(model.get_model(), model.lm_head, single.inputs_embeds, single.visual_mask, 2, claimed,
                         settings.image_pivots, settings.text_pivots, extra_first=claimed % pivots)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_fast_path_matches_the_official_code_batch_1_and_3(version, models, spliced):
    """The kept tokens and logits of the official code, per sample alone and in a left-padded batch of 3,
    for the paper budgets (exactly 64 / 128 / 192 kept) and the official row "64" (M = 64: 68 kept)."""
    _, model, _, _ = models[version]
    both, singles = spliced[version]
    budgets = (64, 128, 192) if version == "v1.5" else (64,)  # NeXT's long spans make the reference slow
    for settings in (*(DART.from_budget(b) for b in budgets), DART(tokens=68)):
        model.set_visual_compression(CompressionConfig("dart", settings))
        batch_logits, batch_out = run_fast(model, both)
        pad = (~both.attention_mask.bool()).sum(dim=1)
        for row, single in enumerate(singles):
            ref_logits, ref_kept = run_reference(settings, model, single)
            visual = single.visual_mask[0]
            kept_visual = {int(i) for i in ref_kept if visual[i]}
            expected = int(visual_keep_counts(visual.sum()[None], settings.tokens, model.get_vision_tower().num_patches))
            assert len(kept_visual) == expected < int(visual.sum())
            logits, out = run_fast(model, single)
            assert out.kept_valid.all()
            assert out.kept_index[0].tolist() == ref_kept.tolist(), (version, settings, row)
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
            valid = batch_out.kept_valid[row]
            kept = batch_out.kept_index[row][valid] - pad[row]
            assert kept.tolist() == ref_kept.tolist(), (version, settings, row)
            torch.testing.assert_close(batch_logits[row][valid], ref_logits[0], atol=1e-4, rtol=0)


def test_budget_rule_and_schedule():
    assert claim_quotas(60, 8) == [8, 8, 8, 8, 7, 7, 7, 7] and claim_quotas(64, 8) == [8] * 8
    assert DART.from_budget(64) == DART(tokens=64, layer=0, image_pivots=4, text_pivots=4)
    assert visionzip.parse_spec("dart:64") == DART.from_budget(64)
    assert DART.from_args("tokens=68,layer=2").spec() == "dart:tokens=68,layer=2,image_pivots=4,text_pivots=4"
    # the official K = 2 on every LLaVA LLM, the last layer of a 2-layer one
    assert DART.from_budget(64).llm_pruner(32).layers == (2,) and DART.from_budget(64).llm_pruner(2).layers == (1,)
    assert DART.from_budget(64).llm_token_schedule(32, 576) == [576, 576] + [64] * 30
    assert DART.from_budget(64).llm_token_schedule(4, 2880, view_tokens=576) == [2880, 2880, 320, 320]
    assert DART.from_budget(64).tokens_per_view() == 64 and DART.from_budget(2).image_pivots == 2


def test_text_only_sample_in_the_batch_keeps_every_token(models, spliced):
    """A text-only sample beside image samples: nothing of it is dropped, its logits are the vanilla model's."""
    tokenizer, model, _, _ = models["v1.5"]
    both, _ = spliced["v1.5"]
    model.set_visual_compression("dart:64")
    llm = model.get_model()
    text = torch.tensor(tokenizer("USER: Tell me a story about a cat. ASSISTANT:").input_ids)
    width = both.inputs_embeds.shape[1]
    with torch.no_grad():
        text_embeds = llm.embed_tokens(text)[None]
        embeds = torch.cat([both.inputs_embeds, torch.zeros(1, width, text_embeds.shape[-1])], dim=0)
        embeds[3, width - len(text) :] = text_embeds[0]
        mask = torch.cat([both.attention_mask.bool(), torch.zeros(1, width, dtype=torch.bool)])
        mask[3, width - len(text) :] = True
        positions = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
        visual = torch.cat([both.visual_mask, torch.zeros(1, width, dtype=torch.bool)])
        logits, out = run_fast(model, SplicedInputs(embeds, mask, positions, None, visual))
        plain = model.lm_head(llm.pruned_forward(text_embeds, None, None, None, False, None, None).last_hidden_state)
    valid = out.kept_valid[3]
    assert int(valid.sum()) == len(text)
    torch.testing.assert_close(logits[3][valid], plain[0], atol=1e-4, rtol=0)
    assert all(int(out.kept_valid[row].sum()) < int(both.attention_mask[row].sum()) for row in range(3))


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_decoding_on_the_pruned_cache_equals_replaying_the_selection_without_cache(version, models, spliced):
    tokenizer, model, _, _ = models[version]
    model.set_visual_compression("dart:64")
    both, _ = spliced[version]
    llm = model.get_model()
    replay = ReplayPruner(model.llm_pruner())
    embeds, mask, positions = both.inputs_embeds, both.attention_mask.bool(), both.position_ids
    with torch.no_grad():
        cache = llm.pruned_forward(embeds, mask, positions, None, True, both.visual_mask, replay).cache
        assert cache.get_seq_length(2) < cache.get_seq_length(1) == embeds.shape[1]
        # a chat-style 3-token chunk (a later turn: never pruned), then 2 greedy steps, each against the replay
        replay_decoding(model, tokenizer, both, replay, cache, chunk_tokens=3, steps=2)


def test_the_question_picks_the_text_pivots(models):
    """Same image, two questions: the text pivots differ, and so do the kept visual tokens (DART is
    text-conditioned; in a chat the first turn's question decides, the image being pruned once)."""
    tokenizer, model, processor, _ = models["v1.5"]
    model.set_visual_compression(None)
    image = make_images()[1]
    both, _, _ = splice_batch(model, processor, tokenizer, ["What is in the picture?", "Count the red squares, quickly!"],
                     [image, image])
    model.set_visual_compression("dart:64")
    _, out = run_fast(model, both)
    pad = (~both.attention_mask.bool()).sum(dim=1)
    kept = [set((out.kept_index[row][out.kept_valid[row]] - pad[row]).tolist()) for row in range(2)]
    visual = [set(torch.nonzero(both.visual_mask[row]).flatten().sub(pad[row]).tolist()) for row in range(2)]
    assert visual[0] == visual[1] and len(kept[0] & visual[0]) == len(kept[1] & visual[1]) == 64
    assert kept[0] & visual[0] != kept[1] & visual[1]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("dart:tokens=64,layer=4", "layer 4 is outside [1, 3]"),
        ("dart:tokens=0", "tokens must be >= 1"),
        ("dart:tokens=3", "tokens = 3 must be >= image_pivots = 4"),
        ("dart:tokens=64,image_pivots=0", "image_pivots must be >= 1"),
        ("dart:tokens=64,text_pivots=-1", "text_pivots must be >= 0"),
        ("dart:1000", "keeps tokens = 1000 per view, more than the 576"),
    ],
)
def test_bad_settings_raise_before_any_model_runs(spec, message, models):
    _, model, _, _ = models["v1.5"]
    model.set_visual_compression(None)
    with pytest.raises(ValueError) as err:
        model.set_visual_compression(spec)
    assert message in str(err.value)
    assert not model.get_visual_compression().enabled


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_run_llava_on_the_official_tiny_checkpoints(version, official_checkpoints, tmp_path, capsys):
    """``--compression dart:64`` through run_llava (2-layer LLMs: DART acts before layer 1)."""
    image = tmp_path / "noise.png"
    make_images()[0].save(image)
    args = ["--model-path", str(official_checkpoints / f"llava-{version}-tiny"), "--image-file", str(image),
            "--query", "What is this?", "--device", "cpu", "--temperature", "0", "--max_new_tokens", "4",
            "--compression", "dart:64"]
    assert run_llava_main(args) == 0
    assert capsys.readouterr().out.strip()
