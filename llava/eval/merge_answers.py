"""Merge the answers of ``--num-chunks`` generation shards into one file (and one settings record).

    python -m llava.eval.merge_answers --output .../merge.jsonl .../4_0.jsonl .../4_1.jsonl ...

Unlike a plain ``cat``, it refuses shards that did not finish (their settings say so), shards made with
different settings, and questions answered twice, so a crashed GPU shows up here rather than as a
silently lower score.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .data_io import read_json, read_jsonl, settings_path_for, write_json, write_jsonl
from .formats import get_format

PER_SHARD = ("answers_file", "status", "num_questions", "num_answered", "started_at", "finished_at",
             "generation_seconds", "generated_tokens", "resumed_from", "chunk_idx", "host", "cuda_visible_devices")


def merge_answers(chunk_files: list, output) -> dict:
    if not chunk_files:
        raise ValueError("no answer shards to merge")
    shards = []
    for path in map(Path, chunk_files):
        settings_file = settings_path_for(path)
        if not settings_file.is_file():
            raise FileNotFoundError(f"{settings_file} is missing: was {path} written by llava.eval.generate?")
        settings = read_json(settings_file)
        if settings.get("status") != "complete":
            raise ValueError(f"{path} is incomplete ({settings.get('num_answered')}/{settings.get('num_questions')}"
                             " answered): run its generation again, it resumes")
        shards.append((path, settings, read_jsonl(path)))

    common = {k: v for k, v in shards[0][1].items() if k not in PER_SHARD}
    for path, settings, _ in shards[1:]:
        differing = sorted(k for k in set(common) | set(settings)
                           if k not in PER_SHARD and settings.get(k) != common.get(k))
        if differing:
            raise ValueError(f"{path} was generated with other settings than {shards[0][0]}: {differing}")

    fmt = get_format(common["format"])
    seen: dict[str, Path] = {}
    merged = []
    for path, _, records in shards:
        for record in records:
            key = fmt.answer_key(record)
            if key in seen:
                raise ValueError(f"question {key} is answered in both {seen[key]} and {path}")
            seen[key] = path
            merged.append(record)

    output = Path(output)
    write_jsonl(output, merged)
    summary = {
        **common,
        "status": "complete",
        "answers_file": str(output),
        "num_questions": sum(s["num_questions"] for _, s, _ in shards),
        "num_answered": len(merged),
        "generation_seconds": sum(s.get("generation_seconds", 0.0) for _, s, _ in shards),
        "generated_tokens": sum(s.get("generated_tokens", 0) for _, s, _ in shards),
        "shards": [{k: s.get(k) for k in PER_SHARD} for _, s, _ in shards],
    }
    write_json(settings_path_for(output), summary)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.merge_answers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("chunks", nargs="+", help="the shard answer files, in chunk order")
    args = parser.parse_args(argv)
    try:
        summary = merge_answers(args.chunks, args.output)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"merged {len(args.chunks)} shard(s), {summary['num_answered']} answers -> {args.output}")


if __name__ == "__main__":
    main()
