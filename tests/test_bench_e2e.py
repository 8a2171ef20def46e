"""The benchmark harness end to end on tiny models (tiny numbers; nothing here asserts a timing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llava.bench import main
from llava.bench.geometry import llm_layer_flops
from llava.model.tiny import build_tiny_llava

OURS = "visionzip:dominant=54,contextual=10"  # our side of the official row, as the canonical spec prints it
FAST = ["--in-process", "--repeats", "1", "--warmup", "0", "--new-tokens", "2"]


@pytest.fixture(scope="module")
def tiny_v15(tmp_path_factory):
    return build_tiny_llava(str(tmp_path_factory.mktemp("bench") / "llava-v1.5-tiny"), "v1.5", seed=0)


def test_harness_on_tiny_llava15(tiny_v15, tmp_path):
    out_json, out_png, out_md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    result = main(["--model", tiny_v15, *FAST, "--methods", "none", "official:visionzip:54,10", "vispruner:64",
                   "--json", str(out_json), "--plot", str(out_png), "--markdown", str(out_md)])
    rows = {r["method"]: r for r in result["rows"]}
    # vanilla first, and our side of the official comparison added
    assert [r["method"] for r in result["rows"]] == ["none", OURS, "official:visionzip:54,10", "vispruner:64"]
    vanilla, zipped, official, pruned = (rows[k] for k in ("none", OURS, "official:visionzip:54,10", "vispruner:64"))

    # token counts as the model spliced them
    assert (vanilla["visual_tokens"], zipped["visual_tokens"], pruned["visual_tokens"]) == (576, 64, 64)
    assert vanilla["seq_len"] == 576 + 64 and official["visual_tokens"] == 64
    # FLOPs: the paper's formula with the checkpoint's widths, for its 2 layers
    with open(os.path.join(tiny_v15, "config.json")) as handle:
        config = json.load(handle)
    d, m, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    assert vanilla["llm_flops"] == layers * llm_layer_flops(640, d, m)
    assert zipped["flops_vs_vanilla"] == pytest.approx(llm_layer_flops(128, d, m) / llm_layer_flops(640, d, m))
    # the KV cache the model actually built is the analytic size
    for row in (vanilla, zipped, pruned):
        assert row["kv_cache_mib"] == pytest.approx(row["kv_cache_analytic_mib"])
    assert zipped["kv_vs_vanilla"] == pytest.approx(128 / 640)
    # every stage measured
    for key in ("tower_s", "step_s", "projector_s", "prefill_s", "decode_s_per_token", "ttft_s", "generate_s"):
        assert vanilla[key] > 0 and zipped[key] > 0, key
    assert zipped["generated_tokens"] == 2  # min_new_tokens: random weights cannot stop early
    assert "ttft_s" not in official and official["ours_speedup_vs_official"] > 0

    # the lean path, as audited: ours has no full attention map, no one-hot merge, no host sync, and
    # stops after the scored layer; the official re-enactment has 24 maps and the one-hot product
    for row in (zipped, pruned):
        assert row["audit_full_attention_maps"] == 0 and row["audit_host_syncs"] == 0, row["method"]
        assert row["audit_layers_run"] == 23 and row["audit_tower_passes"] == 1
    assert not zipped["audit_dense_one_hot_merge"]
    assert official["audit_full_attention_maps"] == 24 and official["audit_dense_one_hot_merge"]
    assert official["audit_layers_run"] == 24

    saved = json.loads(out_json.read_text())
    assert saved["meta"]["llm_layers"] == layers and len(saved["rows"]) == 4
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out_md.read_text()
    assert "| 1 | visionzip 54+10 | 64 |" in text and "Ours vs the official path" in text


def test_harness_anyres_batch_in_one_tower_pass():
    result = main(["--geometry", "tiny-next", *FAST, "--batch", "2", "--image-size", "672x336",
                   "--methods", "none", "visionzip:27,5", "--stages", "prefill", "audit"])
    vanilla, zipped = result["rows"]
    # 672 x 336 = base view + 1 x 2 crops: 576 + 24 rows x (48 + newline) vanilla; 3 x (27 + 5) compressed
    assert vanilla["views_per_sample"] == 3
    assert (vanilla["visual_tokens"], zipped["visual_tokens"]) == (576 + 24 * 49, 96)
    # the 2 x 3 views go through the tower together
    assert zipped["audit_tower_passes"] == 1 and zipped["audit_request_tower_passes"] == 1
    assert zipped["kv_cache_mib"] == pytest.approx(zipped["kv_cache_analytic_mib"])
    assert "generate_s" not in zipped and "step_s" not in zipped  # stages left out


def test_cli_runs_each_row_in_its_own_process(tmp_path):
    out_json = tmp_path / "rows.json"
    command = [sys.executable, "-m", "llava.bench", "--geometry", "tiny", "--layers", "1", "--methods", "none",
               "visionzip:108,20", "--stages", "prefill", "--repeats", "1", "--warmup", "0",
               "--json", str(out_json)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 1 | visionzip 108+20 | 128 |" in done.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["llm_layers"] for r in rows] == [1, 1]
    assert rows[1]["prefill_speedup"] > 0 and rows[1]["flops_vs_vanilla"] < 1


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--geometry", "llava-1.5-7b", "--batch", "0"])
    with pytest.raises(SystemExit):
        main(["--geometry", "no-such-model"])
    with pytest.raises(ValueError, match="visual tokens must be >= 2, got 1"):
        main(["--geometry", "tiny", *FAST, "--methods", "visionzip:1"])


def test_compiled_rows_measure_the_captured_image_path_beside_eager(tmp_path):
    # --compile (aot_eager on the CPU): the compiled row times the image path's stages 1-2 captured and eager,
    # vanilla and compressed, in one run, with the roofline of each; the eager rows' original-tower call
    # (hidden states asked for) does not push the captured path back to eager
    out_md = tmp_path / "bench.md"
    result = main(["--geometry", "tiny", "--layers", "1", *FAST, "--compile", "--compile-backend", "aot_eager",
                   "--methods", "none", "visionzip:54,10", "--stages", "vision", "generate",
                   "--markdown", str(out_md)])
    rows = {(r["method"], bool(r.get("compiled"))): r for r in result["rows"]}
    vanilla, zipped = rows[("none", True)], rows[("visionzip:54,10", True)]
    assert rows[("none", False)]["original_tower_s"] > 0  # the eager rows ran their original-tower call first
    for row in (vanilla, zipped):
        assert row["image_path_eager"] is None, row["image_path_eager"]
        assert row["image_tower_min_s"] <= row["image_tower_s"] <= row["image_tower_max_s"]
        assert row["image_tower_s"] > 0 and row["eager_image_tower_s"] > 0
        assert row["image_tower_vs_bound"] == row["image_tower_s"] / row["image_tower_bound_s"]
        assert row["generated_tokens"] == 2
    assert "image_step_s" not in vanilla  # nothing to compress on the vanilla row
    assert zipped["image_step_vs_tower"] == zipped["image_step_s"] / zipped["image_tower_s"]
    assert zipped["eager_image_step_vs_tower"] == zipped["eager_image_step_s"] / zipped["eager_image_tower_s"]
    assert zipped["image_step_bound_s"] == zipped["image_tower_bound_s"]  # the step's bound is the tower's work
    assert rows[("visionzip:54,10", False)]["step_vs_bound"] > 0
    text = out_md.read_text()
    assert "| 1 | visionzip 54+10 +compile | " in text and "eager step / tower" in text and "step / bound" in text
