"""Batch-1 prefill of every method beside vanilla, interleaved in one process: the ratio that decides
whether a method makes the prefill slower than vanilla, robust to a shared machine's load.

    python -m llava.bench.prefill --geometry llava-1.5-7b --layers 4                 # CPU: every method at 64
    python -m llava.bench.prefill --geometry llava-1.5-7b --device cuda               # GPU: full depth, bf16
    python -m llava.bench.prefill --geometry llava-1.5-7b --layers 4 --methods none fastv:64 dart:64 --breakdown

``python -m llava.bench`` measures each method in its own process, one after the other: on a machine whose
load drifts (a shared CPU) two rows a minute apart can differ by more than the method's effect. Here one
model serves every method; each method's prompt is spliced once (its tower and compression step are not
timed: the prefill is the LLM forward over the spliced sequence, KV cache on, logits of the last position,
in-LLM methods pruning inside it), and the prefills are timed round by round, the order of the methods
reversed every other round, so that load drift hits all of them alike. Per method: the median prefill, the
median over rounds of its ratio to vanilla's prefill of the same round, the KV cache the prefill leaves,
and the paper's LLM FLOPs (``llava.bench.geometry``; in-LLM methods: their token schedule) for the layers
run and, on a named geometry, at its real depth.

``--breakdown``: one more prefill per method under ``torch.profiler``: the time inside the pruner's
selection (``visionzip.prune.select``, recorded by ``visionzip.decoder_loop``), inside the drops
(``visionzip.prune.drop``), and the rest; and ``full-depth est.``: the prefill the method would take at the
geometry's real depth if the layers' time scaled with the paper's FLOPs (the measured time minus the
selection, times full-depth FLOPs over measured FLOPs, plus the selection) -- with ``--layers`` the layers
before a drop weigh more than at full depth, so the measured ratio of an in-LLM method is pessimistic.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from visionzip import registered_methods
from visionzip.profiling import synchronize, timed_call

from .cli import DTYPES, build_model, load_average, non_negative_int, positive_int
from .geometry import GEOMETRIES, get_geometry, llm_layer_flops
from .runner import cache_bytes, mib, schedule_flops
from .setup import make_inputs, parse_method
from .syncs import HostSyncAudit

PROFILE_LABELS = ("visionzip.prune.select", "visionzip.prune.drop")


def default_specs(tokens: int = 64) -> list[str]:
    """Vanilla and every registered method at ``tokens`` per view (``METHOD:TOKENS``: its ``from_budget``)."""
    return ["none"] + [f"{name}:{tokens}" for name in registered_methods()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.bench.prefill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a LLaVA checkpoint folder")
    source.add_argument("--geometry", choices=sorted(GEOMETRIES), help="a named shape with random weights")
    parser.add_argument("--model-base", help="the base LLM of a LoRA or projector-only checkpoint")
    parser.add_argument("--layers", type=positive_int, help="keep only the first N layers of the LLM")
    parser.add_argument("--methods", nargs="+", help="default: none and every registered method at --tokens")
    parser.add_argument("--tokens", type=positive_int, default=64, help="the budget of the default methods")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first")
    parser.add_argument("--text-tokens", type=positive_int, default=64)
    parser.add_argument("--image-size", default="672x672", help="WIDTHxHEIGHT for anyres models")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile one more prefill per method: selection, drops, rest; full-depth estimate")
    parser.add_argument("--json", help="write the meta data and rows here")
    parser.add_argument("--markdown", help="also write the markdown table here")
    return parser


def profiled_breakdown(prefill) -> dict:
    """Seconds of one ``prefill()`` under ``torch.profiler`` inside each of ``PROFILE_LABELS`` (CPU time of
    the labelled ranges; on CUDA the device is synchronised around the call, the ranges' device time is not
    separated) and in all."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        total = timed_call(prefill, "cuda" if torch.cuda.is_available() else "cpu")
    out = {"profiled_prefill_s": total}
    for label in PROFILE_LABELS:
        events = [e for e in prof.key_averages() if e.key == label]
        out[label.rsplit(".", 1)[-1] + "_s"] = sum(e.cpu_time_total for e in events) / 1e6
    return out


class DeviceOpCount(TorchDispatchMode):
    """Counts the ATen operators a block dispatches that are not views (each is one or more kernel launches
    on a GPU: at batch 1 an eager prefill is launch-bound, so these counts stand for the host time a GPU
    run spends launching, where a CPU run cannot show it)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def audited(prefill) -> dict:
    """Host syncs (``llava.bench.syncs``: what waits for the device on CUDA) and device operators of one
    ``prefill()``."""
    ops = DeviceOpCount()
    with HostSyncAudit() as audit, ops:
        prefill()
    return {"host_syncs": audit.count, "host_sync_calls": audit.summary(), "device_ops": ops.count}


def run(args) -> dict:
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    specs = args.methods or default_specs(args.tokens)
    if "none" not in specs:
        specs = ["none"] + specs
    methods = [parse_method(spec) for spec in specs]
    started, load_start = datetime.datetime.now().isoformat(timespec="seconds"), load_average()
    if any(m.official for m in methods):
        raise ValueError("official:... rows re-enact a compression step; the prefill of the same budget is ours")
    model = build_model(args)
    inputs = make_inputs(model, 1, args.text_tokens, (width, height))
    config = model.config
    layers, hidden, intermediate = int(config.num_hidden_layers), int(config.hidden_size), int(config.intermediate_size)
    full_depth = max(get_geometry(args.geometry).llm.layers, layers) if args.geometry else layers
    tower = model.get_vision_tower()
    prompts, rows = {}, {}
    with torch.no_grad():
        for method in methods:
            model.set_visual_compression(method.compression)
            spliced = model.splice_multimodal(inputs.input_ids, inputs.images, inputs.image_sizes, padding_side="left")
            prompts[method.spec] = spliced
            n = spliced.inputs_embeds.shape[1]
            row = {"method": method.spec, "spec": method.compression.spec(), "label": method.label,
                   "stage": method.compression.settings.stage if method.compression.enabled else "none",
                   "seq_len": n, "visual_tokens": n - inputs.text_tokens, "llm_layers": layers}
            if method.compression.enabled and method.compression.settings.stage == "llm":
                row["llm_view_tokens"] = tower.num_patches
                row["llm_flops"] = schedule_flops(row, layers, hidden, intermediate)
                row["llm_flops_full_depth"] = schedule_flops(row, full_depth, hidden, intermediate)
                row["llm_visual_schedule"] = method.compression.settings.llm_token_schedule(
                    layers, row["visual_tokens"], tower.num_patches)
            else:
                row["llm_flops"] = layers * llm_layer_flops(n, hidden, intermediate)
                row["llm_flops_full_depth"] = full_depth * llm_layer_flops(n, hidden, intermediate)
            rows[method.spec] = row
        holder = {}

        def prefill(method):
            spliced = prompts[method.spec]
            model.set_visual_compression(method.compression)
            holder["out"] = model(
                inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                position_ids=spliced.position_ids, use_cache=True, logits_to_keep=1, visual_mask=spliced.visual_mask,
            )

        for _ in range(args.warmup):
            for method in methods:
                prefill(method)
        for method in methods:  # the switch of the compression is outside the timed call
            model.set_visual_compression(method.compression)
            prefill(method)
            rows[method.spec]["kv_cache_mib"] = mib(cache_bytes(holder.pop("out").cache))
            rows[method.spec].update(audited(lambda method=method: prefill(method)))
            holder.clear()
        times = {m.spec: [] for m in methods}
        for round_index in range(args.repeats):
            for method in methods if round_index % 2 == 0 else methods[::-1]:
                model.set_visual_compression(method.compression)
                synchronize(args.device)
                times[method.spec].append(timed_call(lambda method=method: prefill(method), args.device))
                holder.clear()
        if args.breakdown:
            for method in methods:
                model.set_visual_compression(method.compression)
                rows[method.spec].update(profiled_breakdown(lambda method=method: prefill(method)))
                holder.clear()
    base = times["none"]
    for method in methods:
        row, mine = rows[method.spec], times[method.spec]
        row.update(prefill_s=statistics.median(mine), prefill_min_s=min(mine), prefill_max_s=max(mine),
                   prefill_times_s=mine,
                   prefill_vs_vanilla=statistics.median(a / b for a, b in zip(mine, base)),
                   flops_vs_vanilla=row["llm_flops"] / rows["none"]["llm_flops"],
                   kv_vs_vanilla=row["kv_cache_mib"] / rows["none"]["kv_cache_mib"])
        if args.breakdown:
            # the layers' time scaled by FLOPs to the real depth, the selection as measured (it does not grow)
            select = row.get("select_s", 0.0)
            row["full_depth_estimate_s"] = (row["prefill_s"] - select) * row["llm_flops_full_depth"] / row["llm_flops"] + select
    if args.breakdown:
        for row in rows.values():
            row["full_depth_estimate_vs_vanilla"] = row["full_depth_estimate_s"] / rows["none"]["full_depth_estimate_s"]
    meta = {
        "model": args.geometry or args.model, "device": args.device, "dtype": args.dtype, "llm_layers": layers,
        "llm_layers_full_depth": full_depth, "text_tokens": args.text_tokens, "repeats": args.repeats,
        "warmup": args.warmup, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load": load_start, "load_end": load_average(), "started": started,
        "command": "python -m llava.bench.prefill " + " ".join(sys.argv[1:]), "commit": git_commit(),
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return {"meta": meta, "rows": list(rows.values())}


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    breakdown = any("select_s" in r for r in rows)
    lines = [
        f"**{meta['model']}**, LLM {meta['llm_layers']} layers (real depth {meta['llm_layers_full_depth']}), "
        f"{meta['device']} {meta['dtype']}" + (f" ({meta['gpu']})" if meta.get("gpu") else "")
        + f", batch 1, {meta['text_tokens']} text tokens, {meta['threads']} thread(s); prefills interleaved, "
        f"median of {meta['repeats']} rounds (warm-up {meta['warmup']}); load average {meta['load']} -> "
        f"{meta['load_end']}; commit {meta['commit']}",
        "",
        "| method | stage | visual tokens | LLM GFLOPs | FLOPs vs vanilla | KV cache (MiB) | prefill (ms) | min..max (ms) "
        "| prefill / vanilla | host syncs | device ops |"
        + (" selection (ms) | drops (ms) | full-depth est. / vanilla |" if breakdown else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if breakdown else ""),
    ]
    for r in rows:
        line = (f"| {r['label']} | {r['stage']} | {r['visual_tokens']} | {r['llm_flops'] / 1e9:.1f} | "
                f"{r['flops_vs_vanilla']:.3f}x | {r['kv_cache_mib']:.1f} | {r['prefill_s'] * 1e3:.0f} | "
                f"{r['prefill_min_s'] * 1e3:.0f}..{r['prefill_max_s'] * 1e3:.0f} | {r['prefill_vs_vanilla']:.2f}x | "
                f"{r['host_syncs']} | {r['device_ops']} |")
        if breakdown:
            line += (f" {r['select_s'] * 1e3:.1f} | {r['drop_s'] * 1e3:.1f} | "
                     f"{r['full_depth_estimate_vs_vanilla']:.2f}x |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    result = run(args)
    text = markdown(result)
    print(text)
    if args.markdown:
        write_atomic(args.markdown, text)
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1))
    return result


def write_atomic(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


if __name__ == "__main__":
    main()
