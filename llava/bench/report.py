"""Ratios to vanilla (same batch, same run), markdown tables, JSON and a plot of the benchmark rows."""
from __future__ import annotations

import json

# (ratio key, measured key, speedup): speedup = vanilla / row (higher is better), else row / vanilla
VANILLA_RATIOS = [
    ("prefill_speedup", "prefill_s", True),
    ("ttft_speedup", "ttft_s", True),
    ("decode_speedup", "decode_s_per_token", True),
    ("generate_speedup", "generate_s", True),
    ("flops_vs_vanilla", "llm_flops", False),
    ("kv_vs_vanilla", "kv_cache_mib", False),
    ("generate_mem_vs_vanilla", "generate_peak_mib", False),
]


def _spec_of(row: dict) -> str:
    """The compression spec a row ran (rows saved before ``spec`` was recorded: parsed from ``method``)."""
    if row.get("spec"):
        return row["spec"]
    from .setup import parse_method

    return parse_method(row["method"]).ours_spec


def add_ratios(rows: list[dict]) -> list[dict]:
    """Add ratios to the vanilla row of the same batch, and, for ``official`` rows, how much faster and
    leaner our compression step is than the official one at the same budget (same batch)."""
    for row in rows:
        # compiled rows (--compile) compare to the compiled vanilla row, eager rows to the eager one
        base = next((r for r in rows if r["batch"] == row["batch"] and r["method"] == "none"
                     and bool(r.get("compiled")) == bool(row.get("compiled"))), None)
        if base is not None:
            for key, value_key, speedup in VANILLA_RATIOS:
                a, b = row.get(value_key), base.get(value_key)
                if a and b:
                    row[key] = b / a if speedup else a / b
        if row.get("official"):
            ours = next(
                (r for r in rows if r["batch"] == row["batch"] and not r.get("official")
                 and _spec_of(r) == _spec_of(row)), None
            )
            if ours is not None and ours.get("step_s") and row.get("step_s"):
                row["ours_speedup_vs_official"] = row["step_s"] / ours["step_s"]
                row["ours_step_s"] = ours["step_s"]
                row["ours_step_peak_mib"] = ours["step_peak_mib"]
                if ours["step_peak_mib"] > 0:
                    row["official_mem_vs_ours"] = row["step_peak_mib"] / ours["step_peak_mib"]
    add_compiled_ratios(rows)
    return rows


# (ratio key, measured key): eager / compiled of the same method and batch (higher is better)
COMPILED_RATIOS = [("compiled_prefill_speedup", "prefill_s"), ("compiled_decode_speedup", "decode_s_per_token"),
                   ("compiled_ttft_speedup", "ttft_s"), ("compiled_generate_speedup", "generate_s")]


def add_compiled_ratios(rows: list[dict]) -> list[dict]:
    """For compiled rows: speedups over the eager row of the same method and batch, and generate's over
    the eager vanilla row (the issue's "faster than today's eager vanilla")."""
    for row in rows:
        if not row.get("compiled"):
            continue
        eager = next((r for r in rows if not r.get("compiled") and r["batch"] == row["batch"]
                      and r["method"] == row["method"]), None)
        vanilla = next((r for r in rows if not r.get("compiled") and r["batch"] == row["batch"]
                        and r["method"] == "none"), None)
        for key, value_key in COMPILED_RATIOS:
            if eager is not None and eager.get(value_key) and row.get(value_key):
                row[key] = eager[value_key] / row[value_key]
        if vanilla is not None and vanilla.get("generate_s") and row.get("generate_s"):
            row["generate_speedup_vs_eager_vanilla"] = vanilla["generate_s"] / row["generate_s"]
    return rows


def compiled_table(rows: list[dict]) -> str:
    """Per compiled row: the image path (stages 1-2, projector included; captured, and eager in the same
    run: medians [min-max] in ms, step / vanilla tower), then the LLM side's speedups over eager."""
    def spread(r, name):
        if r.get(f"{name}_s") is None:
            return "—"
        return f"{r[f'{name}_s'] * 1e3:.3f} [{r[f'{name}_min_s'] * 1e3:.3f}-{r[f'{name}_max_s'] * 1e3:.3f}]"

    header = ["batch", "method", "image tower (ms)", "image step (ms)", "step / tower", "eager tower (ms)",
              "eager step (ms)", "eager step / tower", "image path eager because", "prefill bucket",
              "prefill vs eager", "decode vs eager", "TTFT vs eager", "generate vs eager", "generate vs eager vanilla"]
    lines = [[
        str(r["batch"]), r["label"], spread(r, "image_tower"), spread(r, "image_step"),
        fmt(r.get("image_step_vs_tower"), ".3f", suffix="x"), spread(r, "eager_image_tower"),
        spread(r, "eager_image_step"), fmt(r.get("eager_image_step_vs_tower"), ".3f", suffix="x"),
        fmt(r.get("image_path_eager")), fmt(r.get("prefill_bucket"), "d"),
        fmt(r.get("compiled_prefill_speedup"), ".2f", suffix="x"), fmt(r.get("compiled_decode_speedup"), ".2f", suffix="x"),
        fmt(r.get("compiled_ttft_speedup"), ".2f", suffix="x"), fmt(r.get("compiled_generate_speedup"), ".2f", suffix="x"),
        fmt(r.get("generate_speedup_vs_eager_vanilla"), ".2f", suffix="x"),
    ] for r in rows if r.get("compiled")]
    return _table(header, lines) if lines else ""


def fmt(value, spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value * scale if scale != 1.0 else value:{spec}}{suffix}"
    return str(value)


def _table(header: list[str], lines: list[list[str]]) -> str:
    align = ["---" if i < 2 else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def vision_table(rows: list[dict]) -> str:
    header = ["batch", "method", "visual tokens", "original tower (s)", "tower (s)", "step (s)", "overhead (s)",
              "step / tower", "step / original", "original peak (MiB)", "tower peak (MiB)", "step peak (MiB)",
              "step / tower mem", "step / original mem", "projector (ms)"]
    lines = [[
        str(r["batch"]), r["label"], fmt(r.get("visual_tokens"), "d"), fmt(r.get("original_tower_s"), ".3f"),
        fmt(r.get("tower_s"), ".3f"), fmt(r.get("step_s"), ".3f"), fmt(r.get("overhead_s"), "+.3f"),
        fmt(r.get("step_vs_tower"), ".3f", suffix="x"), fmt(r.get("step_vs_original"), ".3f", suffix="x"),
        fmt(r.get("original_tower_peak_mib"), ".1f"), fmt(r.get("tower_peak_mib"), ".1f"),
        fmt(r.get("step_peak_mib"), ".1f"), fmt(r.get("step_mem_vs_tower"), ".3f", suffix="x"),
        fmt(r.get("step_mem_vs_original"), ".3f", suffix="x"), fmt(r.get("projector_s"), ".1f", 1e3),
    ] for r in rows]
    return _table(header, lines)


def llm_table(rows: list[dict]) -> str:
    header = ["batch", "method", "seq len", "LLM GFLOPs", "FLOPs vs vanilla", "prefill (s)", "prefill speedup",
              "KV cache (MiB)", "TTFT (s)", "TTFT speedup", "decode (ms/token)", "generate (s)",
              "generate speedup", "generate peak (MiB)"]
    lines = [[
        str(r["batch"]), r["label"], fmt(r.get("seq_len"), "d"), fmt(r.get("llm_flops"), ".1f", 1e-9),
        fmt(r.get("flops_vs_vanilla"), ".3f", suffix="x"), fmt(r.get("prefill_s"), ".3f"),
        fmt(r.get("prefill_speedup"), ".2f", suffix="x"), fmt(r.get("kv_cache_mib"), ".1f"), fmt(r.get("ttft_s"), ".3f"),
        fmt(r.get("ttft_speedup"), ".2f", suffix="x"), fmt(r.get("decode_s_per_token"), ".1f", 1e3),
        fmt(r.get("generate_s"), ".3f"), fmt(r.get("generate_speedup"), ".2f", suffix="x"),
        fmt(r.get("generate_peak_mib"), ".0f"),
    ] for r in rows if not r.get("official")]
    return _table(header, lines)


def official_table(rows: list[dict]) -> str:
    # the row is named as in the other tables ("official visionzip 54+10"): with "official " stripped it read
    # as a second, different "visionzip 54+10" row beside ours (issue 24)
    header = ["batch", "official path vs ours", "official step (s)", "ours step (s)", "ours faster by",
              "official peak (MiB)", "ours peak (MiB)", "official / ours mem"]
    lines = [[
        str(r["batch"]), f"{r['label']} vs {r['label'].replace('official ', '', 1)}", fmt(r.get("step_s"), ".3f"),
        fmt(r.get("ours_step_s"), ".3f"), fmt(r.get("ours_speedup_vs_official"), ".2f", suffix="x"),
        fmt(r.get("step_peak_mib"), ".0f"), fmt(r.get("ours_step_peak_mib"), ".0f"),
        fmt(r.get("official_mem_vs_ours"), ".2f", suffix="x"),
    ] for r in rows if r.get("official")]
    return _table(header, lines) if lines else ""


def audit_table(rows: list[dict]) -> str:
    header = ["batch", "method", "tower layers run", "N x N attention maps", "dense one-hot merge",
              "host syncs (step)", "tower passes per batch", "host syncs (image path + splice, width known)",
              "host syncs (width read)"]
    lines = [[
        str(r["batch"]), r["label"], fmt(r.get("audit_layers_run"), "d"), fmt(r.get("audit_full_attention_maps"), "d"),
        fmt(r.get("audit_dense_one_hot_merge")), fmt(r.get("audit_host_syncs"), "d"),
        fmt(r.get("audit_tower_passes"), "d"), fmt(r.get("audit_request_host_syncs"), "d"),
        fmt(r.get("audit_request_host_syncs_width_unknown"), "d"),
    ] for r in rows if "audit_layers_run" in r]
    return _table(header, lines) if lines else ""


def markdown_report(meta: dict, rows: list[dict]) -> str:
    parts = [
        f"**{meta['model']}** — LLM {meta['llm_layers']} layers, {meta['device']} {meta['dtype']}, "
        f"{meta['text_tokens']} text tokens, {meta['new_tokens']} new tokens, median of {meta['repeats']} "
        f"(warm-up {meta['warmup']}); load average {meta.get('load_start', '?')} -> {meta.get('load_end', '?')}",
        "",
        "Vision side (original tower = the original LLaVA's: all layers, all hidden states; tower = ours, "
        "vanilla: stops after the selected layer; step = compression step: tower + selection + merge; the "
        "three measured alternately in the same process; peak memory = live tensors (CPU) or "
        "max_memory_allocated (CUDA) above what was in use before):",
        "",
        vision_table([r for r in rows if not r.get("compiled")]),  # compiled rows: their image path is below
        "",
        "LLM side (GFLOPs: the paper's formula, per sample, for the layers run):",
        "",
        llm_table(rows),
    ]
    for title, table in (("Compiled path (--compile) vs eager, same run (image path = stages 1-2: tower + compression + "
                          "projector, captured vs eager, vanilla vs compressed, medians [min-max]):", compiled_table(rows)),
                         ("Ours vs the official path re-enacted (compression step):", official_table(rows)),
                         ("Lean-path audit (one profiled call):", audit_table(rows))):
        if table:
            parts += ["", title, "", table]
    return "\n".join(parts) + "\n"


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)


def plot(path: str, meta: dict, rows: list[dict]) -> None:
    """Three panels: where the time of one request goes, speedups vs vanilla, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['label']}\nB={r['batch']}" for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(max(14, 2.4 * len(rows)), 5.5))

    parts = [("tower (ours)", lambda r: r.get("tower_s")), ("selection", lambda r: max(r.get("overhead_s") or 0.0, 0.0)),
             ("projector", lambda r: r.get("projector_s")), ("prefill", lambda r: r.get("prefill_s")),
             (f"decode x{meta['new_tokens']}", lambda r: (r.get("decode_s_per_token") or 0.0) * meta["new_tokens"])]
    bottom = [0.0] * len(rows)
    for name, get in parts:
        values = [get(r) or 0.0 for r in rows]
        axes[0].bar(x, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[0].set_title("time of one request by stage (s)")
    axes[0].legend(fontsize=8)

    llm_rows = [r for r in rows if not r.get("official")]
    width = 0.25
    for k, (key, label) in enumerate([("prefill_speedup", "prefill"), ("ttft_speedup", "TTFT"),
                                      ("generate_speedup", "generate")]):
        axes[1].bar([i + (k - 1) * width for i in range(len(llm_rows))], [r.get(key) or 0.0 for r in llm_rows],
                    width, label=label)
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set_title("speedup vs vanilla (same batch)")
    axes[1].legend(fontsize=8)
    axes[1].set_xticks(list(range(len(llm_rows))))
    axes[1].set_xticklabels([f"{r['label']}\nB={r['batch']}" for r in llm_rows], rotation=60, ha="right", fontsize=7)

    for k, (key, label) in enumerate([("step_peak_mib", "compression step"), ("generate_peak_mib", "generate")]):
        axes[2].bar([i + (k - 0.5) * 0.4 for i in x], [r.get(key) or 0.0 for r in rows], 0.4, label=label)
    axes[2].set_title("peak memory above the weights (MiB)")
    axes[2].legend(fontsize=8)

    for ax in (axes[0], axes[2]):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    fig.suptitle(f"{meta['model']}: LLM {meta['llm_layers']} layers, {meta['device']} {meta['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
