"""The HF families' CPU bench (``python -m llava.bench.hf_families``): one row per family with the visual
token counts the spec gives, timings present, refusals reported as rows."""
from __future__ import annotations

import pytest

from llava.bench import hf_families


@pytest.fixture(scope="module")
def two_families():
    return hf_families.main(["--families", "llava", "video_llava", "--repeats", "1", "--warmup", "0",
                             "--new-tokens", "2"])


def test_rows_and_compressed_counts_follow_the_spec(two_families):
    rows = {row["family"]: row for row in two_families["rows"]}
    assert list(rows) == ["llava", "video_llava"]
    # LLaVA-1.5: one image of 8 x 8 patches (CLS dropped by the "default" strategy); visionzip:16 per image
    assert rows["llava"]["visual_tokens_vanilla"] == 64
    assert (rows["llava"]["views"], rows["llava"]["visual_tokens_compressed"]) == (1, 16)
    # Video-LLaVA: 8 frames of 64 patches + CLS; visionzip:17 per frame gives the paper's 136 for 8 frames
    assert rows["video_llava"]["visual_tokens_vanilla"] == 8 * 65
    assert (rows["video_llava"]["views"], rows["video_llava"]["visual_tokens_compressed"]) == (8, 136)
    for row in rows.values():
        assert "refused" not in row
        for key in ("prefill_vanilla_s", "prefill_compressed_s", "generate_vanilla_s", "generate_compressed_s"):
            assert len(row[key]) == 1 and row[key][0] > 0


def test_markdown_table_has_a_row_per_family(two_families):
    lines = two_families["markdown"].splitlines()
    body = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert len(body) == 2
    assert body[0].startswith("| LLaVA-1.5 (llava-hf) (`LlavaForConditionalGeneration`)")
    assert "| `visionzip:16` | 64 -> 16 (1 x 16) |" in body[0]
    assert "| `visionzip:17` | 520 -> 136 (8 x 17) |" in body[1]
    assert "Tiny random models" in lines[0] and "1 timed calls" in lines[0]


def test_a_method_the_family_refuses_is_a_row_saying_why():
    row = hf_families.run_family(hf_families.FAMILIES["internvl"], "tome", repeats=1, warmup=0, new_tokens=1)
    assert row["visual_tokens_vanilla"] == 80  # 2 x 2 tiles + thumbnail, 16 units each
    assert "tome" in row["refused"] and "prefill_compressed_s" not in row
    assert "refused: " in hf_families.markdown_table([row], {"device": "cpu", "threads": 1, "repeats": 1, "warmup": 0,
                                                              "new_tokens": 1})


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="--repeats must be >= 1, got 0"):
        hf_families.main(["--families", "llava", "--repeats", "0"])
    with pytest.raises(ValueError, match="nosuch"):
        hf_families.run_family(hf_families.FAMILIES["llava"], "nosuch", repeats=1, warmup=0, new_tokens=1)


def test_an_in_llm_method_keeps_the_placeholders_and_reports_what_the_last_layer_sees():
    row = hf_families.run_family(hf_families.FAMILIES["qwen2_5_vl"], "fastv:tokens=16,layer=1", repeats=1, warmup=0,
                                 new_tokens=1)
    assert "refused" not in row and row["in_llm"]
    # 64 merged tokens in the LLM's input; FastV keeps 16 of them from layer 1 on (per sample on Qwen2.5-VL)
    assert (row["visual_tokens_vanilla"], row["visual_tokens_compressed"]) == (64, 16)
    table = hf_families.markdown_table([row], {"device": "cpu", "threads": 1, "repeats": 1, "warmup": 0, "new_tokens": 1})
    assert "| 64 -> 16 in the LLM's last layer |" in table
