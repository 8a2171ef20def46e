"""Vision-side baselines (ToMe, PruMerge, PruMerge+, random, pooling): the fast paths against their
reference re-enactments of the official code on tiny random CLIPs in the real ViT-L/14-336 geometry
(24 layers, 577 tokens, hidden 64), batching, LLaVA-NeXT layout, bad budgets."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import visionzip
from visionzip import CompressionConfig
from visionzip.encoders import encoder_adapter
from visionzip.methods.pooling import Pooling, reference_pooling
from visionzip.methods.prumerge import (
    PruMerge,
    PruMergePlus,
    official_prumerge,
    official_prumerge_forward,
)
from visionzip.methods.random_tokens import RandomTokens, reference_random
from visionzip.methods.tome import (
    ToMe,
    check_tome_budget,
    official_tome,
    schedule_violation,
    smallest_budget,
    tome_schedule,
)

HIDDEN = 64
PATCHES = 576


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def random_clip(seed: int, official_dir) -> CLIPVisionModel:
    """A CLIP in the fixture's geometry (ViT-L/14-336 shape, tiny width) with other random weights."""
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig.from_pretrained(official_dir / "clip-vit-tiny-336")).eval()


@pytest.fixture(scope="module")
def clip(official_dir):
    return random_clip(1, official_dir)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(101))


@pytest.fixture(scope="module")
def captures(clip, pixels):
    """Our captures of the selected layer (-2), of the batch and of each view alone (batch 1): the tower
    pass that the encoder-output methods compress (it does not depend on their settings)."""
    adapter = encoder_adapter(clip)
    batched = adapter.run(pixels, -2, capture_attn_input=False)
    alone = [adapter.run(pixels[view : view + 1], -2, capture_attn_input=False) for view in range(3)]
    return batched, alone


@pytest.fixture(scope="module")
def official_forward(clip, pixels):
    """The official PruMerge tower pass (eager, all hidden states, the last layer's q / k)."""
    return official_prumerge_forward(clip, pixels)


def view_of(forward: dict, view: int) -> dict:
    return {key: value[view : view + 1] for key, value in forward.items()}


def tiny_siglip() -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=14
    )
    return SiglipVisionModel(config).eval()


def test_registered_with_their_stages():
    names = visionzip.registered_methods()
    for name, stage in [("tome", "tower"), ("prumerge", "encoder_output"), ("prumerge+", "encoder_output"),
                        ("random", "encoder_output"), ("pooling", "encoder_output")]:
        assert name in names
        assert visionzip.get_method(name).stage == stage
        config = CompressionConfig.parse(f"{name}:64")
        assert config.tokens_per_image == 64
        assert CompressionConfig.parse(config.spec()) == config
        assert CompressionConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["tome", "prumerge", "prumerge+", "random", "pooling"])
def test_compress_entry_point(clip, pixels, name):
    out = visionzip.compress(clip, pixels[:1], CompressionConfig.parse(f"{name}:64"))
    assert out.tokens.shape == (1, 64, HIDDEN)
    assert torch.isfinite(out.tokens).all()
    assert not out.cls_kept and out.has_cls
    assert out.num_kept + out.num_merged == 64


# ----- ToMe ---------------------------------------------------------------------------------------


def test_tome_schedule_reaches_the_budget_exactly():
    for tokens in (64, 128, 192, 24):
        schedule = tome_schedule(PATCHES, tokens, 23)
        assert len(schedule) == 23 and sum(schedule) == PATCHES - tokens
        assert max(schedule) - min(schedule) <= 1 and schedule == sorted(schedule, reverse=True)
    # a shallow tower: the even share (102 of 576 -> 64 over 5 layers) would merge more than half of the
    # last layer's input, so that layer halves its tokens and the earlier ones take the surplus evenly
    for tokens, expected in ((64, [112, 112, 112, 112, 64]), (32, [160, 160, 128, 64, 32])):
        schedule = tome_schedule(PATCHES, tokens, 5)
        assert schedule == expected and schedule_violation(schedule, PATCHES) is None
    assert smallest_budget(PATCHES, 5) == 18 and schedule_violation(tome_schedule(PATCHES, 17, 5), PATCHES)[0] == 0


def test_tome_capped_schedule_matches_official_reenactment(clip, pixels):
    """At a shallow select layer (4: four merging layers) 64 tokens need the capped schedule; the official
    block, given the same per-layer r, merges the same tokens."""
    adapter = encoder_adapter(clip)
    schedule = check_tome_budget(adapter, 64, 4)
    assert schedule[-1] == 64 and sum(schedule) == PATCHES - 64
    reference = official_tome(clip, pixels[:2], schedule, select_layer=4)
    out = ToMe(tokens=64).encode(adapter, pixels[:2], select_layer=4)
    assert out.tokens.shape == (2, 64, HIDDEN)
    torch.testing.assert_close(out.tokens, reference[:, 1:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tokens", [64, 128, 192])
def test_tome_matches_official_reenactment(clip, pixels, tokens):
    adapter = encoder_adapter(clip)
    settings = CompressionConfig.parse(f"tome:{tokens}").settings
    schedule = check_tome_budget(adapter, tokens, -2)
    margins = []
    reference = official_tome(clip, pixels, schedule, margins=margins)
    # the test data has no merge decision within float noise of a tie (SDPA vs eager differ by ~1e-7)
    assert min(float(m.min()) for m in margins) > 1e-6
    assert reference.shape == (3, tokens + 1, HIDDEN)  # the class token, protected, stays first
    out = settings.encode(adapter, pixels)
    assert out.tokens.shape == (3, tokens, HIDDEN) and out.keep_indices.shape == (3, 0)
    torch.testing.assert_close(out.tokens, reference[:, 1:], atol=1e-4, rtol=0)
    single = settings.encode(adapter, pixels[:1])  # batch 1
    torch.testing.assert_close(single.tokens, reference[:1, 1:], atol=1e-4, rtol=0)
    if tokens == 64:
        # batched equals one by one
        for view in (1, 2):
            alone = settings.encode(adapter, pixels[view : view + 1])
            torch.testing.assert_close(alone.tokens[0], out.tokens[view], atol=1e-4, rtol=0)
        # a complete forward (ZeRO-3) gives the same tokens
        complete = settings.encode(adapter, pixels[:1], early_exit=False)
        assert torch.equal(complete.tokens, single.tokens)
        # LLaVA-NeXT's official layout: all tokens merged, so crop after crop
        assert torch.equal(visionzip.official_anyres_layout(out, 1, 3, 24), out.tokens.reshape(-1, HIDDEN))


def test_tome_without_proportional_attention_differs(clip, pixels):
    adapter = encoder_adapter(clip)
    plain = ToMe(tokens=64, prop_attn=False).encode(adapter, pixels[:1])
    reference = official_tome(clip, pixels[:1], check_tome_budget(adapter, 64, -2), prop_attn=False)
    torch.testing.assert_close(plain.tokens, reference[:, 1:], atol=1e-4, rtol=0)
    proportional = ToMe(tokens=64).encode(adapter, pixels[:1])
    assert (plain.tokens - proportional.tokens).abs().max() > 1e-3


def test_tome_bad_budgets(clip):
    adapter = encoder_adapter(clip)
    # 2 merging layers (select_layer 2: the output of the second layer) can at most quarter the 576 patches
    with pytest.raises(ValueError, match=r"tokens = 100 .*half.*smallest budget .* at select_layer 2 is 144"):
        ToMe(tokens=100).check(adapter, 2)
    ToMe(tokens=144).check(adapter, 2)
    with pytest.raises(ValueError, match=r"tokens = 577 exceeds the 576"):
        visionzip.compress(clip, torch.zeros(1, 3, 336, 336), CompressionConfig.parse("tome:577"))
    with pytest.raises(ValueError, match=r"tokens must be >= 1, got 0"):
        CompressionConfig.parse("tome:0")
    with pytest.raises(ValueError, match=r"select_layer=30"):
        ToMe(tokens=64).check(adapter, 30)


# ----- PruMerge / PruMerge+ -----------------------------------------------------------------------


def official_in_sequence_order(tokens: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official output (kept tokens in ``idx`` order, then the extra token) in our order."""
    order = idx.argsort(dim=1, stable=True)
    kept = tokens[:, :-1].gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([kept, tokens[:, -1:]], dim=1), idx.gather(1, order)


def assert_matches_official(out, official):
    tokens, idx = official_in_sequence_order(*official)
    assert out.tokens.shape == tokens.shape
    for ours, theirs in zip((out.keep_indices - 1).tolist(), idx.tolist()):
        assert set(ours) == set(theirs)
    assert torch.equal(out.keep_indices - 1, idx)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-4, rtol=0)


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_prumerge_budgets_match_official_reenactment(clip, pixels, captures, official_forward, plus):
    adapter = encoder_adapter(clip)
    batched, alone = captures
    name = "prumerge+" if plus else "prumerge"
    for tokens in (64, 32, 129):
        settings = CompressionConfig.parse(f"{name}:{tokens}").settings
        out = settings.compress(adapter, batched)
        assert out.tokens.shape == (3, tokens, HIDDEN) and out.num_merged == 1
        assert_matches_official(out, official_prumerge(clip, pixels, plus, budget=tokens, forward=official_forward))
        for view in range(3):  # batch 1, and batched equals one by one
            single = settings.compress(adapter, alone[view])
            assert_matches_official(
                single, official_prumerge(clip, None, plus, budget=tokens, forward=view_of(official_forward, view))
            )
            assert torch.equal(single.keep_indices[0], out.keep_indices[view])
            torch.testing.assert_close(single.tokens[0], out.tokens[view], atol=1e-4, rtol=0)


def test_prumerge_encode_and_other_layer(clip, pixels, captures):
    adapter = encoder_adapter(clip)
    settings = PruMergePlus.from_budget(48)
    encoded = settings.encode(adapter, pixels[:1])
    assert torch.equal(encoded.tokens, settings.compress(adapter, captures[1][0]).tokens)
    # select_layer -1: features and scores from the last layer (the general capture path)
    out = settings.encode(adapter, pixels[:1], select_layer=-1)
    assert_matches_official(out, official_prumerge(clip, pixels[:1], True, budget=48, select_layer=-1))
    with pytest.raises(ValueError, match=r"capture of layer 10 does not give its input"):
        settings.compress(adapter, adapter.run(pixels[:1], 11, capture_attn_input=False))


def test_prumerge_plus_budget_adds_uniform_samples(clip, captures):
    adapter = encoder_adapter(clip)
    plain = PruMerge.from_budget(64).compress(adapter, captures[0])
    plus = PruMergePlus.from_budget(64).compress(adapter, captures[0])
    assert plus.keep_indices.shape == (3, 63)
    for row_plain, row_plus in zip(plain.keep_indices.tolist(), plus.keep_indices.tolist()):
        assert len(set(row_plus)) == 63  # no duplicates: the budget is exact
        assert len(set(row_plain) & set(row_plus)) >= 32  # the top half by attention is shared


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_prumerge_paper_modes_match_official(clip, pixels, captures, official_forward, plus):
    adapter = encoder_adapter(clip)
    batched, alone = captures
    cls = PruMergePlus if plus else PruMerge
    fixed = cls(mode="fixed", ratio=0.125).compress(adapter, batched)
    assert fixed.tokens.shape == (3, (144 if plus else 72) + 1, HIDDEN)  # the paper's 145 / 73
    assert_matches_official(
        fixed, official_prumerge(clip, pixels, plus, if_adaptive=False, reduction_ratio=0.125, forward=official_forward)
    )
    adaptive = cls(mode="adaptive")
    counts = []
    for view in range(3):
        forward = view_of(official_forward, view)
        try:
            official = official_prumerge(clip, None, plus, forward=forward)
        except ZeroDivisionError:  # the official PruMerge+ with no outlier in this view
            with pytest.raises(ValueError, match=r"no CLS-attention outlier"):
                adaptive.compress(adapter, alone[view])
            counts.append(None)
            continue
        out = adaptive.compress(adapter, alone[view])
        assert_matches_official(out, official)
        counts.append(out.tokens.shape[1])
    assert len([c for c in counts if c]) >= 2  # at least two views exercise the adaptive selection
    if None in counts:  # a view without outlier refuses the whole batch
        with pytest.raises(ValueError, match=r"no CLS-attention outlier"):
            adaptive.compress(adapter, batched)
    else:  # the test data's views keep different counts: one call cannot return them
        assert len(set(counts)) > 1
        with pytest.raises(ValueError, match=r"different number of tokens per view in this batch \(\[\d+, \d+, \d+\]\)"):
            adaptive.compress(adapter, batched)


def test_prumerge_bad_settings(clip):
    adapter = encoder_adapter(clip)
    with pytest.raises(ValueError, match=r"tokens = 577 exceeds the 576 patch tokens"):
        visionzip.compress(clip, torch.zeros(1, 3, 336, 336), CompressionConfig.parse("prumerge:577"))
    with pytest.raises(ValueError, match=r"tokens must be >= 3, got 2"):
        CompressionConfig.parse("prumerge+:2")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        CompressionConfig.parse("prumerge:mode=median")
    with pytest.raises(ValueError, match=r"ratio = 0.3 gives 172 top tokens but 192 uniform"):
        PruMergePlus(mode="fixed", ratio=0.3).check(adapter, -2)
    with pytest.raises(ValueError, match=r"has no CLS token"):
        PruMerge.from_budget(8).check(encoder_adapter(tiny_siglip()), -2)


# ----- random and pooling -------------------------------------------------------------------------


def test_random_matches_reference(clip, pixels, captures, official_forward):
    adapter = encoder_adapter(clip)
    batched, alone = captures
    for tokens in (64, 128, 192):
        out = RandomTokens(tokens=tokens, seed=7).compress(adapter, batched)
        reference_tokens, reference_keep = reference_random(official_forward["features"], tokens, seed=7)
        assert torch.equal(out.keep_indices - 1, reference_keep)
        torch.testing.assert_close(out.tokens, reference_tokens, atol=1e-4, rtol=0)
        assert (out.keep_indices.diff(dim=1) > 0).all()  # sequence order, no duplicates
        assert len({tuple(row) for row in out.keep_indices.tolist()}) == 3  # each view its own subset
        # view b alone (batch 1) with seed + b is view b of the batch
        for view in range(3):
            single = RandomTokens(tokens=tokens, seed=7 + view).compress(adapter, alone[view])
            assert torch.equal(single.keep_indices[0], out.keep_indices[view])
            torch.testing.assert_close(single.tokens[0], out.tokens[view], atol=1e-4, rtol=0)


def test_random_seed_matters_and_is_deterministic(clip, pixels, captures):
    adapter = encoder_adapter(clip)
    first = RandomTokens(tokens=64, seed=0).encode(adapter, pixels[:1])
    again = CompressionConfig.parse("random:64").settings.compress(adapter, captures[1][0])
    other = RandomTokens(tokens=64, seed=1).compress(adapter, captures[1][0])
    assert torch.equal(first.keep_indices, again.keep_indices)
    torch.testing.assert_close(first.tokens, again.tokens, atol=1e-5, rtol=0)
    assert not torch.equal(first.keep_indices, other.keep_indices)
    with pytest.raises(ValueError, match=r"tokens = 577 exceeds the 576"):
        RandomTokens(tokens=577).check(adapter, -2)
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        CompressionConfig.parse("random:tokens=8,seed=-1")


def test_pooling_matches_reference(clip, captures, official_forward):
    adapter = encoder_adapter(clip)
    batched, alone = captures
    for tokens, grid in [(64, (8, 8)), (128, (8, 16)), (192, (12, 16))]:
        settings = CompressionConfig.parse(f"pooling:{tokens}").settings
        assert (settings.rows, settings.cols) == grid
        out = settings.compress(adapter, batched)
        assert out.keep_indices.shape == (3, 0) and out.tokens.shape == (3, tokens, HIDDEN)
        torch.testing.assert_close(out.tokens, reference_pooling(official_forward["features"], *grid), atol=1e-4, rtol=0)
        for view in range(3):
            single = settings.compress(adapter, alone[view])
            torch.testing.assert_close(single.tokens[0], out.tokens[view], atol=1e-5, rtol=0)


def test_pooling_bad_grids(clip):
    adapter = encoder_adapter(clip)
    with pytest.raises(ValueError, match=r"1 x 61 grid \(61 tokens\) does not fit the 24 x 24"):
        visionzip.compress(clip, torch.zeros(1, 3, 336, 336), CompressionConfig.parse("pooling:61"))
    with pytest.raises(ValueError, match=r"25 x 2 grid"):
        Pooling(rows=25, cols=2).check(adapter, -2)
    with pytest.raises(ValueError, match=r"rows must be >= 1, got 0"):
        CompressionConfig.parse("pooling:rows=0,cols=4")


def test_encoders_without_cls():
    """SigLIP (no CLS token, 4 x 4 patches): every token is mergeable / selectable."""
    siglip = tiny_siglip()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    adapter = encoder_adapter(siglip)
    tome = ToMe(tokens=8).encode(adapter, pixels, select_layer=-1)
    reference = official_tome(siglip, pixels, check_tome_budget(adapter, 8, -1), select_layer=-1)
    assert tome.tokens.shape == (2, 8, 32) and not tome.has_cls
    torch.testing.assert_close(tome.tokens, reference, atol=1e-4, rtol=0)
    pooled = Pooling(rows=2, cols=2).encode(adapter, pixels, select_layer=-1)
    hidden = siglip(pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(pooled.tokens, reference_pooling(hidden, 2, 2, has_cls=False), atol=1e-5, rtol=0)
    picked = RandomTokens(tokens=5).encode(adapter, pixels, select_layer=-1)
    assert picked.keep_indices.max() < 16 and picked.tokens.shape == (2, 5, 32)
