"""A deterministic fraction of a LLaVA data file (VisionZip‡ tunes on 1/10 of llava_v1_5_mix665k.json).

Image and text-only samples are drawn separately (``fraction`` of each, seeded), so the subset keeps the
file's mix; the chosen records keep their order in the file. Re-running with the same input, fraction and
seed gives the same file byte for byte, and an existing output that differs is never overwritten silently.

    python scripts/make_subset.py --input llava_v1_5_mix665k.json --output llava_v1_5_mix665k_10pct.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys

from .dataset import load_records


def subset_indices(records: list[dict], fraction: float, seed: int) -> list[int]:
    """Indices (ascending) of ``round(fraction * n)`` image and ``round(fraction * m)`` text-only records."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = random.Random(seed)
    chosen: list[int] = []
    for with_image in (True, False):
        group = [i for i, record in enumerate(records) if ("image" in record) == with_image]
        count = round(fraction * len(group))
        chosen.extend(rng.sample(group, count))
    return sorted(chosen)


def subset_bytes(records: list[dict], indices: list[int]) -> bytes:
    return json.dumps([records[i] for i in indices], ensure_ascii=False, indent=None).encode("utf-8")


def make_subset(input_path: str, output_path: str, fraction: float = 0.1, seed: int = 0, force: bool = False) -> dict:
    """Write the subset to ``output_path`` (atomically) and return a summary."""
    records = load_records(input_path)
    indices = subset_indices(records, fraction, seed)
    payload = subset_bytes(records, indices)
    digest = hashlib.sha256(payload).hexdigest()
    images = sum(1 for i in indices if "image" in records[i])
    summary = {
        "input": input_path,
        "output": output_path,
        "fraction": fraction,
        "seed": seed,
        "records": len(indices),
        "with_image": images,
        "text_only": len(indices) - images,
        "input_records": len(records),
        "sha256": digest,
    }
    if os.path.exists(output_path):
        with open(output_path, "rb") as handle:
            existing = hashlib.sha256(handle.read()).hexdigest()
        if existing == digest:
            summary["written"] = False
            return summary
        if not force:
            raise FileExistsError(
                f"{output_path} exists and differs from the subset of {input_path} (fraction {fraction}, seed "
                f"{seed}); pass --force to replace it"
            )
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    temporary = output_path + ".partial"
    with open(temporary, "wb") as handle:
        handle.write(payload)
    os.replace(temporary, output_path)
    summary["written"] = True
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="LLaVA data file (JSON list or .jsonl)")
    parser.add_argument("--output", required=True, help="subset file to write (JSON list)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing, different output file")
    args = parser.parse_args(argv)
    summary = make_subset(args.input, args.output, args.fraction, args.seed, args.force)
    state = "wrote" if summary["written"] else "up to date:"
    print(
        f"{state} {summary['output']}: {summary['records']} of {summary['input_records']} records "
        f"({summary['with_image']} with an image, {summary['text_only']} text-only), fraction "
        f"{summary['fraction']}, seed {summary['seed']}, sha256 {summary['sha256'][:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
