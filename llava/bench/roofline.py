"""The roofline of each benchmark row: the least time the device could take for the tower, the prefill
and one decode step, from the work's FLOPs and the bytes it must move, and measured / bound.

bound = max(FLOPs / peak FLOP/s, bytes / peak bytes/s). The counts (multiply-add = 2 FLOPs):

- tower, per view of n tokens (n = patches + CLS) through the layers that run (up to the selected
  layer): 2 n (4 d^2 + 2 d m) + 4 n^2 d per layer, plus the patch embedding 2 P (3 p^2) d; bytes: the
  weights of those layers, read once per pass. The compression step (tower + selection + merge) and the
  compiled rows' image path (the same + the projector) are bounded by the tower's figure: scoring and
  merging add under 1 % of its FLOPs; the projector (not counted: the bound stays a lower bound) adds
  about 7 % on 576 LLaVA-1.5 tokens, under 1 % on 64.
- prefill of B sequences of n tokens: per layer 2 B n (2 d^2 + 2 d d_kv + 3 d m) (q and o; k and v of
  width d_kv; SwiGLU's three matrices) + 2 B n^2 d (causal attention: half of q k^T and a v), plus
  2 B d V for the last position's logits; bytes: all LLM layer weights and the LM head once, plus the
  KV cache written (2 L B n d_kv values).
- one decode step at context c: per layer 2 B (2 d^2 + 2 d d_kv + 3 d m) + 4 B c d, plus 2 B d V;
  bytes: the weights again plus the KV cache read (2 L B c d_kv values). c is the prompt plus half the
  generated tokens (the mean context of the decode steps).

Peaks: for the H200 the achievable figures this project plans with (about 790 TFLOP/s dense bf16,
roughly 80 % of the 989 TFLOP/s of NVIDIA's H200 data sheet, and 4.3 TB/s, roughly 90 % of its 4.8 TB/s);
for any other device measured at start: a square matmul (FLOP/s) and a large tensor copy (bytes/s,
read + write) in the benchmark's dtype, best of a few runs. A measured/bound ratio of 1 is the device's
limit; the gap above it is overhead (launches, Python, synchronisation) or kernels below peak.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

# (FLOP/s, bytes/s) by a substring of torch.cuda.get_device_name(); bf16/fp16 dense.
KNOWN_PEAKS = {
    "H200": (790e12, 4.3e12),
}


@dataclass(frozen=True)
class DevicePeaks:
    name: str
    flops_per_s: float
    bytes_per_s: float
    source: str  # "given" | "measured"

    def to_dict(self) -> dict:
        return asdict(self)


def _best_time(fn, device: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(device: str, dtype: torch.dtype, matmul_size: int = 2048, copy_mib: int = 256) -> DevicePeaks:
    """Achievable FLOP/s (an n x n matmul) and bytes/s (a copy of ``copy_mib`` MiB: read + write)."""
    a = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
    flops = 2 * matmul_size**3 / _best_time(lambda: a @ b, device)
    source = torch.empty(copy_mib * 2**20 // torch.tensor([], dtype=dtype).element_size(), device=device, dtype=dtype)
    target = torch.empty_like(source)
    bandwidth = 2 * source.numel() * source.element_size() / _best_time(lambda: target.copy_(source), device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return DevicePeaks(name, flops, bandwidth, "measured")


def device_peaks(device: str, dtype: torch.dtype) -> DevicePeaks:
    """The given peaks of a known GPU, else measured now."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, (flops, bandwidth) in KNOWN_PEAKS.items():
            if key in name:
                return DevicePeaks(name, flops, bandwidth, "given")
    return measure_peaks(device, dtype)


# ----- shapes and counts --------------------------------------------------------------------------
def model_shape(model) -> dict:
    """What the bounds need from a LLaVA model (put into each row by the runner)."""
    config = model.config
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    tower = model.get_vision_tower()
    vision = tower.vision_tower.config
    select = int(getattr(tower, "select_layer", -2))
    layers_run = select % int(vision.num_hidden_layers) + 1 if select < 0 else select
    return {
        "shape_hidden": hidden, "shape_intermediate": int(config.intermediate_size),
        "shape_kv_width": int(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        "shape_vocab": int(config.vocab_size), "shape_layers": int(config.num_hidden_layers),
        "shape_bytes_per_value": model.get_input_embeddings().weight.element_size(),
        "shape_tower_hidden": int(vision.hidden_size), "shape_tower_intermediate": int(vision.intermediate_size),
        "shape_tower_layers_run": layers_run, "shape_tower_patches": (int(vision.image_size) // int(vision.patch_size)) ** 2,
        "shape_patch": int(vision.patch_size),
    }


def tower_cost(shape: dict, views: int) -> tuple[float, float]:
    d, m = shape["shape_tower_hidden"], shape["shape_tower_intermediate"]
    patches = shape["shape_tower_patches"]
    n = patches + 1
    layer_flops = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    flops = views * (shape["shape_tower_layers_run"] * layer_flops + 2 * patches * 3 * shape["shape_patch"] ** 2 * d)
    weights = shape["shape_tower_layers_run"] * (4 * d * d + 2 * d * m) * shape["shape_bytes_per_value"]
    return float(flops), float(weights)


def _llm_weights(shape: dict) -> float:
    d, m, kv = shape["shape_hidden"], shape["shape_intermediate"], shape["shape_kv_width"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * m
    return float((shape["shape_layers"] * per_layer + d * shape["shape_vocab"]) * shape["shape_bytes_per_value"])


def prefill_cost(shape: dict, batch: int, n: int) -> tuple[float, float]:
    d, m, kv, layers = shape["shape_hidden"], shape["shape_intermediate"], shape["shape_kv_width"], shape["shape_layers"]
    flops = layers * batch * (2 * n * (2 * d * d + 2 * d * kv + 3 * d * m) + 2 * n * n * d) + 2 * batch * d * shape["shape_vocab"]
    kv_written = 2 * layers * batch * n * kv * shape["shape_bytes_per_value"]
    return float(flops), _llm_weights(shape) + kv_written


def decode_cost(shape: dict, batch: int, context: int) -> tuple[float, float]:
    d, m, kv, layers = shape["shape_hidden"], shape["shape_intermediate"], shape["shape_kv_width"], shape["shape_layers"]
    flops = layers * batch * (2 * (2 * d * d + 2 * d * kv + 3 * d * m) + 4 * context * d) + 2 * batch * d * shape["shape_vocab"]
    kv_read = 2 * layers * batch * context * kv * shape["shape_bytes_per_value"]
    return float(flops), _llm_weights(shape) + kv_read


def bound_s(flops: float, num_bytes: float, peaks: DevicePeaks) -> float:
    return max(flops / peaks.flops_per_s, num_bytes / peaks.bytes_per_s)


def add_bounds(rows: list[dict], peaks: DevicePeaks, new_tokens: int) -> list[dict]:
    """Add ``{tower,prefill,decode}_bound_s`` and ``..._vs_bound`` (measured / bound) to rows that carry
    the model's shape (``model_shape``) and the measurement."""
    for row in rows:
        if "shape_hidden" not in row:
            continue
        batch = row["batch"]
        stages = []
        tower = tower_cost(row, batch * row["views_per_sample"])
        # the compression step (eager rows: ``step_s``) and the image path (compiled rows: ``image_tower_s``
        # vanilla, ``image_step_s`` compressed, the projector included) have the tower's work as their bound
        for name in ("tower", "step", "image_tower", "image_step"):
            if row.get(f"{name}_s") is not None:
                stages.append((name, f"{name}_s", tower))
        if row.get("seq_len") is not None:
            stages.append(("prefill", "prefill_s", prefill_cost(row, batch, row["seq_len"])))
            context = row["seq_len"] + new_tokens // 2
            stages.append(("decode", "decode_s_per_token", decode_cost(row, batch, context)))
        for name, measured_key, (flops, num_bytes) in stages:
            bound = bound_s(flops, num_bytes, peaks)
            row[f"{name}_flops"] = flops
            row[f"{name}_bytes"] = num_bytes
            row[f"{name}_bound_s"] = bound
            row[f"{name}_bound_by"] = "compute" if flops / peaks.flops_per_s >= num_bytes / peaks.bytes_per_s else "memory"
            if row.get(measured_key):
                row[f"{name}_vs_bound"] = row[measured_key] / bound
    return rows


def markdown(peaks: DevicePeaks, rows: list[dict]) -> str:
    """The roofline table: per row and stage, measured, bound (and what bounds it), measured / bound."""
    def ms(value):
        return "—" if value is None else f"{value * 1e3:.3f}"

    def ratio(value):
        return "—" if value is None else f"{value:.1f}x"

    lines = [
        f"Roofline on {peaks.name} ({peaks.source} peaks: {peaks.flops_per_s / 1e12:.2f} TFLOP/s, "
        f"{peaks.bytes_per_s / 1e9:.1f} GB/s)",
        "",
        "| batch | method | tower (ms) | bound (ms) | tower / bound | step (ms) | step / bound | prefill (ms) "
        "| bound (ms) | prefill / bound | decode (ms/token) | bound (ms) | decode / bound |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "shape_hidden" not in r:
            continue
        cells = [str(r["batch"]), r["label"]]
        # compiled rows: the captured image path (projector included), vanilla and compressed
        tower, step = ("image_tower", "image_step") if r.get("compiled") else ("tower", "step")
        for name, key, with_bound in ((tower, f"{tower}_s", True), (step, f"{step}_s", False),
                                      ("prefill", "prefill_s", True), ("decode", "decode_s_per_token", True)):
            bound = r.get(f"{name}_bound_s")
            by = r.get(f"{name}_bound_by")
            cells.append(ms(r.get(key)))
            if with_bound:
                cells.append("—" if bound is None or r.get(key) is None else f"{ms(bound)} ({by[:3]})")
            cells.append(ratio(r.get(f"{name}_vs_bound")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
