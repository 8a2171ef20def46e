"""Vision-tower cost (time and peak memory): the vanilla SDPA tower vs our VisionZip vs the official (eager) path.

    python -m visionzip.tower_cost                      # ViT-L/14-336 geometry, batch 1 and 4, CPU
    python -m visionzip.tower_cost --batch 1 8 --device cuda --dtype bfloat16
    python -m visionzip.tower_cost --layers 6 --repeats 3   # a capped tower, for a quick look

Random weights in the real geometry (nothing is downloaded). Each variant runs in its own process so that
its peak memory is measured cleanly; ratios are to the vanilla tower measured in the same run.

- vanilla:   what LLaVA does: ``tower(pixels, output_hidden_states=True).hidden_states[-2]`` with SDPA.
- visionzip: ``visionzip.zip_vision_tokens`` (SDPA tower, stops after the scored layer, CLS row only,
             scatter-add merge).
- official:  the official VisionZip path re-enacted (``visionzip.reference``): eager attention with
             ``output_attentions=True`` in all layers, dense one-hot merge.
- vispruner: ``visionzip.vispruner_select`` (eager kernels by default, for bit-exact official selection).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

VARIANTS = ("vanilla", "visionzip", "official", "vispruner")


def vit_l14_336_config(layers: int = 24):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768,
    )


def run_worker(args) -> dict:
    from transformers import CLIPVisionModel

    import visionzip
    from visionzip.profiling import measure
    from visionzip.reference import official_visionzip

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = CLIPVisionModel(vit_l14_336_config(args.layers)).to(args.device, dtype).eval()
    pixels = torch.randn(args.batch, 3, 336, 336, device=args.device, dtype=dtype)
    dominant, contextual = args.dominant, args.contextual
    calls = {
        "vanilla": lambda: model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:],
        "visionzip": lambda: visionzip.zip_vision_tokens(model, pixels, dominant, contextual).tokens,
        "official": lambda: official_visionzip(model, pixels, dominant, contextual)[0],
        "vispruner": lambda: visionzip.vispruner_select(model, pixels, dominant + contextual).tokens,
    }
    with torch.no_grad():
        result = measure(calls[args.worker], repeats=args.repeats, warmup=args.warmup, device=args.device)
    return {"variant": args.worker, "batch": args.batch, "median_s": result.median, "peak_mib": result.peak_mib}


def run_variant(variant: str, batch: int, args) -> dict:
    command = [
        sys.executable, "-m", "visionzip.tower_cost", "--worker", variant, "--batch", str(batch),
        "--layers", str(args.layers), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        "--device", args.device, "--dtype", args.dtype,
        "--dominant", str(args.dominant), "--contextual", str(args.contextual),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| batch | variant | median time (s) | time vs vanilla | peak memory (MiB) | memory vs vanilla |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for batch in sorted({r["batch"] for r in rows}):
        group = [r for r in rows if r["batch"] == batch]
        base = next(r for r in group if r["variant"] == "vanilla")
        for r in group:
            lines.append(
                f"| {batch} | {r['variant']} | {r['median_s']:.3f} | {r['median_s'] / base['median_s']:.2f}x "
                f"| {r['peak_mib']:.0f} | {r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--layers", type=int, default=24, help="transformer layers of the tower (24 = ViT-L)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--dominant", type=int, default=54)
    parser.add_argument("--contextual", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.batch = args.batch[0]
        print(json.dumps(run_worker(args)))
        return
    rows = []
    for batch in args.batch:
        for variant in ["vanilla"] + [v for v in args.variants if v != "vanilla"]:
            rows.append(run_variant(variant, batch, args))
            print(f"batch {batch} {variant}: {rows[-1]['median_s']:.3f} s, {rows[-1]['peak_mib']:.0f} MiB", file=sys.stderr)
    print(f"ViT-L/14-336 geometry ({args.layers} layers), random weights, {args.device} {args.dtype}, "
          f"VisionZip {args.dominant}+{args.contextual}, median of {args.repeats}\n")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
