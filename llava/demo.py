"""The README's main job on the embedded default (a tiny model the project builds itself).

    bash scripts/demo.sh            # = python -m llava.demo

1. Compression: VisionZip and VisPruner on an image at the paper's budgets (576 -> 192 / 128 / 64),
   with the measured time and memory of each, and a PNG marking the dominant and contextual tokens.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from visionzip.demo import build_tiny_clip, compression_demo, default_cache_dir, demo_image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="where the PNG and run outputs go")
    parser.add_argument("--cache-dir", default=None, help="where the tiny models are built (default .cache/)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    output = Path(args.output_dir)

    print("== 1. Visual-token compression on the tiny ViT-L/14-336-geometry tower ==")
    tower, processor = build_tiny_clip(cache / "tiny-clip-vit-l14-336")
    compression_demo(tower, processor, demo_image(), output / "visionzip_tokens.png", repeats=args.repeats)


if __name__ == "__main__":
    main()
