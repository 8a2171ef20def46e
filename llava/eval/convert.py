"""Converters from answers files to the files official servers or external judges take.

Benchmarks whose answers are not public (VQAv2 test-dev, VizWiz test, MMBench test) are scored by their
servers; MM-Vet and LLaVA-Bench are scored by a GPT judge (not run here: it needs an API key and costs
money). The score a server or judge gives back is recorded with
``python -m llava.eval.evaluate external --benchmark <name> --score <value> --output <results json>``.

Command line: ``python -m llava.eval.convert <kind> ...``, kinds: vqav2, vizwiz, mmbench-submission,
mmvet, llavabench-judge, gqa-predictions (``--help`` on each).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .data_io import (
    answers_by_id,
    check_coverage,
    check_known,
    index_unique,
    read_jsonl,
    read_tsv,
    write_json,
    write_jsonl,
)
from .normalize import normalize_vqa_answer
from .scoring import mmbench_key, normalize_gqa_prediction
from .xlsx import write_xlsx


def _answers(result_file) -> dict:
    return answers_by_id(result_file, key_of=lambda r: str(r["question_id"]))


def vqav2_submission(test_question_file, result_file, output, split_question_file=None) -> Path:
    """EvalAI's VQAv2 file: ``[{"question_id": int, "answer": str}]`` over *all* test2015 questions.

    Questions of the evaluated split (``split_question_file``, e.g. test-dev) must all be answered;
    the other test2015 questions get an empty answer, as the server requires every id."""
    answers = _answers(result_file)
    questions = read_jsonl(test_question_file)
    all_ids = [str(q["question_id"]) for q in questions]
    check_known(answers, set(all_ids), "VQAv2 test2015", result_file)
    if split_question_file is not None:
        check_coverage([str(q["question_id"]) for q in read_jsonl(split_question_file)], answers,
                       "VQAv2 split", result_file)
    rows = [
        {"question_id": int(q["question_id"]),
         "answer": normalize_vqa_answer(answers[qid]["text"]) if qid in answers else ""}
        for q, qid in zip(questions, all_ids)
    ]
    return write_json(output, rows, indent=None)


def vizwiz_submission(question_file, result_file, output) -> Path:
    """EvalAI's VizWiz file: ``[{"image": name, "answer": str}]`` for every test question."""
    answers = _answers(result_file)
    questions = read_jsonl(question_file)
    ids = [str(q["question_id"]) for q in questions]
    check_known(answers, set(ids), "VizWiz", result_file)
    check_coverage(ids, answers, "VizWiz", result_file)
    rows = [{"image": q["image"], "answer": normalize_vqa_answer(answers[qid]["text"])}
            for q, qid in zip(questions, ids)]
    return write_json(output, rows, indent=None)


MMBENCH_DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")


def mmbench_submission(annotation_file, result_file, output) -> Path:
    """The MMBench server's Excel file: the tsv without images and metadata, plus a ``prediction``
    column after the options (round 0's answer when ``--all-rounds`` was used: the server does the
    circular evaluation from the tsv's own circular copies)."""
    rows = read_tsv(annotation_file)
    answers = index_unique(read_jsonl(result_file), mmbench_key, f"answers file {result_file}")
    round0 = {qid: record for (qid, round_id), record in answers.items() if round_id == 0}
    indexes = [str(row["index"]) for row in rows]
    check_known({qid for qid, _ in answers}, set(indexes), "MMBench", result_file)
    check_coverage(indexes, round0, "MMBench", result_file)
    columns = [c for c in rows[0] if c not in MMBENCH_DROPPED_COLUMNS] if rows else ["index"]
    after = max((columns.index(c) for c in ("A", "B", "C", "D") if c in columns), default=len(columns) - 1)
    header = columns[: after + 1] + ["prediction"] + columns[after + 1:]
    table = []
    for row, index in zip(rows, indexes):
        values = {**{c: row[c] for c in columns}, "prediction": round0[index]["text"]}
        table.append([values[c] for c in header])
    return write_xlsx(output, header, table)


def mmvet_results(result_file, output) -> Path:
    """MM-Vet's grader input: ``{"v1_<id>": answer}``."""
    records = read_jsonl(result_file)
    index_unique(records, lambda r: str(r["question_id"]), f"answers file {result_file}")
    results = {}
    for record in records:
        qid = str(record["question_id"])
        results[qid if qid.startswith("v1_") else f"v1_{qid}"] = record["text"]
    return write_json(output, results)


def llavabench_judge_input(question_file, context_file, reference_file, result_file, output) -> Path:
    """One line per LLaVA-Bench question with everything a judge compares: the image's caption
    (context), the question, the reference (GPT-4) answer and the model's answer."""
    questions = read_jsonl(question_file)
    ids = [str(q["question_id"]) for q in questions]
    answers = _answers(result_file)
    check_known(answers, set(ids), "LLaVA-Bench", result_file)
    check_coverage(ids, answers, "LLaVA-Bench", result_file)
    references = _answers(reference_file)
    check_coverage(ids, references, "LLaVA-Bench reference", reference_file)
    contexts = index_unique(read_jsonl(context_file), lambda r: r["image"], f"contexts {context_file}")
    lines = []
    for question, qid in zip(questions, ids):
        context = contexts.get(question["image"])
        if context is None:
            raise ValueError(f"{context_file} has no caption for image {question['image']!r} (question {qid})")
        lines.append({
            "question_id": question["question_id"],
            "category": question.get("category"),
            "image": question["image"],
            "context": context.get("caption", ""),
            "question": question["text"],
            "reference_answer": references[qid]["text"],
            "answer": answers[qid]["text"],
        })
    return write_jsonl(output, lines)


def gqa_predictions(result_file, output) -> Path:
    """The official GQA ``eval.py`` predictions file: ``[{"questionId", "prediction"}]``."""
    records = read_jsonl(result_file)
    index_unique(records, lambda r: str(r["question_id"]), f"answers file {result_file}")
    rows = [{"questionId": r["question_id"], "prediction": normalize_gqa_prediction(r["text"])} for r in records]
    return write_json(output, rows, indent=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)

    p = sub.add_parser("vqav2", help="VQAv2 test-dev answers -> EvalAI json")
    p.add_argument("--test-question-file", required=True, help="all test2015 questions (llava_vqav2_mscoco_test2015.jsonl)")
    p.add_argument("--split-question-file", help="the split that was generated (test-dev): all must be answered")
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", required=True)

    p = sub.add_parser("vizwiz", help="VizWiz test answers -> EvalAI json")
    p.add_argument("--question-file", required=True)
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", required=True)

    p = sub.add_parser("mmbench-submission", help="MMBench / MMBench-CN answers -> the server's xlsx")
    p.add_argument("--annotation-file", required=True, help="the MMBench tsv that was generated")
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", required=True, help="an .xlsx path")

    p = sub.add_parser("mmvet", help="MM-Vet answers -> the GPT grader's json")
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", required=True)

    p = sub.add_parser("llavabench-judge", help="LLaVA-Bench answers -> one judge request per question")
    p.add_argument("--question-file", required=True)
    p.add_argument("--context-file", required=True, help="context.jsonl (image captions)")
    p.add_argument("--reference-file", required=True, help="answers_gpt4.jsonl")
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", required=True)

    p = sub.add_parser("gqa-predictions", help="GQA answers -> the official eval.py predictions json")
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", required=True)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.kind == "vqav2":
        out = vqav2_submission(args.test_question_file, args.result_file, args.output, args.split_question_file)
    elif args.kind == "vizwiz":
        out = vizwiz_submission(args.question_file, args.result_file, args.output)
    elif args.kind == "mmbench-submission":
        out = mmbench_submission(args.annotation_file, args.result_file, args.output)
    elif args.kind == "mmvet":
        out = mmvet_results(args.result_file, args.output)
    elif args.kind == "llavabench-judge":
        out = llavabench_judge_input(args.question_file, args.context_file, args.reference_file,
                                     args.result_file, args.output)
    else:
        out = gqa_predictions(args.result_file, args.output)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
