"""The benchmark's arithmetic and bookkeeping: the paper's FLOP formula against hand-computed values, the
KV-cache size, method parsing, ratios, the interleaved measurement and the lean-path audit's detectors."""
from __future__ import annotations

import pytest
import torch

from llava.bench.geometry import GEOMETRIES, kv_cache_bytes, llm_layer_flops, llm_prefill_flops
from llava.bench.report import add_ratios, markdown_report
from llava.bench.runner import audit_call
from llava.bench.setup import parse_method
from visionzip.profiling import measure, measure_interleaved


# ----- FLOPs: 4 n d^2 + 2 n^2 d + 2 n d m per layer ---------------------------------------------
def test_layer_flops_small_hand_computed():
    # n=2, d=3, m=5: 4*2*9 + 2*4*3 + 2*2*3*5 = 72 + 24 + 60
    assert llm_layer_flops(2, 3, 5) == 156
    # n=1, d=1, m=1: 4 + 2 + 2
    assert llm_layer_flops(1, 1, 1) == 8
    assert llm_layer_flops(0, 4096, 11008) == 0


def test_llava_7b_prefill_flops_hand_computed():
    # LLaVA-1.5-7B, 576 visual + 64 text tokens: n = 640, d = 4096, m = 11008
    # 4nd^2 = 42,949,672,960; 2n^2d = 3,355,443,200; 2ndm = 57,713,623,040
    assert llm_layer_flops(640, 4096, 11008) == 104_018_739_200
    assert llm_prefill_flops(640, 4096, 11008, 32) == 3_328_599_654_400
    # 64 visual + 64 text: n = 128: 8,589,934,592 + 134,217,728 + 11,542,724,608
    assert llm_layer_flops(128, 4096, 11008) == 20_266_876_928
    # the quadratic term makes the ratio a little better than the token ratio 128 / 640 = 0.2
    ratio = llm_layer_flops(128, 4096, 11008) / llm_layer_flops(640, 4096, 11008)
    assert ratio == pytest.approx(0.194838, abs=1e-6)


def test_13b_geometry_flops_use_its_widths():
    g = GEOMETRIES["llava-1.5-13b"].llm
    assert (g.hidden, g.layers, g.heads, g.intermediate, g.vocab) == (5120, 40, 40, 13824, 32000)
    # n = 100: 4*100*5120^2 + 2*100^2*5120 + 2*100*5120*13824
    assert llm_prefill_flops(100, g.hidden, g.intermediate, g.layers) == 40 * (
        10_485_760_000 + 102_400_000 + 14_155_776_000
    )


def test_flops_reject_bad_sizes():
    with pytest.raises(ValueError, match="n must be"):
        llm_layer_flops(-1, 4096, 11008)
    with pytest.raises(ValueError, match="hidden must be"):
        llm_layer_flops(10, 40.5, 11008)


def test_kv_cache_bytes_hand_computed():
    # 640 tokens, 32 layers, 32 heads of 128, bf16: 2 * 32 * 640 * 32 * 128 * 2 bytes = 320 MiB
    assert kv_cache_bytes(640, 32, 32, 128, batch=1, bytes_per_value=2) == 335_544_320
    assert kv_cache_bytes(640, 32, 32, 128, batch=8, bytes_per_value=4) == 16 * 335_544_320


def test_named_geometries():
    next7b = GEOMETRIES["llava-next-7b"]
    assert next7b.anyres and next7b.llm == GEOMETRIES["llava-1.5-7b"].llm
    tower = next7b.tower
    assert (tower.hidden, tower.layers, tower.heads, tower.intermediate, tower.image_size, tower.patch_size) == (
        1024, 24, 16, 4096, 336, 14)


# ----- methods and ratios -------------------------------------------------------------------------
def test_parse_methods():
    assert parse_method("none").is_vanilla
    zipped = parse_method("visionzip:54,10")
    assert (zipped.compression.dominant, zipped.compression.contextual, zipped.official) == (54, 10, False)
    official = parse_method("official:visionzip:54,10")
    assert official.official and official.label == "official visionzip 54+10"
    pruner = parse_method("official-vispruner:64")
    assert pruner.official and pruner.compression.tokens == 64
    with pytest.raises(ValueError, match="give the settings"):
        parse_method("official")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_method("visionzip:54,10,3")
    assert parse_method("official:vispruner:64").ours_spec == "vispruner:tokens=64,important_ratio=0.5"


def test_resolve_methods_adds_vanilla_and_our_side_of_each_official_row():
    from llava.bench.cli import resolve_methods

    specs = [m.spec for m in resolve_methods(["official:visionzip:54,10", "vispruner:64"], anyres=False)]
    assert specs == ["none", "visionzip:dominant=54,contextual=10", "official:visionzip:54,10", "vispruner:64"]


def test_ratios_are_to_vanilla_of_the_same_batch():
    rows = [
        {"method": "none", "batch": 1, "prefill_s": 2.0, "llm_flops": 100, "generate_s": 4.0},
        {"method": "visionzip:54,10", "batch": 1, "prefill_s": 0.5, "llm_flops": 20, "generate_s": 2.0,
         "step_s": 1.0, "step_peak_mib": 10.0},
        {"method": "none", "batch": 8, "prefill_s": 10.0, "llm_flops": 100},
        {"method": "visionzip:54,10", "batch": 8, "prefill_s": 1.0, "llm_flops": 20},
        {"method": "official:visionzip:54,10", "batch": 1, "official": True, "step_s": 3.0, "step_peak_mib": 50.0},
    ]
    add_ratios(rows)
    assert rows[1]["prefill_speedup"] == 4.0 and rows[3]["prefill_speedup"] == 10.0
    assert rows[1]["flops_vs_vanilla"] == 0.2 and rows[1]["generate_speedup"] == 2.0
    assert rows[4]["ours_speedup_vs_official"] == 3.0 and rows[4]["official_mem_vs_ours"] == 5.0


def test_markdown_marks_missing_values():
    rows = add_ratios([{"method": "none", "label": "vanilla", "batch": 1, "visual_tokens": 576, "seq_len": 640}])
    meta = {"model": "m", "llm_layers": 2, "device": "cpu", "dtype": "float32", "text_tokens": 64,
            "new_tokens": 4, "repeats": 1, "warmup": 0}
    text = markdown_report(meta, rows)
    assert "| 1 | vanilla | 576 | — |" in text and "| 1 | vanilla | 640 |" in text


def test_official_row_is_named_apart_from_ours():
    """Issue 24: the official-path table named its row "visionzip 54+10", like our own row with other numbers."""
    rows = add_ratios([
        {"method": "visionzip:64", "label": "visionzip 54+10", "batch": 1, "step_s": 1.0, "step_peak_mib": 10.0},
        {"method": "official:visionzip:64", "label": "official visionzip 54+10", "batch": 1, "official": True,
         "step_s": 3.0, "step_peak_mib": 50.0},
    ])
    meta = {"model": "m", "llm_layers": 2, "device": "cpu", "dtype": "float32", "text_tokens": 64,
            "new_tokens": 4, "repeats": 1, "warmup": 0}
    text = markdown_report(meta, rows)
    assert "| 1 | official visionzip 54+10 vs visionzip 54+10 | 3.000 |" in text


# ----- measuring ----------------------------------------------------------------------------------
def test_measure_interleaved_alternates_and_counts():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    result = measure_interleaved(fns, repeats=3, warmup=1, device="cpu")
    # warm-up round, the memory round, then timed rounds in alternating order
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(result[k].times) for k in "ab"] == [3, 3]


def test_measure_reports_peak_memory_of_a_call():
    held = []
    result = measure(lambda: held.append(torch.ones(16 * 2**20 // 4).sum()), repeats=2, warmup=1)
    assert len(result.times) == 2
    # a 16 MiB buffer is allocated and filled during the call
    assert result.peak_mib > 8


# ----- the audit's detectors -------------------------------------------------------------------------
class _Layer(torch.nn.Module):
    def forward(self, x):
        return x


class _Tower(torch.nn.Module):
    """Just the structure the audit hooks into: embeddings and encoder.layers."""

    def __init__(self):
        super().__init__()
        self.embeddings = _Layer()
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x):
        x = self.embeddings(x)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


def test_audit_finds_syncs_full_maps_and_one_hot_products():
    tower = _Tower()
    x = torch.randn(1, 2, 5, 5)

    def wasteful():
        tower(x)
        torch.softmax(x, dim=-1)  # a full 5 x 5 map
        int(x.sum())
        x[x > 0]
        torch.bmm(torch.zeros(1, 3, 7), torch.zeros(1, 7, 4))  # operand (3, 7) = (C, R - C)

    found = audit_call(wasteful, tower, num_tokens=5, merge_shape=(3, 7), device="cpu")
    assert found["full_attention_maps"] == 1
    assert found["host_syncs"] == 2
    assert set(found["host_sync_calls"]) == {"torch.Tensor.__int__", "boolean-mask indexing"}
    assert found["dense_one_hot_merge"] is True
    assert (found["tower_passes"], found["layers_run"]) == (1, 2)

    def lean():
        tower(x)
        torch.softmax(x[..., :1, :], dim=-1)  # one row
        x.gather(-1, torch.zeros(1, 2, 5, 1, dtype=torch.long))

    found = audit_call(lean, tower, num_tokens=5, merge_shape=(3, 7), device="cpu")
    assert (found["full_attention_maps"], found["host_syncs"], found["dense_one_hot_merge"]) == (0, 0, False)


def test_resolve_methods_keeps_one_row_per_setting_however_it_is_spelt():
    # visionzip:64 and visionzip:dominant=54,contextual=10 are one setting: one row, not two labelled alike
    from llava.bench.cli import resolve_methods

    rows = resolve_methods(["visionzip:64", "visionzip:dominant=54,contextual=10", "official:visionzip:54,10"], anyres=False)
    labels = [m.label for m in rows]
    assert labels == ["vanilla", "visionzip 54+10", "official visionzip 54+10"]
