"""Where the time and memory of a LLaVA request go, per compression method and budget.

    python -m llava.bench --geometry llava-1.5-7b --layers 2                  # CPU: 2 Vicuna-7B-shaped layers
    python -m llava.bench --geometry llava-next-7b --layers 2 --batch 1
    python -m llava.bench --geometry llava-1.5-7b --device cuda --batch 1 8   # GPU: full depth, bf16
    python -m llava.bench --model path/to/llava-v1.5-7b --methods none visionzip:54,10 official:visionzip:54,10
    python -m llava.bench --geometry llava-1.5-7b --layers 2 --json out.json --plot out.png --markdown out.md

A named geometry has the real layer counts and widths and random weights (nothing is downloaded);
``--layers`` keeps the first N layers of the LLM (the tower keeps its 24). Methods: ``none``,
``visionzip:D,C``, ``vispruner:T``, ``official:visionzip:D,C`` / ``official-vispruner:T`` (the official code path
re-enacted, for the compression step). Vanilla is always measured, and ratios are to it, same batch, same
run. Each (batch, method) runs in its own process so that its peak memory is its own
(``--in-process`` shares one model: faster, for smoke tests). ``python -m llava.bench.prefill``: the batch-1
prefill of every method beside vanilla, interleaved round by round in one process (ratios robust to a
shared machine's load), with the selection's share, host syncs and device operators.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

from . import report, roofline, runner
from .geometry import GEOMETRIES, get_geometry
from .runner import STAGES, Settings, run_compiled, run_method
from .setup import BenchMethod, build_geometry_model, default_methods, load_model, make_inputs, parse_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"image size must look like 672x672, got {text!r}") from err
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a LLaVA checkpoint folder")
    source.add_argument("--geometry", choices=sorted(GEOMETRIES), help="a named shape with random weights")
    parser.add_argument("--model-base", help="the base LLM of a LoRA or projector-only checkpoint")
    parser.add_argument("--layers", type=positive_int, help="keep only the first N layers of the LLM")
    parser.add_argument("--methods", nargs="+", help="default: the paper's budgets, VisPruner and the official path")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--new-tokens", type=positive_int, default=16)
    parser.add_argument("--text-tokens", type=positive_int, default=64,
                        help="text tokens around the image (vicuna_v1 system prompt + a short question: ~64)")
    parser.add_argument("--image-size", type=image_size, default=(672, 672),
                        help="WIDTHxHEIGHT of the image for anyres models (decides the crop grid)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--json", help="write the meta data and rows to this JSON file")
    parser.add_argument("--plot", help="write a PNG plot here")
    parser.add_argument("--markdown", help="also write the markdown tables here")
    parser.add_argument("--in-process", action="store_true", help="one process, one model for all rows")
    parser.add_argument("--compile", action="store_true",
                        help="also measure the compiled path (llava.model.compiled: static KV cache + torch.compile, "
                             "CUDA graphs on CUDA): a '+compile' row beside each eager row")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled rows (aot_eager: no code generation, smoke tests)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def resolve_methods(specs: list[str] | None, anyres: bool) -> list[BenchMethod]:
    """Parse the specs; vanilla first (every ratio needs it), and for each official row our own method
    at the same budget (the comparison needs it)."""
    methods = [parse_method(s) for s in (specs or default_methods(anyres))]
    ordered = [m for m in methods if m.is_vanilla][:1] or [parse_method("none")]

    def same(a: BenchMethod, b: BenchMethod) -> bool:
        # the same setting however it is spelt (visionzip:64 = visionzip:dominant=54,contextual=10): one row
        return a.official == b.official and a.compression.spec() == b.compression.spec()

    for method in methods:
        if method.official:
            ours = parse_method(method.ours_spec)
            if not any(same(m, ours) for m in methods + ordered):
                ordered.append(ours)
        if not method.is_vanilla and not any(same(m, method) for m in ordered):
            ordered.append(method)
    return ordered


def is_anyres_source(args) -> bool:
    if args.geometry:
        return get_geometry(args.geometry).anyres
    from llava.model.builder import inspect_checkpoint

    return inspect_checkpoint(args.model).config.get("image_aspect_ratio") == "anyres"


def build_model(args):
    dtype = DTYPES[args.dtype]
    if args.geometry:
        return build_geometry_model(get_geometry(args.geometry), args.layers, dtype, args.device)
    return load_model(args.model, args.layers, dtype, args.device, args.model_base)


def settings_from(args) -> Settings:
    return Settings(repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens, device=args.device,
                    stages=tuple(args.stages), compile_backend=args.compile_backend)


def method_rows(model, inputs, method: BenchMethod, args, compiled) -> list[dict]:
    """The eager row of one method, and its compiled row with --compile (official rows: eager only)."""
    rows = [run_method(model, inputs, method, settings_from(args))]
    if compiled is not None and not method.official:
        if method.compression.enabled and method.compression.stage == "llm":
            # the compiled path refuses in-LLM methods (llava.model.compiled.check_compilable): eager row only
            print(f"--compile: no compiled row for the in-LLM method {method.spec} (it runs eager only)",
                  file=sys.stderr)
        else:
            rows.append(run_compiled(model, inputs, method, settings_from(args), compiled))
    return rows


def compiled_runner(args, model):
    if not args.compile:
        return None
    from llava.model.compiled import CompiledLlava

    return CompiledLlava(model, backend=args.compile_backend)


def run_rows_in_process(args, methods: list[BenchMethod]) -> list[dict]:
    model = build_model(args)
    compiled = compiled_runner(args, model)
    rows = []
    for batch in args.batch:
        inputs = make_inputs(model, batch, args.text_tokens, args.image_size)
        for method in methods:
            for row in method_rows(model, inputs, method, args, compiled):
                rows.append(row)
                progress(row)
    return rows


def worker_command(args, batch: int, method: BenchMethod) -> list[str]:
    command = [sys.executable, "-m", "llava.bench", "--worker", "--batch", str(batch), "--methods", method.spec,
               "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens),
               "--text-tokens", str(args.text_tokens), "--image-size", "x".join(map(str, args.image_size)),
               "--stages", *args.stages]
    if args.compile:
        command += ["--compile", "--compile-backend", args.compile_backend]
    command += ["--model", args.model] if args.model else ["--geometry", args.geometry]
    if args.model_base:
        command += ["--model-base", args.model_base]
    if args.layers:
        command += ["--layers", str(args.layers)]
    return command


def run_rows_in_workers(args, methods: list[BenchMethod]) -> list[dict]:
    rows = []
    for batch in args.batch:
        for method in methods:
            done = subprocess.run(worker_command(args, batch, method), capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"benchmark worker for {method.spec} (batch {batch}) failed:\n{done.stderr[-4000:]}")
            for row in json.loads(done.stdout.strip().splitlines()[-1]):
                rows.append(row)
                progress(row)
    return rows


def progress(row: dict) -> None:
    parts = [f"batch {row['batch']} {row['label']}: {row.get('visual_tokens')} visual tokens"]
    for key, name in (("step_s", "step"), ("prefill_s", "prefill"), ("generate_s", "generate")):
        if row.get(key) is not None:
            parts.append(f"{name} {row[key]:.3f} s")
    print(", ".join(parts), file=sys.stderr, flush=True)


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # not available on this platform
        return "?"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if args.worker:
        model = build_model(args)
        inputs = make_inputs(model, args.batch[0], args.text_tokens, args.image_size)
        rows = method_rows(model, inputs, parse_method(args.methods[0]), args, compiled_runner(args, model))
        print(json.dumps(rows))
        return {"rows": rows}

    methods = resolve_methods(args.methods, is_anyres_source(args))
    peaks = roofline.device_peaks(args.device, DTYPES[args.dtype])  # before the rows: a quiet device
    meta = {
        "model": args.geometry or args.model, "geometry": args.geometry, "device": args.device, "dtype": args.dtype,
        "batches": args.batch, "methods": [m.spec for m in methods], "repeats": args.repeats, "warmup": args.warmup,
        "new_tokens": args.new_tokens, "text_tokens": args.text_tokens, "image_size": list(args.image_size),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_start": load_average(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m llava.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows = (run_rows_in_process if args.in_process else run_rows_in_workers)(args, methods)
    meta["load_end"] = load_average()
    meta["llm_layers"] = rows[0]["llm_layers"]
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    if args.geometry:
        # the LLM side's FLOPs at the geometry's real depth (the ratios do not depend on the depth)
        # (a --layers deeper than the geometry's own, e.g. the tiny one's 2, is the depth to report)
        full_depth = max(get_geometry(args.geometry).llm.layers, meta["llm_layers"])
        meta["llm_layers_full_depth"] = full_depth
        for row in rows:
            row["llm_flops_full_depth"] = full_depth * row["llm_flops_per_layer"]
            if "llm_visual_schedule" in row:  # in-LLM methods: their schedule at the real depth
                row["llm_flops_full_depth"] = runner.schedule_flops(
                    row, full_depth, row["shape_hidden"], row["shape_intermediate"])
    meta["peaks"] = peaks.to_dict()
    meta["compile"] = args.compile
    roofline.add_bounds(rows, peaks, args.new_tokens)
    report.add_ratios(rows)
    text = report.markdown_report(meta, rows) + "\n" + roofline.markdown(peaks, rows) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    if args.json:
        report.write_json(args.json, meta, rows)
    if args.plot:
        report.plot(args.plot, meta, rows)
    return {"meta": meta, "rows": rows}
