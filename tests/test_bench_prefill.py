"""``python -m llava.bench.prefill`` end to end on the tiny geometry (tiny numbers; no timing is asserted)."""
from __future__ import annotations

import json

from llava.bench.geometry import llm_layer_flops
from llava.bench.prefill import main


def test_interleaved_prefill_rows_with_breakdown(tmp_path):
    out_json, out_md = tmp_path / "prefill.json", tmp_path / "prefill.md"
    result = main(["--geometry", "tiny", "--repeats", "2", "--warmup", "0", "--breakdown",
                   "--methods", "visionzip:64", "fastv:tokens=64,layer=1", "cdpruner:64",
                   "--json", str(out_json), "--markdown", str(out_md)])
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["none", "visionzip:64", "fastv:tokens=64,layer=1", "cdpruner:64"]  # vanilla added first
    vanilla, zipped, fastv, cdpruner = rows.values()
    assert result["meta"]["llm_layers"] == 2 and result["meta"]["threads"] >= 1
    # every prefill timed in every round, ratios per round to vanilla's
    assert all(len(r["prefill_times_s"]) == 2 and r["prefill_s"] > 0 for r in rows.values())
    assert vanilla["prefill_vs_vanilla"] == 1.0
    # FLOPs: vanilla 640 tokens in both layers; FastV (K = 1) 640 then 128; CDPruner 128 in both
    hidden, intermediate = 128, 256
    assert vanilla["llm_flops"] == 2 * llm_layer_flops(640, hidden, intermediate)
    assert fastv["llm_flops"] == llm_layer_flops(640, hidden, intermediate) + llm_layer_flops(128, hidden, intermediate)
    assert cdpruner["llm_flops"] == zipped["llm_flops"] == 2 * llm_layer_flops(128, hidden, intermediate)
    # the KV cache the prefill leaves: CDPruner's layers hold the kept tokens only, FastV's layer 1 too
    assert cdpruner["kv_cache_mib"] == zipped["kv_cache_mib"] < fastv["kv_cache_mib"] < vanilla["kv_cache_mib"]
    # the selection is seen by the profiler where there is one; the vanilla prefill makes no host sync
    assert vanilla["select_s"] == 0 and zipped["select_s"] == 0
    assert fastv["select_s"] > 0 and cdpruner["select_s"] > 0 and cdpruner["drop_s"] > 0
    assert vanilla["host_syncs"] == 0 and fastv["host_syncs"] > 0
    # CDPruner's greedy: one step of device operators per pick (64 picks) on top of the layers
    assert cdpruner["device_ops"] > vanilla["device_ops"] + 64 * 5
    assert json.loads(out_json.read_text())["rows"][0]["method"] == "none"
    assert "| cdpruner 64 |" in out_md.read_text()
