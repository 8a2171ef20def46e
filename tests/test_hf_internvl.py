"""InternVL (transformers' class: InternViT with CLS and qk-norm, pixel shuffle, tiles): compression on the
pixel-shuffle units scored by the CLS attention with unit-mean keys, per-tile budgets, the compression-aware
processor, batched = one by one, other vision methods, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import visionzip
import visionzip.hf
from visionzip import CompressionConfig
from visionzip.encoders import attention_implementation
from visionzip.hf import internvl
from visionzip.hf.tiny import tiny_internvl

SPEC = "visionzip:dominant=6,contextual=2"
TEXT = ["USER: <IMG_CONTEXT> describe it", "USER: <IMG_CONTEXT> what color"]


def images():
    """A wide image (2 tiles + thumbnail = 3 tiles) and a square one (1 tile)."""
    return [
        np.random.RandomState(0).randint(0, 255, (60, 130, 3), dtype=np.uint8),
        np.random.RandomState(1).randint(0, 255, (100, 100, 3), dtype=np.uint8),
    ]


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = tiny_internvl()
    return model, processor


@pytest.fixture()
def compressed(model_and_processor):
    model, processor = model_and_processor
    visionzip.apply_compression(model, SPEC)
    yield model, processor, visionzip.hf.compression_aware_processor(processor, model)
    visionzip.apply_compression(model, "none")


def test_units_are_hf_pixel_shuffle_of_the_patch_grid(model_and_processor):
    model, processor = model_and_processor
    adapter = internvl.tower_adapter(model)
    assert adapter.tower_has_cls and not adapter.has_cls
    assert (adapter.patch_side, adapter.patches_per_side, adapter.num_tokens) == (8, 4, 16)
    # unit (i, j) holds patches (2i, 2j), (2i, 2j + 1), (2i + 1, 2j), (2i + 1, 2j + 1) of the 8 x 8 grid
    assert adapter.unit_members()[[0, 1, 4]].tolist() == [[0, 1, 8, 9], [2, 3, 10, 11], [16, 17, 24, 25]]
    pixels = processor(images=images(), text=TEXT, return_tensors="pt", padding=True)["pixel_values"]
    assert pixels.shape[0] == 4
    with torch.no_grad():
        vanilla = model.model.get_image_features(pixel_values=pixels).pooler_output  # no compression installed
        units = adapter.run(pixels, -1).hidden
        torch.testing.assert_close(model.model.multi_modal_projector(units), vanilla)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(adapter.run(pixels, -2).hidden, adapter.shuffle(hidden[-2][:, 1:]))
        # use_mean_pooling=False checkpoints put a final LayerNorm into last_hidden_state (layer -1)
        tower = model.model.vision_tower
        identity, tower.layernorm = tower.layernorm, torch.nn.LayerNorm(32)
        try:
            torch.nn.init.normal_(tower.layernorm.weight)
            vanilla = model.model.get_image_features(pixel_values=pixels).pooler_output
            torch.testing.assert_close(model.model.multi_modal_projector(adapter.run(pixels, -1).hidden), vanilla)
        finally:
            tower.layernorm = identity


def reference_unit_scores(model, pixels, layer: int) -> torch.Tensor:
    """Eager attention maps of the tower (the test's independent path): the CLS row's log-attention over
    the patches, averaged over each 2 x 2 unit (= the mean logit up to a per-head constant), softmax over
    the units, mean over heads. (V, U)."""
    tower = model.model.vision_tower
    with torch.no_grad(), attention_implementation(tower, "eager"):
        attn = tower(pixels, output_attentions=True).attentions[layer]  # (V, H, 1 + P, 1 + P)
    log_cls = attn[:, :, 0, 1:].log()
    side = 8
    grid = log_cls.reshape(*log_cls.shape[:2], side // 2, 2, side // 2, 2)
    unit_logits = grid.mean(dim=(3, 5)).flatten(2)  # (V, H, U) row-major units
    return unit_logits.softmax(dim=-1).mean(dim=1)


def test_tiles_keep_the_budget_scored_by_cls_attention_over_units(compressed):
    model, processor, _ = compressed
    pixels = processor(images=images(), text=TEXT, return_tensors="pt", padding=True)["pixel_values"]
    settings = CompressionConfig.parse(SPEC).settings
    adapter = internvl.tower_adapter(model)
    with torch.no_grad():
        out = settings.encode(adapter, pixels, -1)
        features = model.model.get_image_features(pixel_values=pixels).pooler_output
        units = adapter.run(pixels, -1).hidden
    assert out.tokens.shape == (4, 8, 128) and out.keep_indices.shape == (4, 6) and not out.cls_kept
    expected = reference_unit_scores(model, pixels, -1).topk(6, dim=1).indices.sort(dim=1).values
    assert out.keep_indices.tolist() == expected.tolist()
    dominant = units.gather(1, out.keep_indices[..., None].expand(-1, -1, units.shape[-1]))
    torch.testing.assert_close(out.tokens[:, :6], dominant)
    assert features.shape == (4, 8, model.config.text_config.hidden_size)  # every tile its own 8
    torch.testing.assert_close(features, model.model.multi_modal_projector(out.tokens))


def test_aware_processor_batched_equals_one_by_one_and_generates(compressed):
    model, processor, aware = compressed
    batch = aware(images=images(), text=TEXT, return_tensors="pt", padding=True)
    image_id = model.config.image_token_id
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [3 * 8, 1 * 8]
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][1])
    start = tokens.index("<img>")
    assert tokens[start : start + 10] == ["<img>"] + ["<IMG_CONTEXT>"] * 8 + ["</img>"]
    assert internvl.placeholder_counts(model, CompressionConfig.parse(SPEC).settings, {"num_patches": [3, 1]}) == [24, 8]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        assert features.shape[0] * features.shape[1] == int((batch["input_ids"] == image_id).sum())
        batched = model(**batch).logits[:, -1]
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        for row, (image, text) in enumerate(zip(images(), TEXT)):
            single = aware(images=[image], text=[text], return_tensors="pt")
            torch.testing.assert_close(model(**single).logits[:, -1], batched[row : row + 1], atol=1e-4, rtol=1e-4)
            alone = model.generate(**single, max_new_tokens=3, do_sample=False)[:, -3:]
            assert alone.tolist() == generated[row : row + 1].tolist()


@pytest.mark.parametrize("spec", ["vispruner:4", "pooling:4"])
def test_other_vision_methods_run_through_their_own_compress(model_and_processor, spec):
    model, processor = model_and_processor
    visionzip.apply_compression(model, spec)
    try:
        aware = visionzip.hf.compression_aware_processor(processor, model)
        batch = aware(images=images(), text=TEXT, return_tensors="pt", padding=True)
        assert (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [3 * 4, 1 * 4]
        adapter = internvl.tower_adapter(model)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
            units = adapter.run(batch["pixel_values"], -1).hidden
            assert features.shape[:2] == (4, 4)
            if spec.startswith("pooling"):  # 2 x 2 average pooling of the 4 x 4 unit grid
                grid = units.transpose(1, 2).reshape(4, -1, 4, 4)
                pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
                torch.testing.assert_close(features, model.model.multi_modal_projector(pooled))
            else:  # VisPruner keeps 4 of the 16 units as they are
                projected = model.model.multi_modal_projector(units)
                distance = torch.cdist(features, projected).min(dim=-1).values
                assert float(distance.max()) < 1e-4
            assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[0] == 2
    finally:
        visionzip.apply_compression(model, "none")


def test_bad_input_is_named_before_the_language_model(compressed):
    model, processor, _ = compressed
    with pytest.raises(ValueError, match="dominant \\+ contextual = 18 exceeds the 16 tokens"):
        visionzip.visionzip(model, 16, 2)
    with pytest.raises(ValueError, match="tome acts inside the vision tower"):
        visionzip.apply_compression(model, "tome:8")
    assert visionzip.hf.current_compression(model) == CompressionConfig.parse(SPEC)  # refused ones changed nothing
    unaware = processor(images=images(), text=TEXT, return_tensors="pt", padding=True)
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="64 image placeholder tokens but visionzip:dominant=6,contextual=2 gives 32 image features"):
            model(**unaware)
    finally:
        handle.remove()
    assert calls == []
    visionzip.visionzip(model, 6, 2)  # the helper accepts the class too
    assert visionzip.hf.current_compression(model) == CompressionConfig.parse(SPEC)


def test_compressed_image_features_compile_to_one_graph_equal_to_eager():
    # the adapter's explicit loop (no hooks, no exception to stop early): torch.compile(fullgraph=True)
    # captures tower + unit scoring + selection + merge + projector as one graph (a break would raise), with
    # eager's tensors (aot_eager: the same kernels, traced). A model of its own: once a tower has been asked
    # for hidden_states / attentions (the tests above), transformers keeps output-capturing hooks on its
    # layers that read a ContextVar, which dynamo cannot trace (the eager path is unaffected)
    model, processor = tiny_internvl()
    visionzip.apply_compression(model, SPEC)
    pixels = processor(images=images(), text=TEXT, return_tensors="pt", padding=True)["pixel_values"]
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda gm, _: gm.forward)(graph_module, example_inputs)

    with torch.no_grad():
        eager = model.model.get_image_features(pixel_values=pixels)
        compiled = torch.compile(model.model.get_image_features, backend=counting_backend, fullgraph=True, dynamic=False)
        traced = compiled(pixel_values=pixels)
    assert len(graphs) == 1
    ops = {str(node.target) for node in graphs[0].graph.nodes}
    assert {"topk"} <= ops and any("conv2d" in op for op in ops)  # patch embedding through the top-k selection
    assert traced.pooler_output.shape == (4, 8, model.config.text_config.hidden_size)
    assert torch.equal(traced.pooler_output, eager.pooler_output)
    assert torch.equal(traced.last_hidden_state, eager.last_hidden_state)


def test_complete_forward_capture_equals_the_loop(model_and_processor):
    # early_exit=False (DeepSpeed ZeRO-3: the tower's own complete forward, hooks) gives the loop's tensors
    model, processor = model_and_processor
    adapter = internvl.tower_adapter(model)
    pixels = processor(images=images(), text=TEXT, return_tensors="pt", padding=True)["pixel_values"]
    with torch.no_grad():
        for layer in (-1, -2):
            loop, own = adapter.run(pixels, layer), adapter.run(pixels, layer, early_exit=False)
            assert torch.equal(loop.hidden, own.hidden) and torch.equal(loop.attn_input, own.attn_input)
    assert adapter.run(pixels, -1, capture_attn_input=False).attn_input is None
