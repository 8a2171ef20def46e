"""Merge the answers of ``--num-chunks`` generation shards into one file (and one settings record).

    python -m llava.eval.merge_answers --output .../merge.jsonl .../4_0.jsonl .../4_1.jsonl ...

Unlike a plain ``cat``, it refuses shards that did not finish (their settings say so) or are still being
written (their lock is held), shards made with different settings, a set of shards that is not exactly
chunks 0..num_chunks-1 once each, a shard whose answers do not match its question count, questions
answered twice, and an ``--output`` that is one of the shards; so a crashed GPU or a forgotten shard
shows up here rather than as a silently lower score. The merged file is written atomically.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .data_io import (
    answers_lock,
    lock_path_for,
    read_json,
    read_jsonl,
    settings_path_for,
    write_json,
    write_jsonl,
)
from .formats import get_format

# answer notes (refused / truncated questions, ``llava.eval.generate.ANSWER_NOTES``) are counted per shard and
# summed in the merged record: shards that refused different questions were still made with the same settings
NOTE_KEYS = ("num_refused", "refused", "num_truncated", "truncated")
PER_SHARD = ("answers_file", "status", "num_questions", "num_answered", "started_at", "finished_at",
             "generation_seconds", "generated_tokens", "resumed_from", "chunk_idx", "host", "cuda_visible_devices",
             *NOTE_KEYS)


def merge_answers(chunk_files: list, output) -> dict:
    if not chunk_files:
        raise ValueError("no answer shards to merge")
    output = Path(output)
    inputs = {p.resolve() for path in map(Path, chunk_files) for p in (path, settings_path_for(path))}
    if output.resolve() in inputs or settings_path_for(output).resolve() in inputs:
        raise ValueError(f"--output {output} is one of the shards (or its settings file); write the merge elsewhere")
    shards = []
    for path in map(Path, chunk_files):
        if lock_path_for(path).exists():
            try:
                with answers_lock(path):  # a lock left by a dead process is taken over and released
                    pass
            except FileExistsError as err:
                raise ValueError(f"{path} is still being generated: {err.strerror}") from err
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

    num_chunks = common.get("num_chunks", 1)
    chunk_ids = [settings.get("chunk_idx", 0) for _, settings, _ in shards]
    repeated = sorted({c for c in chunk_ids if chunk_ids.count(c) > 1})
    if repeated:
        twice = [str(p) for (p, _, _), c in zip(shards, chunk_ids) if c == repeated[0]]
        raise ValueError(
            f"chunk(s) {repeated} given more than once: its questions would be answered in both {twice[0]} and "
            f"{twice[1]}"
        )
    missing = sorted(set(range(num_chunks)) - set(chunk_ids))
    if missing:
        raise ValueError(
            f"the questions were split into --num-chunks {num_chunks}, but chunk(s) {missing} are missing; give "
            f"all {num_chunks} shards (got chunks {sorted(chunk_ids)})"
        )
    stray = sorted(set(chunk_ids) - set(range(num_chunks)))
    if stray:
        raise ValueError(f"chunk index(es) {stray} are outside 0..{num_chunks - 1}")

    fmt = get_format(common["format"])
    seen: dict[str, Path] = {}
    merged = []
    for path, settings, records in shards:
        if len(records) != settings.get("num_questions"):
            raise ValueError(
                f"{path} holds {len(records)} answers but its settings count {settings.get('num_questions')} "
                "questions: the shard was changed after generation, or written twice at once"
            )
        for record in records:
            key = fmt.answer_key(record)
            if key in seen:
                raise ValueError(f"question {key} is answered twice ({seen[key]} and {path})")
            seen[key] = path
            merged.append(record)

    write_jsonl(output, merged)
    summary = {
        **common,
        "status": "complete",
        "answers_file": str(output),
        "num_questions": sum(s["num_questions"] for _, s, _ in shards),
        "num_answered": len(merged),
        "generation_seconds": sum(s.get("generation_seconds", 0.0) for _, s, _ in shards),
        "generated_tokens": sum(s.get("generated_tokens", 0) for _, s, _ in shards),
        "shards": [{k: s.get(k) for k in PER_SHARD if k not in NOTE_KEYS or s.get(k)} for _, s, _ in shards],
    }
    for note in ("refused", "truncated"):  # written only when non-zero, as generate does
        listed = [entry for _, s, _ in shards for entry in s.get(note) or []]
        count = sum(s.get(f"num_{note}", 0) for _, s, _ in shards)
        if count:
            summary[f"num_{note}"], summary[note] = count, listed
    write_json(settings_path_for(output), summary)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.merge_answers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("chunks", nargs="+", help="the shard answer files, in chunk order")
    args = parser.parse_args(argv)
    try:
        summary = merge_answers(args.chunks, args.output)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"merged {len(args.chunks)} shard(s), {summary['num_answered']} answers -> {args.output}")


if __name__ == "__main__":
    main()
