"""CDPruner (``visionzip/methods/cdpruner.py``): the batched fast path (a drop before decoder layer 0 of the
pruned decoder loop) against the re-enactment of the official ``encode_images`` + re-splice, on tiny random
LLaVA-1.5 and LLaVA-NeXT models; batch = one by one, cached decoding = a no-cache replay, the relevance's
text, bad settings, the entry points (run_llava on the official tiny checkpoints, the budgets, FLOPs)."""
from __future__ import annotations

import pytest
import torch
from llm_method_cases import QUESTIONS, make_images, prompt_ids
from transformers import DynamicCache

import visionzip
from llava.eval.budgets import resolve_budget
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from llava.model.llava_arch import SplicedInputs
from llava.model.tiny import build_tiny_llava
from visionzip import CompressionConfig
from visionzip.llm import PruningContext
from visionzip.methods.cdpruner import (
    CDPruner,
    cdpruner_select,
    conditional_relevance,
    instruction_mask,
    official_cdpruner,
    official_cdpruner_selection,
)
from visionzip.methods.fastv import visual_keep_counts

# hidden 256: the projected tokens' similarity has rank 256, above every pick count below (past the kernel's
# rank the greedy's gains are float noise, in the official code as here)
HIDDEN = 256
BUDGETS = {"v1.5": (64, 128, 192), "v1.6": (16, 32, 64)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdpruner")
    out = {}
    for version in ("v1.5", "v1.6"):
        path = build_tiny_llava(str(root / version), version, hidden=HIDDEN, layers=2)
        out[version] = load_pretrained_model(path, None, None, device="cpu", attn_implementation="sdpa")
    return out


def left_padded(tokenizer, questions):
    ids = [prompt_ids(tokenizer, q) for q in questions]
    longest = max(len(i) for i in ids)
    batch = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for row, sample in enumerate(ids):
        batch[row, longest - len(sample) :] = sample
        mask[row, longest - len(sample) :] = 1
    return batch, mask


@pytest.fixture(scope="module")
def spliced(models):
    """Per version: the left-padded batch of 3 (different images, prompts, lengths) and each sample alone."""
    images = make_images()
    out = {}
    for version, (tokenizer, model, processor, _) in models.items():
        model.set_visual_compression(None)
        batch, mask = left_padded(tokenizer, QUESTIONS)
        pixels = process_images(images, processor, model.config)
        with torch.no_grad():
            both = model.splice_multimodal(batch, pixels, [im.size for im in images], mask, padding_side="left")
        pad = (~both.attention_mask.bool()).sum(dim=1).tolist()
        singles = [
            SplicedInputs(both.inputs_embeds[row : row + 1, p:], None, None, None, both.visual_mask[row : row + 1, p:])
            for row, p in enumerate(pad)
        ]
        out[version] = (both, singles, pad)
    return out


def run_fast(model, inputs, cache=None, use_cache=False):
    with torch.no_grad():
        out = model.get_model().pruned_forward(
            inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, cache, use_cache, inputs.visual_mask,
            model.llm_pruner(),
        )
    return model.lm_head(out.last_hidden_state), out


def same_rows(embeds: torch.Tensor, a, b) -> bool:
    """Whether positions ``a`` and ``b`` of ``embeds`` (N, C) hold the same embeddings, as multisets (ties
    of the greedy between bit-identical tokens -- NeXT's image newlines -- resolve by float noise)."""
    rows = lambda index: sorted(map(tuple, embeds[sorted(index)].tolist()))  # noqa: E731
    return rows(a) == rows(b)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_fast_path_matches_the_official_code_batch_1_and_3(version, models, spliced):
    """The same kept positions and logits as the re-enactment, batch 1 and a left-padded batch 3. LLaVA-NeXT's
    image newlines are bit-identical tokens: once the greedy reaches them their gains tie exactly and float
    rounding picks one (the official's own choice among them moves with the batch's shapes); there the
    kept tokens must be the same embeddings (as a multiset) and the logits are compared where the
    positions agree too."""
    _, model, _, _ = models[version]
    both, singles, pad = spliced[version]
    view_tokens = model.get_vision_tower().num_patches
    exact = 0
    for budget in BUDGETS[version]:
        model.set_visual_compression(f"cdpruner:{budget}")
        batch_logits, batch_out = run_fast(model, both)
        for row, single in enumerate(singles):
            visual = single.visual_mask[0]
            count = int(visual_keep_counts(visual.sum().view(1), budget, view_tokens))
            ref_logits, ref_kept = official_cdpruner(model.get_model(), model.lm_head, single.inputs_embeds,
                                                     single.visual_mask, count)
            assert int(visual[ref_kept].sum()) == count < int(visual.sum())
            logits, out = run_fast(model, single)
            assert out.kept_valid.all()
            valid = batch_out.kept_valid[row]
            runs = [(out.kept_index[0], logits[0]), (batch_out.kept_index[row][valid] - pad[row], batch_logits[row][valid])]
            for kept, kept_logits in runs:  # batch 1, then the sample's rows of batch 3
                if kept.tolist() == ref_kept.tolist():
                    exact += 1
                    torch.testing.assert_close(kept_logits, ref_logits[0], atol=1e-4, rtol=0)
                else:
                    assert version == "v1.6", (budget, row)
                    assert same_rows(single.inputs_embeds[0], kept.tolist(), ref_kept.tolist()), (budget, row)
    assert exact == 18 if version == "v1.5" else exact >= 6


def test_official_selection_normalises_over_the_whole_batch_we_per_sample():
    """What the official does with a batch (views): one min-max over all of them, so a view's selection
    depends on the others; ours per sample equals the official at batch size 1, the only size it runs."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 40, 16, generator=gen)
    features[1] *= 3.0  # different scales across views
    text = torch.randn(5, 16, generator=gen)
    visual = torch.ones(2, 40, dtype=torch.bool)
    text_mask = torch.ones(2, 5, dtype=torch.bool)
    embeds = torch.cat([features, text.expand(2, -1, -1)], dim=1)
    ours = cdpruner_select(embeds, torch.cat([visual, ~text_mask], 1), torch.cat([~visual, text_mask], 1),
                           torch.tensor([8, 8]))[:, :40]
    for b in range(2):
        alone = official_cdpruner_selection(features[b : b + 1], features[b : b + 1], text, 8)
        assert ours[b].tolist() == alone[0].tolist()
    # the relevance: -mean cosine, min-max per sample (max -> 1 + 1e-6 / spread, min -> 1e-6 / spread)
    relevance = conditional_relevance(features, visual, text.expand(2, -1, -1), text_mask)
    cosine = torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    expected = -cosine.mean(-1)
    spread = expected.max(1, keepdim=True).values - expected.min(1, keepdim=True).values
    expected = (expected - expected.min(1, keepdim=True).values + 1e-6) / spread
    torch.testing.assert_close(relevance, expected, atol=1e-5, rtol=1e-5)
    flipped = conditional_relevance(features, visual, text.expand(2, -1, -1), text_mask, invert=False)
    assert flipped[0].argmax() == relevance[0].argmin()


def test_instruction_text_and_prompts_without_text():
    visual = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    text = instruction_mask(visual, valid)
    assert text.long().tolist() == [[0, 0, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]]
    # no text at all: relevance 1 (a pure diversity DPP), no division by zero
    features = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(1))
    relevance = conditional_relevance(features, torch.ones(1, 10, dtype=torch.bool), features[:, :1],
                                      torch.zeros(1, 1, dtype=torch.bool))
    assert relevance.tolist() == [[1.0] * 10]
    keep = cdpruner_select(features, torch.ones(1, 10, dtype=torch.bool), torch.zeros(1, 10, dtype=torch.bool),
                           torch.tensor([4]))
    assert int(keep.sum()) == 4


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_decoding_on_the_pruned_cache_equals_replaying_the_kept_tokens_without_cache(version, models, spliced):
    """All layers cache the kept tokens only; decoding (caller positions and mask, as generate passes them)
    equals a no-cache forward of each sample's kept tokens + the new ones at contiguous positions."""
    _, model, _, _ = models[version]
    both, _, _ = spliced[version]
    model.set_visual_compression("cdpruner:16")
    llm = model.get_model()
    cache = DynamicCache(config=model.config)
    _, prefill = run_fast(model, both, cache=cache, use_cache=True)
    new_ids = torch.tensor([[5, 9], [7, 11], [13, 17]])
    mask, positions = both.attention_mask.bool(), both.position_ids
    decoded = []
    with torch.no_grad():
        for step in range(2):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
            positions = positions[:, -1:] + 1
            out = llm.pruned_forward(llm.embed_tokens(new_ids[:, step : step + 1]), mask, positions, prefill.cache,
                                     True, None, model.llm_pruner())
            decoded.append(model.lm_head(out.last_hidden_state[:, -1]))
        for row in range(3):
            kept = prefill.kept_index[row][prefill.kept_valid[row]]
            replay = torch.cat([both.inputs_embeds[row, kept], llm.embed_tokens(new_ids[row])])[None]
            out = llm.pruned_forward(replay, None, None, None, False, None, None)
            expected = model.lm_head(out.last_hidden_state[0, -2:])
            torch.testing.assert_close(torch.stack([d[row] for d in decoded]), expected, atol=1e-4, rtol=0)


def test_generate_from_images_batched_equals_one_by_one(models, spliced):
    tokenizer, model, processor, _ = models["v1.5"]
    model.set_visual_compression("cdpruner:32")
    images = make_images()
    batch, mask = left_padded(tokenizer, QUESTIONS)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    _, singles, _ = spliced["v1.5"]
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, images=process_images(images, processor, model.config),
                                  image_sizes=[im.size for im in images], **kwargs)
        for row, single in enumerate(singles):
            alone = model.generate(inputs_embeds=single.inputs_embeds, visual_mask=single.visual_mask, **kwargs)
            assert together[row].tolist() == alone[0].tolist()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cdpruner:0", "visual tokens must be >= 1, got 0"),
        ("cdpruner:tokens=0", "tokens must be >= 1, got 0"),
        ("cdpruner:600", "tokens = 600 per view, more than the 576 visual tokens"),
        ("cdpruner:tokens=64,invert_relevance=maybe", "'maybe' is not a boolean"),
        ("cdpruner:tokens=64,theta=0.5", "unknown setting 'theta'"),
    ],
)
def test_bad_settings_raise_before_any_model_runs(spec, message, models):
    _, model, _, _ = models["v1.5"]
    model.set_visual_compression(None)
    before = model.config.visual_compression
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.set_visual_compression(spec)
    assert model.config.visual_compression == before


def test_a_forward_without_the_prompt_embeddings_is_refused():
    pruner = CDPruner(tokens=4).llm_pruner(2)
    assert pruner.layers == (0,) and not pruner.keep_original_positions
    visual = torch.tensor([[True] * 8 + [False] * 2])
    context = PruningContext(0, visual, torch.ones_like(visual), visual.sum(1), lambda q: None)
    with pytest.raises(ValueError, match="needs the prompt's input embeddings"):
        pruner.select(context)


def test_budget_rule_entry_points_and_flops():
    assert "cdpruner" in visionzip.registered_methods()
    settings = CompressionConfig.parse("cdpruner:64").settings
    assert settings == CDPruner(tokens=64, invert_relevance=True)
    assert CompressionConfig.parse(settings.spec()).settings == settings
    assert settings.tokens_per_view() == 64 and settings.llm_input_tokens_per_view(576) == 576
    # every layer sees the kept tokens only (a before-LLM method's cost); NeXT: the same share of 5 views
    assert settings.llm_token_schedule(4, 576) == [64] * 4
    assert settings.llm_token_schedule(2, 5 * 576, view_tokens=576) == [320] * 2
    for family, tokens in (("v1.5", 64), ("v1.6", 320)):
        run = resolve_budget("cdpruner", tokens, family)
        assert run.compression.settings.tokens == 64


@pytest.mark.parametrize("name", ["llava-v1.5-tiny", "llava-v1.6-tiny"])
def test_run_llava_on_the_official_tiny_checkpoints(name, official_checkpoints, tmp_path, capsys):
    from llava.eval.run_llava import main as run_llava

    image = tmp_path / "image.png"
    make_images(sizes=((600, 300),))[0].save(image)  # 3 views on NeXT: fits its 2048 positions unpruned
    argv = ["--model-path", str(official_checkpoints / name), "--image-file", str(image), "--query",
            "What is shown?", "--device", "cpu", "--temperature", "0", "--max_new_tokens", "3"]
    assert run_llava(argv + ["--compression", "cdpruner:64"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_transformers_llava_prunes_before_its_first_layer_as_the_official_code():
    """``visionzip.apply_compression`` on transformers' ``LlavaForConditionalGeneration`` (the generic in-LLM
    path, ``visionzip.decoder_loop``): the prefill's last logits equal the official re-splice of the kept
    tokens run through the same language model, and greedy decoding runs on the pruned cache."""
    from visionzip.hf import compression_aware_processor, tiny

    model, processor = tiny.tiny_llava()
    visionzip.apply_compression(model, "cdpruner:8")  # 8 of the tiny tower's 64 patches
    processor = compression_aware_processor(processor, model)
    image = make_images(sizes=((112, 112),))[0]
    inputs = processor(text="USER: <image>\nwhat is in the picture ASSISTANT:", images=image, return_tensors="pt")
    language_model = model.model.language_model
    captured = []
    hook = language_model.register_forward_pre_hook(lambda m, a, k: captured.append(k), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    visual = inputs["input_ids"] == model.config.image_token_id
    assert int(visual.sum()) == 64  # the model's own placeholders: the drop happens inside the LLM
    expected, kept = official_cdpruner(language_model, model.lm_head, captured[0]["inputs_embeds"], visual, 8)
    assert int(visual[0, kept].sum()) == 8
    torch.testing.assert_close(logits, expected[:, -1], atol=1e-4, rtol=0)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3


def test_chat_prunes_once_and_later_turns_continue_on_the_pruned_cache(models):
    """The image is encoded and pruned in the first turn's prefill (by the first question); the second turn
    runs on the cache that holds the kept tokens only."""
    from llava.serve.chat import ChatSession

    tokenizer, model, processor, _ = models["v1.5"]
    image = make_images(sizes=((336, 336),))[0]
    prefill = {}
    for spec in ("none", "cdpruner:16"):
        model.set_visual_compression(spec)
        session = ChatSession(model, tokenizer, processor)
        session.set_image(image)
        session.ask("What is in the picture?", max_new_tokens=2)
        session.ask("And the colors?", max_new_tokens=2)
        assert session.image_encodes == 1 and session.turns[1].reused_cache
        prefill[spec] = [turn.prefill_tokens for turn in session.turns]
    assert prefill["none"][0] - prefill["cdpruner:16"][0] == 576 - 16  # the cache holds 16 visual tokens
    assert prefill["none"][1] == prefill["cdpruner:16"][1] > 0  # the second turn's text, on the pruned cache
