"""Every registered method on both model paths, and the in-LLM methods on every Hugging Face family.

- The official tiny LLaVA-1.5 checkpoint (fixture ``official_checkpoints``), converted to llava-hf with
  ``llava.convert to-hf``, gives the same greedy tokens in our LLaVA stack and in transformers'
  ``LlavaForConditionalGeneration`` for every registered method (vision-side methods through the HF
  adapter's features, in-LLM methods through ``visionzip.decoder_loop``), batch 1 and a left-padded
  batch of 2 (different images, different prompt lengths). (Both paths run one decoder loop,
  ``visionzip.decoder_loop``: our LLaVA's ``pruned_forward`` calls it.)
- Every in-LLM method runs on every family's tiny model (``visionzip.hf.tiny``): Llama (LLaVA, NeXT,
  Video-LLaVA, OneVision, InternVL), Qwen2.5-VL's M-RoPE text model, Mistral and Qwen2 (LLaVA-1.5 on those
  LLMs), generate's cached decoding equals the no-cache replay of the prefill's selection, and keeping
  every visual token equals the unpruned model.
"""
from __future__ import annotations

import pytest
import torch
from llm_method_cases import ReplayPruner
from transformers import LlavaForConditionalGeneration

import visionzip
from llava.bench.hf_families import FAMILIES
from llava.conversation import get_conv_template
from llava.convert import to_hf
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from visionzip import CompressionConfig
from visionzip.decoder_loop import pruned_decoder_forward, pruned_prefix
from visionzip.hf.base import family_of, llm_pruner
from visionzip.methods import get_method, registered_methods

QUESTIONS = ("What is in the picture? Describe it.", "Colors?")
NEW_TOKENS = 6


def in_llm(method: str) -> bool:
    return get_method(method).stage == "llm"


def two_layer_spec(method: str, tokens: int) -> str:
    """The method's paper settings for 64 tokens per view with ``tokens`` kept; for an in-LLM method whose
    rule places its layers deeper than a 2-layer LLM allows (FastV's K = 2, PyramidDrop's quarters,
    SparseVLM's layers 2 / 6 / 15), the same budget on the layers a 2-layer LLM has (its last stage's
    share on layer 1, or the sparse layer 0): the method's own settings, shifted, not another method."""
    settings = CompressionConfig.parse(f"{method}:64").settings
    values = settings.to_dict()
    if "tokens" in values:
        values["tokens"] = tokens
    settings = type(settings)(**values)
    if settings.stage != "llm":
        return settings.spec()
    try:
        settings.check_llm(2)
        return settings.spec()
    except ValueError:
        pass
    if "counts" in values:  # sparse layers: the visual tokens leave after layer L, so L <= depth - 2
        values.update(layers=(0,), counts=(tokens,))
    elif "ratios" in values:
        values.update(layers=(1,), ratios=(values["ratios"][-1],))
    elif "layer" in values:
        values.update(layer=1)
    changed = type(settings)(**values)
    changed.check_llm(2)
    return changed.spec()


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# ----- the converted checkpoint: our LLaVA stack vs llava-hf ------------------------------------------
@pytest.fixture(scope="module")
def both_paths(official_checkpoints):
    root = official_checkpoints
    to_hf(str(root / "llava-v1.5-tiny"), str(root / "hf-v1.5"))
    tokenizer, ours, image_processor, _ = load_pretrained_model(
        str(root / "llava-v1.5-tiny"), None, "llava-v1.5-tiny", device="cpu", torch_dtype=torch.float32,
        attn_implementation="sdpa",
    )
    hf = LlavaForConditionalGeneration.from_pretrained(str(root / "hf-v1.5"), dtype=torch.float32).eval()
    from test_llava_parity import fixture_images

    images = fixture_images()[:2]
    pixels = process_images(images, image_processor, ours.config)
    prompts = []
    for question in QUESTIONS:
        conv = get_conv_template("vicuna_v1")
        conv.append_message(conv.roles[0], "<image>\n" + question)
        conv.append_message(conv.roles[1], None)
        prompts.append(tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt"))
    assert len(prompts[0]) != len(prompts[1])  # the batch is padded
    return tokenizer, ours, hf, images, pixels, prompts


# methods whose batch is by definition not its samples one by one: random draws view b of a call with
# seed + b (visionzip/methods/random_tokens.py), so sample b alone is compared with seed + b
BATCH_DEPENDENT = ("random",)


def hf_ids(prompt: torch.Tensor, count: int, image_token_id: int) -> list[int]:
    ids = prompt.tolist()
    at = ids.index(-200)
    return ids[:at] + [image_token_id] * count + ids[at + 1 :]


@pytest.mark.parametrize("method", registered_methods())
def test_our_stack_and_llava_hf_give_the_same_greedy_tokens(method, both_paths):
    tokenizer, ours, hf, images, pixels, prompts = both_paths
    spec = two_layer_spec(method, 64)
    eos = tokenizer.eos_token_id
    ours.set_visual_compression(spec)
    visionzip.apply_compression(hf, spec)
    try:
        with torch.no_grad():
            count = len(hf.model.get_image_features(pixel_values=pixels[:1]).pooler_output[0])
        settings = CompressionConfig.parse(spec).settings
        assert count == settings.llm_input_tokens_per_view(576), (spec, count)
        rows = [hf_ids(p, count, hf.config.image_token_id) for p in prompts]
        width = max(len(r) for r in rows)
        pad = hf.config.text_config.pad_token_id or 0
        batch = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        ours_width = max(len(p) for p in prompts)
        ours_batch_ids = torch.stack([torch.cat([torch.zeros(ours_width - len(p), dtype=torch.long), p]) for p in prompts])
        ours_mask = torch.stack([torch.arange(ours_width) >= ours_width - len(p) for p in prompts]).long()
        with torch.no_grad():
            hf_batch = hf.generate(input_ids=batch, attention_mask=mask, pixel_values=pixels, **kwargs)[:, width:]
            ours_batch = ours.generate(ours_batch_ids, images=pixels, image_sizes=[im.size for im in images],
                                       attention_mask=ours_mask, **kwargs)
            for row, (prompt, image) in enumerate(zip(prompts, images)):
                in_batch = until_eos(ours_batch[row].tolist(), eos)
                assert until_eos(hf_batch[row].tolist(), eos) == in_batch, f"{method} ({spec}), sample {row}: batch of 2"
                if method in BATCH_DEPENDENT:  # view b of a batch draws as view 0 alone with seed + b
                    alone = type(settings)(**{**settings.to_dict(), "seed": settings.seed + row}).spec()
                    ours.set_visual_compression(alone)
                    visionzip.apply_compression(hf, alone)
                single = torch.tensor([rows[row]])
                hf_single = hf.generate(input_ids=single, pixel_values=pixels[row : row + 1], **kwargs)[0, single.shape[1] :]
                ours_single = ours.generate(prompt[None], images=pixels[row : row + 1], image_sizes=[image.size], **kwargs)[0]
                expected = until_eos(ours_single.tolist(), eos)
                assert until_eos(hf_single.tolist(), eos) == expected, f"{method} ({spec}), sample {row}: HF vs our stack"
                assert in_batch == expected, f"{method} ({spec}), sample {row}: batch of 2 vs one by one"
    finally:
        ours.set_visual_compression(None)
        visionzip.apply_compression(hf, "none")


IN_LLM = [m for m in registered_methods() if in_llm(m)]


def llava_on(text_config_class):
    """LLaVA-1.5's tiny model with another LLM of transformers' (Mistral, Qwen2), same sizes and weights seed."""

    def sample(spec):
        from transformers import LlavaConfig

        from visionzip.hf import tiny

        base, processor = tiny.tiny_llava()
        text = base.config.text_config.to_dict()
        for key in ("model_type", "architectures", "_name_or_path", "transformers_version"):
            text.pop(key, None)
        torch.manual_seed(0)
        config = LlavaConfig(vision_config=base.config.vision_config, text_config=text_config_class(**text),
                             image_token_id=base.config.image_token_id)
        model = LlavaForConditionalGeneration(config).eval()
        from llava.bench import hf_families

        return hf_families._with_processor(model, processor, spec, hf_families.PROMPT.format(placeholder="<image>"),
                                           hf_families._image(112, 112))

    return sample


def family_cases():
    from transformers import MistralConfig, Qwen2Config

    cases = {key: case.sample for key, case in FAMILIES.items()}
    cases["llava_mistral"] = llava_on(MistralConfig)
    cases["llava_qwen2"] = llava_on(Qwen2Config)
    return cases


CASES = family_cases()


@pytest.mark.parametrize("family", list(CASES))
def test_each_in_llm_method_runs_and_cached_decoding_equals_the_no_cache_replay(family):
    for method in IN_LLM:
        spec = two_layer_spec(method, 8)
        sample = CASES[family](spec)
        model, inputs = sample.model, sample.inputs
        language_model = family_of(model).inner(model).language_model
        captured = []
        hook = language_model.register_forward_pre_hook(lambda m, a, k, seen=captured: seen.append(k), with_kwargs=True)
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
        finally:
            hook.remove()
        generated = out.sequences[:, inputs["input_ids"].shape[1] :]
        prefill = captured[0]
        cache = captured[-1]["cache"]
        assert pruned_prefix(cache) is not None, (family, spec)
        ids = inputs["input_ids"]
        token_ids = [getattr(model.config, n) for n in ("image_token_id", "video_token_id")
                     if getattr(model.config, n, None) is not None]
        visual = torch.isin(ids, torch.tensor(token_ids))
        assert int(visual.sum()) == sample.visual_tokens
        embeds, mask, positions = prefill["inputs_embeds"], prefill["attention_mask"], prefill["position_ids"]
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.long)
        if positions is None:
            positions = torch.arange(ids.shape[1])[None]
        replay = ReplayPruner(llm_pruner(family_of(model), model, visionzip.hf.current_compression(model)))
        with torch.no_grad():
            for step, expected in enumerate(out.logits):
                replay.extra = step
                new = language_model.embed_tokens(generated[:, :step])
                full = torch.cat([embeds, new], dim=1)
                full_mask = torch.cat([mask, torch.ones(1, step, dtype=mask.dtype)], dim=1)
                last = positions[..., -1:]
                full_positions = torch.cat([positions, last + 1 + torch.arange(step).expand(*last.shape[:-1], -1)], -1)
                full_visual = torch.cat([visual, torch.zeros(1, step, dtype=torch.bool)], dim=1)
                run = pruned_decoder_forward(language_model, full, full_mask, full_positions, None, False, full_visual, replay)
                if step == 0:
                    assert run.kept_index.shape[1] < ids.shape[1], (family, spec)  # visual tokens were dropped
                logits = model.lm_head(run.last_hidden_state[:, -1])
                torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0, msg=f"{family} {spec} step {step}")
        visionzip.apply_compression(model, "none")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_qwen2"])
def test_keeping_every_visual_token_equals_the_unpruned_model(family):
    """FastV keeping all of a view's tokens runs the pruned loop (drop, cache groups) and must give the
    model's own logits and greedy tokens (M-RoPE positions and decoding positions included)."""
    vanilla = CASES[family](None)
    with torch.no_grad():
        expected = vanilla.model(**vanilla.inputs).logits
        expected_tokens = vanilla.model.generate(**vanilla.inputs, max_new_tokens=4, do_sample=False)
    per_view = max(1, vanilla.visual_tokens // vanilla.views)
    sample = CASES[family](f"fastv:tokens={per_view},layer=1")
    assert torch.equal(sample.inputs["input_ids"], vanilla.inputs["input_ids"])  # the model's own placeholders
    with torch.no_grad():
        logits = sample.model(**sample.inputs).logits
        tokens = sample.model.generate(**sample.inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(tokens, expected_tokens)


@pytest.fixture(scope="module")
def batch_models():
    from visionzip.hf import tiny

    return {"llava_next": tiny.tiny_llava_next(), "qwen2_5_vl": tiny.tiny_qwen2_5_vl()}


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_a_left_padded_batch_equals_its_samples_one_by_one(family, batch_models):
    """Every in-LLM method: a batch of 2 (different images: different view counts on NeXT, different
    M-RoPE grids on Qwen2.5-VL; different prompt lengths, left padding) generates what each sample
    generates alone, through the family's own processor (the model's own placeholder counts)."""
    import numpy as np
    from PIL import Image

    from visionzip.hf import compression_aware_processor

    model, processor = batch_models[family]
    rng = np.random.default_rng(1)
    pics = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in ((224, 112), (112, 168))]
    placeholder = "<image>" if family == "llava_next" else "<|vision_start|><|image_pad|><|vision_end|>"
    prompts = [f"USER: {placeholder} what is in the picture ASSISTANT:", f"USER: {placeholder} describe ASSISTANT:"]
    for method in IN_LLM:
        spec = two_layer_spec(method, 8)
        visionzip.apply_compression(model, spec)
        try:
            aware = compression_aware_processor(processor, model)
            batch = aware(text=prompts, images=pics, return_tensors="pt", padding=True)
            assert not batch["attention_mask"].bool().all()  # left padding in the batch
            with torch.no_grad():
                together = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1] :]
                for row in range(2):
                    alone = aware(text=prompts[row : row + 1], images=pics[row : row + 1], return_tensors="pt")
                    single = model.generate(**alone, max_new_tokens=3, do_sample=False)[:, alone["input_ids"].shape[1] :]
                    eos = model.generation_config.eos_token_id
                    assert until_eos(single[0].tolist(), eos) == until_eos(together[row].tolist(), eos), \
                        f"{family} {spec} sample {row}"
        finally:
            visionzip.apply_compression(model, "none")


@pytest.fixture(scope="module")
def next_paths(official_checkpoints):
    """The official tiny LLaVA-NeXT checkpoint in our stack and converted to llava-hf."""
    root = official_checkpoints
    to_hf(str(root / "llava-v1.6-tiny"), str(root / "hf-v1.6-llm"))
    from transformers import LlavaNextForConditionalGeneration

    tokenizer, ours, image_processor, _ = load_pretrained_model(
        str(root / "llava-v1.6-tiny"), None, "llava-v1.6-tiny", device="cpu", torch_dtype=torch.float32,
        attn_implementation="sdpa",
    )
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(root / "hf-v1.6-llm"), dtype=torch.float32).eval()
    return tokenizer, ours, hf, image_processor


@pytest.mark.parametrize("method", IN_LLM)
def test_llava_next_in_llm_methods_give_the_same_tokens_in_both_paths(method, next_paths):
    """In-LLM methods on LLaVA-NeXT (unpadded crops and image newlines: the visual tokens of both paths,
    the model's own layout): our stack and llava-hf give the same greedy tokens."""
    from test_llava_parity import fixture_images

    tokenizer, ours, hf, image_processor = next_paths
    spec = two_layer_spec(method, 64)
    ours.set_visual_compression(spec)
    visionzip.apply_compression(hf, spec)
    eos = tokenizer.eos_token_id
    try:
        conv = get_conv_template("vicuna_v1")
        conv.append_message(conv.roles[0], "<image>\n" + QUESTIONS[0])
        conv.append_message(conv.roles[1], None)
        prompt = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")
        for image in fixture_images()[2:]:  # 300 x 640: a tall crop grid, unpadded
            pixels = process_images([image], image_processor, ours.config)
            pixels = pixels[0][None] if isinstance(pixels, list) else pixels
            sizes = torch.tensor([[image.size[1], image.size[0]]])  # HF: (height, width)
            with torch.no_grad():
                count = len(hf.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output[0])
                ids = torch.tensor([hf_ids(prompt, count, hf.config.image_token_id)])
                kwargs = dict(max_new_tokens=4, do_sample=False)
                theirs = hf.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, **kwargs)[0, ids.shape[1] :]
                mine = ours.generate(prompt[None], images=pixels, image_sizes=[image.size], **kwargs)[0]
            assert until_eos(theirs.tolist(), eos) == until_eos(mine.tolist(), eos), f"{method} ({spec}) {image.size}"
    finally:
        ours.set_visual_compression(None)
        visionzip.apply_compression(hf, "none")
