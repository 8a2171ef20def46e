"""Score an answers file and write a results json the report collects.

    python -m llava.eval.evaluate pope --annotation-dir .../pope/coco --question-file .../llava_pope_test.jsonl \\
        --result-file .../merge.jsonl --output results/<model>/<method>/<budget>/pope.json

Subcommands: textvqa, gqa, pope, mme, sqa, seed, mmbench (also MMBench-CN with ``--name mmbench_cn``),
mmmu, llavabench (from an external judge's reviews), and ``external`` to record a score that an evaluation
server (VQAv2, VizWiz, MMBench test) or a GPT judge (MM-Vet) gave back.

The results json holds the headline ``score``, all ``metrics``, and the generation settings found beside
the answers file (``<answers>.settings.json``: model, compression, budget), so that a results folder
is self-describing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

from . import scoring
from .benchmarks import BENCHMARKS, get_benchmark
from .data_io import read_json, settings_path_for, write_json


def attach_context(result: dict, result_file=None, name: str | None = None) -> dict:
    """Add the benchmark name, the answers file and its generation settings to a scorer's result."""
    if name is not None:
        get_benchmark(name)
        result["benchmark"] = name
    result["evaluated_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if result_file is not None:
        result["answers_file"] = str(result_file)
        settings = settings_path_for(result_file)
        result["generation"] = read_json(settings) if settings.is_file() else None
    return result


def external_result(benchmark: str, score: float, metric: str | None = None, source: str | None = None,
                    settings_file=None) -> dict:
    """A results record for a score computed elsewhere (evaluation server, GPT judge)."""
    spec = get_benchmark(benchmark)
    metric = metric or spec.headline
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or score < 0:
        raise ValueError(f"--score must be a finite number >= 0 (as the server or judge reported it), got {score!r}")
    result = {
        "benchmark": benchmark,
        "metric": metric,
        "score": float(score),
        "metrics": {metric: float(score)},
        "num_questions": None,
        "source": source or ("evaluation server" if spec.scoring == "server" else "external judge"),
    }
    result = attach_context(result)
    if settings_file is not None:
        result["generation"] = read_json(settings_file)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)

    def add(name: str, help_text: str, *args: tuple[str, str, bool]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        for flag, flag_help, required in args:
            p.add_argument(flag, required=required, help=flag_help)
        p.add_argument("--output", help="results json to write (also printed)")
        p.add_argument("--name", help="benchmark name to record (e.g. mmbench_cn); default: the subcommand")
        return p

    result = ("--result-file", "answers jsonl (merged chunks)", True)
    questions_opt = ("--question-file", "question jsonl: score only its questions", False)
    add("textvqa", "TextVQA accuracy", ("--annotation-file", "TextVQA_0.5.1_val.json", True), result, questions_opt)
    add("gqa", "GQA accuracy", ("--annotation-file", "testdev_balanced_questions.json", True), result, questions_opt)
    add("pope", "POPE F1 / accuracy / precision / recall / yes-ratio",
        ("--annotation-dir", "folder with coco_pope_<split>.json", True),
        ("--question-file", "llava_pope_test.jsonl", True), result)
    add("mme", "MME perception + cognition", ("--gt-dir", "MME_Benchmark_release_version", True),
        ("--question-file", "llava_mme.jsonl", True), result)
    p = add("sqa", "ScienceQA accuracy and IMG accuracy",
            ("--base-dir", "folder with problems.json and pid_splits.json", True), result)
    p.add_argument("--split", default="test")
    add("seed", "SEED-Bench accuracy", ("--annotation-file", "SEED-Bench.json", True), result, questions_opt)
    add("mmbench", "MMBench circular accuracy (dev)", ("--annotation-file", "the MMBench dev tsv", True), result)
    add("mmmu", "MMMU accuracy", ("--question-file", "llava_mmmu_val.jsonl (with answers)", True), result)
    add("llavabench", "LLaVA-Bench relative score from a judge's reviews",
        ("--review-file", "the judge's reviews jsonl (each with tuple = [reference, model] scores)", True),
        ("--question-file", "questions.jsonl, for categories", False))
    p = sub.add_parser("external", help="record a score from an evaluation server or a GPT judge")
    p.add_argument("--name", required=True, choices=sorted(BENCHMARKS), help="benchmark")
    p.add_argument("--score", required=True, type=float)
    p.add_argument("--metric", help="metric name (default: the benchmark's headline)")
    p.add_argument("--source", help="where the score comes from (e.g. 'EvalAI test-dev', 'MM-Vet GPT-4 grader')")
    p.add_argument("--settings-file", help="the generation settings json of the answers that were scored")
    p.add_argument("--output", help="results json to write (also printed)")
    return parser


def run(args: argparse.Namespace) -> dict:
    b = args.benchmark
    if b == "external":
        return external_result(args.name, args.score, args.metric, args.source, args.settings_file)
    if b == "textvqa":
        result = scoring.score_textvqa(args.annotation_file, args.result_file, args.question_file)
    elif b == "gqa":
        result = scoring.score_gqa(args.annotation_file, args.result_file, args.question_file)
    elif b == "pope":
        result = scoring.score_pope(args.annotation_dir, args.question_file, args.result_file)
    elif b == "mme":
        result = scoring.score_mme(args.gt_dir, args.question_file, args.result_file)
    elif b == "sqa":
        result = scoring.score_scienceqa(args.base_dir, args.result_file, args.split)
    elif b == "seed":
        result = scoring.score_seed(args.annotation_file, args.result_file, args.question_file)
    elif b == "mmbench":
        result = scoring.score_mmbench(args.annotation_file, args.result_file)
    elif b == "mmmu":
        result = scoring.score_mmmu(args.question_file, args.result_file)
    else:
        result = scoring.score_llavabench_reviews(args.review_file, args.question_file)
        return attach_context(result, None, args.name)
    return attach_context(result, args.result_file, args.name)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.output:
        write_json(args.output, result)
    summary = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    print(f"{result['benchmark']}: {result['metric']} = {result['score']:.2f}")
    print(json.dumps(summary, indent=1))
    if args.output:
        print(f"wrote {Path(args.output)}")
    return result


if __name__ == "__main__":
    main()
