"""The toy's contrastive tower (llava.toy.clip): trained the way CLIP is, its [CLS] attention concentrates.

A smaller tower than the main job's (112 px: 8 x 8 patches + CLS, 3 layers, 32 wide, the toy's CLIP
config otherwise) is trained contrastively for a few seconds. Asserted: captions of held-out scenes are
retrieved far above chance, and the [CLS] attention of the trained tower is more concentrated than that
of its own random initialisation (the share held by the top 10 % of the patches), the premise of the
[CLS]-attention methods (VisionZip Fig. 2) that a random tower lacks."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava.toy.clip import (
    CAPTION_WORDS,
    TEXT_CAPTION_WORDS,
    ClipSettings,
    caption_ids,
    cls_attention_shares,
    pixel_batch,
    shares_table,
    train_clip_tower,
)
from llava.toy.task import NUMBER_WORDS, caption, make_scene

SIDE = 112
# 40 steps of 32 scenes: about 80 s on 2 cores under a load of 10 (8 engineers' jobs), seconds on quiet
# cores. Measured with seed 0: loss 4.44 -> 1.79, retrieval 28.1 % (chance 2.8 %), top-10 % share of the
# [CLS] attention per layer 19.7 / 15.5 / 15.4 % trained against 10.7 / 10.6 / 10.3 % random
SETTINGS = ClipSettings(steps=40, batch_size=32, learning_rate=2e-3)


def tower_config(layers: int = 3) -> CLIPVisionConfig:
    """The toy tower's config (``llava.model.tiny``'s: 4 heads, quick_gelu) at 112 px."""
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                              image_size=SIDE, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    config._attn_implementation = "sdpa"
    return config


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    untrained = CLIPVisionModel(tower_config()).eval()
    trained = copy.deepcopy(untrained)
    training = train_clip_tower(trained, SETTINGS, seed=0, printer=lambda *a, **k: None)
    return untrained, trained, training


def test_captions_state_the_scene_facts():
    for seed in range(30):
        scene = make_scene(seed, SIDE)
        text = caption(scene, random.Random(seed))
        words = text.split()
        assert NUMBER_WORDS[len(scene.objects)] in words and scene.objects[0].colour in words
        assert f"in the {scene.half} half" in text
        for obj in scene.objects:
            assert obj.shape in text
        ids = caption_ids(text)
        assert [CAPTION_WORDS[i] for i in ids[: len(words)]] == words and ids[len(words)] == 0
    with pytest.raises(ValueError, match="exceeds"):
        caption_ids("red " * 30)
    for seed in range(30):  # the text question's scenes: the word is named, in the vocabulary with it
        scene = make_scene(seed, SIDE, words=True)
        text = caption(scene, random.Random(seed))
        assert f"the word {scene.word}" in text
        ids = caption_ids(text, vocabulary=TEXT_CAPTION_WORDS)
        assert [TEXT_CAPTION_WORDS[i] for i in ids[: len(text.split())]] == text.split()


def test_contrastive_tower_retrieves_held_out_captions(towers):
    _untrained, _trained, training = towers
    first, last = sum(training.losses[:3]) / 3, sum(training.losses[-3:]) / 3
    assert last < first - 1.0, training.losses
    # far above chance (a caption's facts are shared by about 1 in 36 held-out scenes)
    assert training.retrieval >= max(5 * training.chance, 15), (training.retrieval, training.chance)


def test_trained_cls_attention_is_more_concentrated_than_random(towers):
    untrained, trained, _training = towers
    scenes = [make_scene(10_000 + i, SIDE) for i in range(16)]
    pixels = pixel_batch(scenes)
    before, after = cls_attention_shares(untrained, pixels), cls_attention_shares(trained, pixels)
    assert len(before) == len(after) == 3
    for layer in before:  # a random tower's [CLS] attends nearly uniformly: the top 10 % hold about 10 %
        assert layer[10] < 16, before
    # the last layer's [CLS] is what the loss reads: its attention gathers on the shapes' patches
    assert after[-1][10] > before[-1][10] + 3, (before, after)
    assert max(layer[10] for layer in after) > max(layer[10] for layer in before) + 5, (before, after)
    table = shares_table([("random", before), ("trained", after)])
    assert table.count("| random |") == table.count("| trained |") == 3 and "(-2: LLaVA's features)" in table


def test_shares_are_computed_from_each_layers_queries_and_keys(towers):
    """The per-layer share equals the one from the tower's own eager attention maps (the check that the
    q/k recomputation reads the right layer's input)."""
    _untrained, trained, _training = towers
    pixels = pixel_batch([make_scene(7, SIDE)])
    shares = cls_attention_shares(trained, pixels, tops=(10,))
    eager = copy.deepcopy(trained)
    eager.set_attn_implementation("eager")  # a copy, for this check only: the product never asks for maps
    with torch.no_grad():
        maps = eager(pixel_values=pixels, output_attentions=True).attentions
    for index, attention in enumerate(maps):
        row = attention[0, :, 0, 1:].mean(0)
        row = row / row.sum()
        top = row.sort(descending=True).values[: round(row.numel() * 0.1)].sum()
        assert shares[index][10] == pytest.approx(100 * float(top), abs=1e-3)
