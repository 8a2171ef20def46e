"""The real-geometry bench of MGM, Qwen-VL and CogVLM (``llava.bench.families``), on each family's tiny
geometry: the bench's own code path (build, method views, splice, interleaved timing, KV cache, FLOPs), with
the figures it reports checked against what each config implies."""
from __future__ import annotations

import pytest
import torch

from llava.bench import families
from llava.bench.families import FAMILIES, BuildOptions, Settings

BUDGET = 16
FASTV = f"fastv:tokens={BUDGET},layer=1"  # layer 0 sees every token, the later layers the kept ones
METHODS = ("none", f"visionzip:{BUDGET}", f"vispruner:{BUDGET}", FASTV)
TEXT_TOKENS = 12


def _implied(key: str, built) -> dict:
    """What the config says: visual tokens without compression and with a budget of BUDGET, tokens never
    dropped by an in-LLM method, and the LLM's widths (FFN width of the paper's formula)."""
    config = built.model.config
    if key == "mgm-tiny":
        tower = built.model.get_vision_tower().config
        vanilla = (tower.image_size // tower.patch_size) ** 2  # LLaVA's patch tokens, CLS dropped
        compressed, framing, ffn = BUDGET, 0, config.intermediate_size
    elif key == "qwen-vl-tiny":
        vanilla = config.num_queries  # the resampler's queries
        compressed, framing, ffn = BUDGET, 0, config.intermediate_size // 2  # SwiGLU of intermediate_size / 2
    else:
        vision = config.vision_namespace()
        patches = (vision.image_size // vision.patch_size) ** 2
        vanilla, compressed, framing, ffn = patches + 2, BUDGET + 2, 2, config.intermediate_size  # boi + ... + eoi
    return {"vanilla": vanilla, "compressed": compressed, "framing": framing, "ffn": ffn,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def _flops(n: int, hidden: int, ffn: int) -> int:
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * ffn


@pytest.fixture(scope="module", params=["mgm-tiny", "qwen-vl-tiny", "cogvlm-tiny"])
def measured(request):
    key = request.param
    # CogVLM's tower built with 1 of its 2 layers: the reduced-tower path and its label
    options = BuildOptions(dtype=torch.float32, tower_layers=1 if key == "cogvlm-tiny" else None)
    built = FAMILIES[key].build(options)
    # peak memory by RSS: the profiler's sessions ("tensors") would cost seconds here, for figures not checked
    settings = Settings(methods=METHODS, repeats=2, warmup=0, text_tokens=TEXT_TOKENS, memory="rss")
    result = families.run(key, options, settings, built=built)
    return key, built, result


def test_reported_tokens_kv_and_flops_are_what_the_config_implies(measured):
    key, built, result = measured
    implied = _implied(key, built)
    rows = {row["method"]: row for row in result["rows"]}
    layers, hidden, ffn = implied["layers"], implied["hidden"], implied["ffn"]
    per_token_layer = 2 * hidden * 4  # keys and values, float32 (every family here has kv_heads x head_dim = hidden)
    for method, row in rows.items():
        assert "refused" not in row, row
        visual = implied["vanilla"] if method in ("none", FASTV) else implied["compressed"]
        assert row["visual_tokens"] == visual, (key, method)
        n = TEXT_TOKENS + visual
        assert row["seq_len"] == n
        if method == FASTV:
            kept = TEXT_TOKENS + implied["framing"] + BUDGET
            assert row["kv_cache_bytes"] == per_token_layer * (n + (layers - 1) * kept)
            assert row["llm_flops"] == _flops(n, hidden, ffn) + (layers - 1) * _flops(kept, hidden, ffn)
        else:
            assert row["kv_cache_bytes"] == row["kv_cache_bytes_formula"] == per_token_layer * layers * n
            assert row["llm_flops"] == layers * _flops(n, hidden, ffn)
        assert len(row["tower_s"]) == len(row["prefill_s"]) == 2
        assert all(t > 0 for t in row["tower_s"] + row["prefill_s"])
    vanilla = rows["none"]
    for row in rows.values():
        assert row["visual_tokens_ratio"] == row["visual_tokens"] / vanilla["visual_tokens"]
        assert row["kv_cache_bytes_ratio"] == row["kv_cache_bytes"] / vanilla["kv_cache_bytes"]
    assert rows["none"]["visual_tokens_ratio"] == 1.0


def test_table_and_meta_say_what_was_built(measured):
    key, built, result = measured
    meta = result["meta"]
    assert meta["llm_layers_run"] == meta["llm_layers_real"] == built.model.config.num_hidden_layers
    assert meta["params_built"] == sum(p.numel() for p in built.model.parameters())
    assert meta["params_full"] >= meta["params_built"]
    table = families.markdown_table(result)
    assert table.count("\n| `") == len(METHODS)
    if key == "cogvlm-tiny":
        assert meta["tower_layers_reduced"] and meta["params_full"] > meta["params_built"]
        assert "towers REDUCED" in table and "1 of 2 layers" in table
    else:
        assert "towers at full depth" in table


def test_method_views_share_weights_and_keep_their_own_setting(measured):
    key, built, _ = measured
    view = families.method_view(built.model, families.CompressionConfig.parse(f"visionzip:{BUDGET}"))
    assert next(view.parameters()) is next(built.model.parameters())
    assert not families.CompressionConfig.from_dict(getattr(built.model.config, "visual_compression", None)).enabled


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--family", "cogvlm-tiny", "--layers", "0"], "layers must be an integer in [1, 2], got 0"),
        (["--family", "qwen-vl-tiny", "--tower-layers", "9"], "tower_layers must be an integer in [1, 2], got 9"),
        (["--family", "mgm-tiny", "--tower-layers", "1"], "tower_layers must be >= 2 for MGM"),
        (["--family", "mgm-tiny", "--methods", "none", "visionzip:abc"], "visionzip"),
        (["--family", "mgm-tiny", "--repeats", "0"], "repeats must be >= 1, got 0"),
    ],
)
def test_bad_input_is_refused_by_name(argv, message):
    with pytest.raises(SystemExit) as caught:
        families.main(argv)
    assert message in str(caught.value)


def test_a_method_the_family_refuses_is_reported_not_measured():
    result = families.run("qwen-vl-tiny", BuildOptions(dtype=torch.float32),
                          Settings(methods=("none", "tome:16"), repeats=1, warmup=0, text_tokens=TEXT_TOKENS,
                                   memory="rss"))
    refused = result["rows"][1]
    assert "tome" in refused["refused"] and "tower_s" not in refused
    assert "refused: tome" in families.markdown_table(result)
