"""The compiled inference path (llava.model.compiled) against eager generation on the tiny LLaVA-1.5 and
LLaVA-NeXT checkpoints: same greedy tokens for a left-padded batch of 2 under vanilla and every
vision-side method (image path captured, random excepted), prefill logits within tolerance, multi-turn chat, the entry points end to end (run_llava; the
eval engine with a batch of 2), and the refusals of every in-LLM method.

Compilation here uses ``backend="aot_eager"``: the same dynamo trace (fullgraph, static shapes, the
static cache mutated in place) as the default inductor backend, without inductor's C++ code generation,
which takes minutes on a 2-core CPU (a manual inductor run on the NeXT model with VisPruner gave the same
tokens). Tolerance: float32 on CPU; the compiled prefill runs on a bucket-padded sequence and a static
cache of more slots, so SDPA reduces over more (masked, exactly zero) entries in other blocks: 1e-4.

Test time (docs/architecture.md, "Test time"): tracing costs about the same per tower layer whatever the
width, and the tiny checkpoints keep ViT-L/14-336's 24 layers. The official checkpoints carry the
representative captures (VisionZip and VisPruner, both versions, prefill and decode, the image path as one
graph); the per-method captures, the chat, the runner's graph bookkeeping and the entry points (which build
runners of their own) use ``shallow_models``: the same builder, versions, 336 px geometry (576 patches +
CLS) and methods at 64 tokens, with a 5-layer tower (the shallowest where ToMe reaches 64 tokens: 4 merge
layers); one runner per version is shared by the per-method cases, so their LLM graphs (same shapes) are
traced once.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.compiled import MAX_IMAGE_GRAPHS, CompiledLlava, bucket_length, check_compilable
from llava.model.tiny import build_tiny_llava

BACKEND = "aot_eager"
NEW_TOKENS = 6
COMPRESSIONS = ["none", "visionzip:54,10", "vispruner:32"]


@pytest.fixture(scope="module")
def models(official_checkpoints):
    root = official_checkpoints
    out = {"root": root}
    for version in ("v1.5", "v1.6"):
        tokenizer, model, processor, _ = load_pretrained_model(str(root / f"llava-{version}-tiny"), None, None,
                                                               device="cpu")
        out[version] = SimpleNamespace(tokenizer=tokenizer, model=model, processor=processor,
                                       compiled=CompiledLlava(model, backend=BACKEND))
    return out


# the shallowest tower on which every vision-side method reaches 64 tokens (ToMe: 4 merge layers at -2)
SHALLOW_VISION_LAYERS = 5


@pytest.fixture(scope="module")
def shallow_models(tmp_path_factory):
    """Tiny LLaVA-1.5 and LLaVA-NeXT checkpoints built here with a ``SHALLOW_VISION_LAYERS``-layer tower (see
    the module docstring), each with a compiled runner (aot_eager) shared by the tests that use it."""
    root = tmp_path_factory.mktemp("shallow-checkpoints")
    out = {}
    for version in ("v1.5", "v1.6"):
        path = build_tiny_llava(str(root / f"llava-{version}-shallow"), version, seed=0,
                                vision_layers=SHALLOW_VISION_LAYERS)
        tokenizer, model, processor, _ = load_pretrained_model(path, None, None, device="cpu")
        assert model.get_vision_tower().config.num_hidden_layers == SHALLOW_VISION_LAYERS
        out[version] = SimpleNamespace(path=path, tokenizer=tokenizer, model=model, processor=processor,
                                       compiled=CompiledLlava(model, backend=BACKEND))
    return out


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")


def left_padded_batch(entry):
    """Two prompts of different lengths, left-padded, and two images of different sizes."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in [(500, 375), (336, 700)]]
    ids = [prompt_ids(entry.tokenizer, q) for q in ("What is in the picture?", "Describe the colors in detail, please.")]
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):] = x
        mask[row, width - len(x):] = 1
    assert mask[0].sum() != mask[1].sum()  # really padded
    pixels = process_images(images, entry.processor, entry.model.config)
    return input_ids, mask, pixels, [im.size for im in images]


def eager_prompt(entry, input_ids, mask, pixels, sizes):
    """What ``model.generate`` hands to transformers after the image path: embeddings, mask, positions."""
    with torch.no_grad():
        spliced = entry.model.splice_multimodal(input_ids, pixels, sizes, mask, padding_side="left")
    return spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compiled_greedy_tokens_equal_eager(models, version, compression):
    # the image path (eager in both) runs once; the LLM side is compared from the same embeddings
    entry = models[version]
    entry.model.set_visual_compression(None if compression == "none" else compression)
    embeds, mask, positions = eager_prompt(entry, *left_padded_batch(entry))
    common = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    with torch.no_grad():
        eager = entry.model.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     do_sample=False, **common)
    compiled = entry.compiled.generate_from_embeddings(embeds, mask, **common)
    assert compiled.shape == (2, NEW_TOKENS)
    assert torch.equal(compiled, eager)


def test_compiled_generate_from_ids_and_images_equals_eager(models):
    # the whole entry point (image path included), twice: the second request reuses cache and graphs
    entry = models["v1.5"]
    entry.model.set_visual_compression("visionzip:54,10")
    input_ids, mask, pixels, sizes = left_padded_batch(entry)
    common = dict(attention_mask=mask, images=pixels, image_sizes=sizes, max_new_tokens=NEW_TOKENS,
                  min_new_tokens=NEW_TOKENS, pad_token_id=0)
    with torch.no_grad():
        eager = entry.model.generate(input_ids, do_sample=False, **common)
    assert torch.equal(entry.compiled.generate(input_ids, **common), eager)
    assert torch.equal(entry.compiled.generate(input_ids, **common), eager)


@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_prefill_logits_within_tolerance(models, version):
    entry = models[version]
    entry.model.set_visual_compression("visionzip:54,10")
    input_ids, mask, pixels, sizes = left_padded_batch(entry)
    with torch.no_grad():
        embeds, prompt_mask = entry.compiled.prompt_embeddings(input_ids, pixels, sizes, mask)
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
        eager = entry.model(inputs_embeds=embeds, attention_mask=prompt_mask, position_ids=positions).logits[:, -1]
        session = entry.compiled.session(batch=2, max_cache_len=512)
        compiled = session.feed(embeds, prompt_mask)
    assert embeds.shape[1] < bucket_length(embeds.shape[1])  # the bucket padding is exercised
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_multi_turn_chat_compiled_equals_eager(shallow_models):
    from llava.serve.chat import ChatSession

    entry = shallow_models["v1.5"]
    entry.model.set_visual_compression("visionzip:54,10")
    image = Image.fromarray((np.random.default_rng(5).random((300, 400, 3)) * 255).astype("uint8"))
    replies = {}
    for name, compiled in (("eager", None), ("compiled", entry.compiled)):
        chat = ChatSession(entry.model, entry.tokenizer, entry.processor, compiled=compiled, max_cache_len=1024)
        chat.set_image(image)
        replies[name] = [chat.ask(q, max_new_tokens=5, temperature=0) for q in ("What is it?", "And the color?")]
        replies[name + "_stats"] = chat.turns
    assert replies["compiled"] == replies["eager"]
    assert replies["compiled_stats"] == replies["eager_stats"]
    assert replies["compiled_stats"][1].reused_cache  # the second turn continued on the static cache


def test_in_llm_methods_are_refused_by_name(models, monkeypatch):
    entry = models["v1.5"]
    monkeypatch.setattr(entry.model, "get_visual_compression", lambda: SimpleNamespace(stage="llm", method="fastv"))
    with pytest.raises(ValueError, match="in-LLM compression method 'fastv'"):
        check_compilable(entry.model)
    with pytest.raises(ValueError, match="'fastv'"):
        entry.compiled.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_buckets_and_limits(models):
    assert [bucket_length(n) for n in (1, 64, 65, 600, 4096, 5000)] == [64, 64, 128, 1024, 4096, 8192]
    with pytest.raises(ValueError, match="at least 1 token, got 0"):
        bucket_length(0)
    entry = models["v1.5"]
    entry.model.set_visual_compression(None)
    # the cache bookkeeping needs no compilation: backend "eager" runs the same static-cache code
    session = CompiledLlava(entry.model, backend="eager").session(batch=1, max_cache_len=100)
    embeds = entry.model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    session.feed(embeds)  # 3 tokens take a bucket of 64 slots
    assert session.get_seq_length() == 3 and session.slots_used == 64
    session.feed(embeds)  # a second bucket of 64 no longer fits, the 3 tokens do: fed at their length
    assert session.get_seq_length() == 6 and session.slots_used == 67
    longer = entry.model.get_input_embeddings()(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="holds 100 slots: 67 are used and this input needs 64 more"):
        session.feed(longer)
    with pytest.raises(ValueError, match="num_beams=2 needs eager"):
        entry.compiled.generate(torch.tensor([[1, 2, 3]]), num_beams=2)
    with pytest.raises(ValueError, match="buckets must be ascending"):
        CompiledLlava(entry.model, backend=BACKEND, buckets=(128, 64))


# ----- the bench's roofline and compiled ratios (no model) -------------------------------------------
def test_roofline_counts_hand_computed():
    from llava.bench.roofline import DevicePeaks, add_bounds, decode_cost, prefill_cost, tower_cost

    shape = {"shape_hidden": 4, "shape_intermediate": 8, "shape_kv_width": 2, "shape_vocab": 10, "shape_layers": 3,
             "shape_bytes_per_value": 2, "shape_tower_hidden": 2, "shape_tower_intermediate": 4,
             "shape_tower_layers_run": 1, "shape_tower_patches": 4, "shape_patch": 1}
    # per layer 2 d^2 + 2 d kv + 3 d m = 32 + 16 + 96 = 144 weights; LM head 40: (3 * 144 + 40) * 2 bytes
    weights = (3 * 144 + 40) * 2
    # prefill B=2, n=5: 3 * 2 * (2 * 5 * 144 + 2 * 25 * 4) + 2 * 2 * 4 * 10; KV written 2 * 3 * 2 * 5 * 2 * 2
    assert prefill_cost(shape, 2, 5) == (3 * 2 * (1440 + 200) + 160, weights + 240)
    # decode B=1 at context 7: 3 * (2 * 144 + 4 * 7 * 4) + 2 * 4 * 10; KV read 2 * 3 * 7 * 2 * 2
    assert decode_cost(shape, 1, 7) == (3 * (288 + 112) + 80, weights + 168)
    # tower, 2 views of 5 tokens: layer 2 * 5 * (16 + 16) + 4 * 25 * 2 = 520, patch embedding 2 * 4 * 3 * 2 = 48
    assert tower_cost(shape, 2) == (2 * (520 + 48), (16 + 16) * 2)

    peaks = DevicePeaks("test", flops_per_s=1e3, bytes_per_s=1e2, source="given")
    row = {**shape, "batch": 1, "views_per_sample": 1, "seq_len": 5, "prefill_s": 20.0, "decode_s_per_token": 1.0}
    add_bounds([row], peaks, new_tokens=4)
    flops, num_bytes = prefill_cost(shape, 1, 5)
    assert row["prefill_bound_s"] == max(flops / 1e3, num_bytes / 1e2)
    assert row["prefill_bound_by"] == "memory" and row["prefill_vs_bound"] == 20.0 / row["prefill_bound_s"]
    assert row["decode_bound_s"] == bound_of(decode_cost(shape, 1, 5 + 2), peaks)
    assert "tower_bound_s" not in row  # no tower measurement in this row


def bound_of(cost, peaks):
    return max(cost[0] / peaks.flops_per_s, cost[1] / peaks.bytes_per_s)


def test_compiled_rows_compare_to_their_eager_rows():
    from llava.bench.report import add_ratios

    rows = [
        {"batch": 1, "method": "none", "generate_s": 4.0, "prefill_s": 2.0},
        {"batch": 1, "method": "visionzip:64", "generate_s": 2.0, "prefill_s": 1.0},
        {"batch": 1, "method": "none", "compiled": True, "generate_s": 1.0, "prefill_s": 1.0},
        {"batch": 1, "method": "visionzip:64", "compiled": True, "generate_s": 0.5, "prefill_s": 0.25},
    ]
    add_ratios(rows)
    assert rows[3]["prefill_speedup"] == 4.0  # vs the compiled vanilla row
    assert rows[3]["compiled_prefill_speedup"] == 4.0 and rows[3]["compiled_generate_speedup"] == 4.0
    assert rows[3]["generate_speedup_vs_eager_vanilla"] == 8.0
    assert rows[1]["prefill_speedup"] == 2.0 and "compiled_prefill_speedup" not in rows[1]


def test_sampling_choices():
    from llava.model.compiled import pick_token

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pick_token(logits, False, None, None), logits.argmax(dim=-1))
    # top-p this small keeps only the most likely token: sampling is then greedy
    torch.manual_seed(0)
    assert torch.equal(pick_token(logits, True, 0.7, 1e-6), logits.argmax(dim=-1))
    assert pick_token(logits, True, 1.0, None).shape == (3,)
    with pytest.raises(ValueError, match="temperature > 0, got 0"):
        pick_token(logits, True, 0, None)


def test_entry_points_take_one_compile_flag(models, monkeypatch):
    from llava.eval import generate, run_llava
    from llava.model.compiled import generate_function
    from llava.serve import cli

    assert run_llava.build_parser().parse_args(["--model-path", "m", "--image-file", "f", "--query", "q",
                                                "--compile"]).compile
    assert not cli.build_parser().parse_args(["--model-path", "m", "--image-file", "f"]).compile  # off by default
    assert generate.build_parser().parse_args(["--format", "vqa", "--model-path", "m", "--question-file", "q",
                                               "--answers-file", "a", "--compile"]).compile
    model = models["v1.5"].model
    assert generate_function(model, False) == model.generate
    assert isinstance(generate_function(model, True).__self__, CompiledLlava)
    monkeypatch.setattr(model, "get_visual_compression", lambda: SimpleNamespace(stage="llm", method="pdrop"))
    with pytest.raises(ValueError, match="'pdrop'"):
        generate_function(model, True)


# every in-LLM method, with settings that fit the 2-layer tiny LLM
@pytest.mark.parametrize("spec", ["fastv:64,1", "pdrop:layers=1,ratios=0.5", "sparsevlm:layers=0,counts=64"])
def test_registered_in_llm_methods_are_refused(models, spec):
    entry = models["v1.5"]
    entry.model.set_visual_compression(spec)
    try:
        name = spec.split(":")[0]
        with pytest.raises(ValueError, match=f"in-LLM compression method '{name}'"):
            generate_function_for(entry.model)
        with pytest.raises(ValueError, match=f"'{name}'"):
            ChatSession_compiled(entry).ask("What is it?")
    finally:
        entry.model.set_visual_compression(None)


def generate_function_for(model):
    from llava.model.compiled import generate_function

    return generate_function(model, True)


def ChatSession_compiled(entry):  # noqa: N802 - reads as the class it builds
    from llava.serve.chat import ChatSession

    chat = ChatSession(entry.model, entry.tokenizer, entry.processor, compiled=entry.compiled, max_cache_len=1024)
    chat.image = Image.new("RGB", (336, 336))  # the refusal comes before any image work
    chat.image_features = None
    return chat


def test_run_llava_compile_flag_end_to_end_equals_eager(shallow_models, tmp_path):
    # the whole entry point on a LLaVA-NeXT (anyres) checkpoint with VisionZip: --compile aot_eager (the
    # inductor default takes minutes to build on a small CPU) gives eager's greedy reply
    from llava.eval import run_llava
    from llava.model.compiled import compile_backend

    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(7).random((300, 420, 3)) * 255).astype("uint8")).save(image)
    argv = ["--model-path", shallow_models["v1.6"].path, "--image-file", str(image), "--query",
            "What is shown?", "--temperature", "0", "--max_new_tokens", "5", "--device", "cpu",
            "--compression", "visionzip:54,10"]
    parser = run_llava.build_parser()
    assert parser.parse_args(argv).compile is None and parser.parse_args(argv + ["--compile"]).compile == "inductor"
    assert compile_backend(True) == "inductor" and compile_backend(False) is None
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--compile", "tensorrt"])
    eager = run_llava.eval_model(parser.parse_args(argv))
    compiled = run_llava.eval_model(parser.parse_args(argv + ["--compile", "aot_eager"]))
    assert eager and compiled == eager  # a non-empty reply, the same


def test_eval_engine_compile_batch_of_two_equals_eager(shallow_models):
    # the eval engine (llava.eval.generate) on a LLaVA-NeXT checkpoint: a left-padded batch of 2 with images
    # of different sizes (ragged visual token counts) under VisPruner, compiled (aot_eager) vs eager
    from llava.eval.formats import EvalItem
    from llava.eval.generate import LlavaAnswerer
    from visionzip import CompressionConfig

    rng = np.random.default_rng(11)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in [(640, 300), (300, 520)]]
    items = [EvalItem(key=str(i), question_id=i, question=q, prompt=q, load_image=lambda im=im: im)
             for i, (q, im) in enumerate(zip(["What is this?", "Which colors are in the picture, roughly?"], images))]
    answers = {}
    for compile in (None, "aot_eager"):
        answerer = LlavaAnswerer(shallow_models["v1.6"].path, None, "vicuna_v1",
                                 CompressionConfig.parse("vispruner:32"), "cpu", "float32", max_new_tokens=5,
                                 compile=compile)
        answers[compile] = answerer(items)
    assert all(tokens > 0 for _, tokens in answers[None])  # tokens were decoded: a real comparison
    assert answers["aot_eager"] == answers[None]


# ----- the image path (tower + compression + projector) as one captured graph -------------------------
def test_encoder_loop_equals_the_models_own_forward(official_dir):
    # adapter.run's explicit layer loop (what torch.compile captures) against the model's own forward
    # with capture hooks (early_exit=False): the same tensors, for CLIP (pre-layer norm, CLS) and SigLIP
    from transformers import CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    import visionzip

    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=4, image_size=32, patch_size=8,
                                                  attn_implementation="sdpa")).eval()
    clip = CLIPVisionModel.from_pretrained(str(official_dir / "clip-vit-tiny-336"), attn_implementation="sdpa").eval()
    for tower in (clip, siglip):
        adapter = visionzip.encoder_adapter(tower)
        pixels = torch.randn(2, 3, adapter.image_size, adapter.image_size).clamp(-2, 2)
        for select_layer in (-2, -1, 1):
            with torch.no_grad():
                loop = adapter.run(pixels, select_layer)
                own = adapter.run(pixels, select_layer, early_exit=False)
            assert loop.layer_index == own.layer_index
            assert torch.equal(loop.hidden, own.hidden), (type(tower).__name__, select_layer)
            assert torch.equal(loop.attn_input, own.attn_input), (type(tower).__name__, select_layer)
        assert adapter.run(pixels, -2, capture_attn_input=False).attn_input is None


def test_image_path_is_one_graph_equal_to_eager(models):
    # tower + VisionZip scoring, selection and merge + projector for a fixed (batch, budget): one graph
    # (fullgraph=True: a break would raise), with the ops of every stage in it, and eager's tensors
    model = models["v1.5"].model
    model.set_visual_compression("visionzip:54,10")
    views = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    try:
        with torch.no_grad():
            eager = model.project_views(views)
            traced = torch.compile(model.project_views, backend=counting_backend, fullgraph=True, dynamic=False)(views)
    finally:
        model.set_visual_compression(None)
    assert len(graphs) == 1
    ops = {str(node.target) for node in graphs[0].graph.nodes}
    # patch embedding, SDPA layers, top-k selection, contextual assignment and merge, projector
    assert {"topk", "argmax", "scatter_add_"} <= ops
    assert any("conv2d" in op for op in ops) and any("scaled_dot_product_attention" in op for op in ops)
    assert traced.tokens.shape == (2, 64, model.config.hidden_size)
    assert torch.equal(traced.tokens, eager.tokens)
    assert torch.equal(traced.compressed.keep_indices, eager.compressed.keep_indices)
    assert torch.equal(traced.compressed.tokens, eager.compressed.tokens)


def test_compiled_runner_captures_the_image_path_per_batch_and_budget(shallow_models, caplog):
    # the runner's image path: torch.compile(fullgraph=True, backend="aot_eager") per (batch, budget), eager's
    # tensors bit for bit (the 24-layer tower's capture: test_compiled_generate_from_ids_and_images_equals_eager)
    import logging

    model = shallow_models["v1.5"].model
    runner = CompiledLlava(model, backend=BACKEND)
    views = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(2)).clamp(-2, 2)
    try:
        for spec in ("visionzip:54,10", "visionzip:27,5"):  # another budget: a graph of its own
            model.set_visual_compression(spec)
            with torch.no_grad():
                eager = model.project_views(views)
                for _ in range(2):  # the second call replays the same graph
                    assert torch.equal(runner.project_views(views).tokens, eager.tokens)
        assert runner.captured_image_paths == 2 and runner.eager_image_paths == {}
        # random seeds a torch.Generator per view while it runs: dynamo cannot capture that; it runs eagerly,
        # with one warning naming it, and the same tokens
        model.set_visual_compression("random:64")
        spec = model.get_visual_compression().spec()
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="llava.model.compiled"):
            first = runner.project_views(views).tokens
            second = runner.project_views(views).tokens
        assert torch.equal(first, model.project_views(views).tokens) and torch.equal(first, second)
        assert list(runner.eager_image_paths) == [spec] and runner.captured_image_paths == 2
        assert sum(spec in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING) == 1
    finally:
        model.set_visual_compression(None)


def test_many_prefill_shapes_never_reach_dynamos_recompile_limit(models):
    # dynamo allows 8 graphs per code object and, under fullgraph=True, fails the 9th; the runner gives each
    # (batch, length, cache length) a code object of its own. 10 prefill lengths + the decode step here.
    model = models["v1.5"].model
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    runner = CompiledLlava(model, backend=counting_backend, buckets=tuple(range(1, 17)))
    hidden = model.config.hidden_size
    with torch.no_grad():
        for n in range(2, 12):
            embeds = torch.randn(1, n, hidden, generator=torch.Generator().manual_seed(n)) * 0.02
            session = runner.session(1, 16)
            logits = session.feed(embeds)
            decoded = session.feed(embeds[:, -1:])
            eager_prefill = model(inputs_embeds=embeds).logits[:, -1]
            eager_decode = model(inputs_embeds=torch.cat([embeds, embeds[:, -1:]], dim=1)).logits[:, -1]
            torch.testing.assert_close(logits, eager_prefill, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(decoded, eager_decode, rtol=1e-4, atol=1e-4)
    assert runner.captured_llm_graphs == 11 and len(graphs) == 11


# every vision-side method's image path dynamo can capture, except random (a torch.Generator per view)
UNCAPTURED_IMAGE_PATHS = {"random"}


def vision_side_methods() -> list[str]:
    from visionzip import get_method, registered_methods

    return [m for m in registered_methods() if get_method(m).stage != "llm"]


def test_vision_side_methods_include_the_known_ones():
    assert {"visionzip", "vispruner", "tome", "prumerge", "prumerge+", "pooling", "random"} <= set(vision_side_methods())


@pytest.mark.parametrize("method", vision_side_methods())
@pytest.mark.parametrize("version", ["v1.5", "v1.6"])
def test_every_vision_side_method_compiled_end_to_end_equals_eager(shallow_models, version, method):
    # the whole runner (image path captured per method, splice, compiled prefill and decode) on a left-padded
    # batch of 2 with images of different sizes: eager's greedy tokens for every registered method that acts
    # before the LLM (the in-LLM ones are refused by name: test_registered_in_llm_methods_are_refused); the
    # version's runner is shared by the methods (one image graph each; the LLM graphs are the same shapes)
    entry = shallow_models[version]
    runner = entry.compiled
    input_ids, mask, pixels, sizes = left_padded_batch(entry)
    common = dict(attention_mask=mask, images=pixels, image_sizes=sizes, max_new_tokens=NEW_TOKENS,
                  min_new_tokens=NEW_TOKENS, pad_token_id=0)
    captured_before = runner.captured_image_paths
    try:
        entry.model.set_visual_compression(f"{method}:64")
        spec = entry.model.get_visual_compression().spec()
        with torch.no_grad():
            eager = entry.model.generate(input_ids, do_sample=False, **common)
        assert torch.equal(runner.generate(input_ids, **common), eager), method
    finally:
        entry.model.set_visual_compression(None)
    # captured as one graph (fullgraph: a graph break raises), or, for the known exceptions only, eager
    assert (spec in runner.eager_image_paths) == (method in UNCAPTURED_IMAGE_PATHS), runner.eager_image_paths
    captured_now = captured_before if method in UNCAPTURED_IMAGE_PATHS else min(captured_before + 1, MAX_IMAGE_GRAPHS)
    assert runner.captured_image_paths == captured_now
