"""Submission converters, the evaluate CLI's results files, budgets, and the paper-table report."""
from __future__ import annotations

import csv
import json

import pytest

from llava.eval import convert, evaluate, report
from llava.eval.budgets import resolve_budget
from llava.eval.data_io import read_json, read_jsonl, write_json, write_jsonl, write_tsv
from llava.eval.xlsx import column_name, read_xlsx


def answers(*pairs):
    return [{"question_id": qid, "prompt": "q", "text": text} for qid, text in pairs]


# -------------------------------------------------------------------------------------------- converters


def test_vqav2_submission_covers_all_test_questions(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"question_id": i, "image": "x", "text": "?"} for i in (1, 2, 3)])
    write_jsonl(tmp_path / "dev.jsonl", [{"question_id": i, "image": "x", "text": "?"} for i in (1, 2)])
    write_jsonl(tmp_path / "ans.jsonl", answers((2, "Two."), (1, "The Dog")))
    out = convert.vqav2_submission(tmp_path / "test.jsonl", tmp_path / "ans.jsonl", tmp_path / "up.json",
                                   tmp_path / "dev.jsonl")
    assert read_json(out) == [{"question_id": 1, "answer": "dog"}, {"question_id": 2, "answer": "2"},
                              {"question_id": 3, "answer": ""}]
    write_jsonl(tmp_path / "short.jsonl", answers((1, "a")))
    with pytest.raises(ValueError, match=r"no answer for 1 VQAv2 split question\(s\), e.g. '2'"):
        convert.vqav2_submission(tmp_path / "test.jsonl", tmp_path / "short.jsonl", tmp_path / "up.json",
                                 tmp_path / "dev.jsonl")


def test_vizwiz_mmvet_gqa_converters(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "VizWiz_0.jpg", "text": "?"},
                                       {"question_id": 1, "image": "VizWiz_1.jpg", "text": "?"}])
    write_jsonl(tmp_path / "ans.jsonl", answers((1, "Unanswerable."), (0, "A red can")))
    assert read_json(convert.vizwiz_submission(tmp_path / "q.jsonl", tmp_path / "ans.jsonl", tmp_path / "v.json")) == [
        {"image": "VizWiz_0.jpg", "answer": "red can"}, {"image": "VizWiz_1.jpg", "answer": "unanswerable"}]
    assert read_json(convert.mmvet_results(tmp_path / "ans.jsonl", tmp_path / "m.json")) == {
        "v1_1": "Unanswerable.", "v1_0": "A red can"}
    assert read_json(convert.gqa_predictions(tmp_path / "ans.jsonl", tmp_path / "g.json")) == [
        {"questionId": 1, "prediction": "unanswerable"}, {"questionId": 0, "prediction": "a red can"}]


def test_mmbench_submission_xlsx(tmp_path):
    fields = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows = [{"index": str(i), "question": f"q{i} <&>", "hint": "nan", "A": "x", "B": "y", "C": "nan", "D": "nan",
             "answer": "", "category": "c", "image": "AAAA", "source": "s", "l2-category": "l", "comment": "nan",
             "split": "test"} for i in (3, 4)]
    write_tsv(tmp_path / "test.tsv", rows, fields)
    records = [{"question_id": 4, "round_id": 0, "text": "B"}, {"question_id": 3, "round_id": 0, "text": "A"},
               {"question_id": 3, "round_id": 1, "text": "B"}]
    write_jsonl(tmp_path / "ans.jsonl", records)
    out = convert.mmbench_submission(tmp_path / "test.tsv", tmp_path / "ans.jsonl", tmp_path / "up.xlsx")
    sheet = read_xlsx(out)
    assert sheet[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert sheet[1][:2] == ["3", "q3 <&>"] and sheet[1][6] == "A"  # round 0's answer
    assert sheet[2][6] == "B"
    assert column_name(0) == "A" and column_name(26) == "AA" and column_name(701) == "ZZ"


def test_llavabench_judge_input(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "0.jpg", "text": "What?", "category": "conv"}])
    write_jsonl(tmp_path / "ctx.jsonl", [{"id": "a", "image": "0.jpg", "caption": "A cat."}])
    write_jsonl(tmp_path / "ref.jsonl", answers((0, "A cat on a mat.")))
    write_jsonl(tmp_path / "ans.jsonl", answers((0, "A dog.")))
    out = convert.llavabench_judge_input(tmp_path / "q.jsonl", tmp_path / "ctx.jsonl", tmp_path / "ref.jsonl",
                                         tmp_path / "ans.jsonl", tmp_path / "judge.jsonl")
    (line,) = read_jsonl(out)
    assert (line["context"], line["reference_answer"], line["answer"]) == ("A cat.", "A cat on a mat.", "A dog.")


# ----------------------------------------------------------------------------------------- evaluate CLI


def test_evaluate_cli_records_generation_settings(tmp_path, capsys):
    write_json(tmp_path / "gqa.json", {"1": {"answer": "yes"}, "2": {"answer": "no"}})
    write_jsonl(tmp_path / "merge.jsonl", answers(("1", "yes"), ("2", "yes")))
    write_json(tmp_path / "merge.settings.json", {"model_path": "m", "method": "visionzip", "visual_tokens": 64})
    out = tmp_path / "results" / "gqa.json"
    evaluate.main(["gqa", "--annotation-file", str(tmp_path / "gqa.json"), "--result-file",
                   str(tmp_path / "merge.jsonl"), "--output", str(out)])
    saved = read_json(out)
    assert saved["score"] == pytest.approx(50.0)
    assert saved["generation"]["visual_tokens"] == 64
    assert "gqa: accuracy = 50.00" in capsys.readouterr().out

    evaluate.main(["external", "--name", "mmvet", "--score", "31.1", "--output", str(tmp_path / "mmvet.json"),
                   "--settings-file", str(tmp_path / "merge.settings.json")])
    ext = read_json(tmp_path / "mmvet.json")
    assert (ext["benchmark"], ext["metric"], ext["score"]) == ("mmvet", "score", 31.1)
    assert ext["source"] == "external judge" and ext["generation"]["method"] == "visionzip"

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["gqa", "--annotation-file", str(tmp_path / "gqa.json"), "--result-file",
                       str(tmp_path / "nope.jsonl")])
    assert exit_info.value.code == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- budgets


def test_budgets_follow_the_paper_tables():
    run = resolve_budget("visionzip", "64", "v1.5")
    assert (run.compression.dominant, run.compression.contextual, run.label, run.visual_tokens) == (54, 10, "64", 64)
    run = resolve_budget("visionzip", 640, "v1.6")
    assert (run.compression.dominant, run.compression.contextual, run.visual_tokens) == (108, 20, 640)
    run = resolve_budget("visionzip", "27,5", "v1.6")
    assert (run.label, run.visual_tokens, run.spec) == ("27-5", 160, "visionzip:dominant=27,contextual=5")
    run = resolve_budget("vispruner", "320", "v1.6")
    assert run.compression.tokens == 64 and run.spec == "vispruner:tokens=64,important_ratio=0.5"
    run = resolve_budget("none", None, "v1.6")
    assert (run.method, run.label, run.visual_tokens, run.compression.enabled) == ("none", "full", 2880, False)
    with pytest.raises(ValueError, match="must divide by 5; got 101"):
        resolve_budget("visionzip", "101", "v1.6")
    with pytest.raises(ValueError, match="exceeds the 576 visual tokens"):
        resolve_budget("visionzip", "600", "v1.5")
    with pytest.raises(ValueError, match="needs a token budget"):
        resolve_budget("vispruner", None)
    with pytest.raises(ValueError, match="unknown compression method 'nosuchmethod'"):
        resolve_budget("nosuchmethod", "64")


# --------------------------------------------------------------------------------------------- report


def _result(root, model, method, budget, bench, score, tokens=None, family="v1.5"):
    generation = {"budget_family": family, "visual_tokens": tokens, "method": method}
    write_json(root / model / method / budget / f"{bench}.json",
               {"benchmark": bench, "score": score, "metric": "m", "metrics": {"m": score, "alt": score / 2},
                "generation": generation})


def test_report_table_relative_scores_and_averages(tmp_path):
    root = tmp_path / "results"
    vanilla = {"gqa": 60.0, "pope": 80.0, "mme": 1800.0, "mmvet": 30.0}
    zipped = {"gqa": 57.0, "pope": 76.0, "mme": 1620.0, "mmvet": 33.0}
    for bench, score in vanilla.items():
        _result(root, "llava-v1.5-7b", "none", "full", bench, score, 576)
    for bench, score in zipped.items():
        _result(root, "llava-v1.5-7b", "visionzip", "64", bench, score, 64)
    _result(root, "llava-v1.5-7b", "visionzip", "192", "gqa", 60.0, 192)  # a partial row

    out = report.build_report(root, tmp_path / "out")
    rows = out["rows"]["llava-v1.5-7b"]
    assert [(r.method, r.budget) for r in rows] == [("none", "full"), ("visionzip", "192"), ("visionzip", "64")]
    vz64 = rows[2]
    # relative: 95, 95, 90, 110 -> mean 97.5; without the unstable MMVet: (95 + 95 + 90) / 3
    assert vz64.relative == pytest.approx({"gqa": 95.0, "pope": 95.0, "mme": 90.0, "mmvet": 110.0})
    columns = report.table_columns(rows, None)
    assert columns == ["gqa", "mme", "pope", "mmvet"]  # paper order
    assert report.average(vz64, columns) == (pytest.approx(97.5), 4)
    assert report.average(vz64, ["gqa", "mme", "pope"])[0] == pytest.approx(280 / 3)

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Method | Tokens | GQA | MME | POPE | MMVet | Avg | Avg w/o MMVet | Paper Avg |" in md
    assert "| VisionZip | 64 | 57.0 (95.0%) | 1620.0 (90.0%) | 76.0 (95.0%) | 33.0 (110.0%) | 97.5% | 93.3% | 94.0% |" in md
    assert "| VisionZip | 192 | 60.0 (100.0%) | – | – | – | 100.0% (1/4) | 100.0% (1/3) | 98.5% |" in md
    assert "| Vanilla | 576 | 60.0 | 1800.0 | 80.0 | 30.0 | 100.0% | 100.0% | 100.0% |" in md

    with open(tmp_path / "out" / "report.csv") as f:
        table = list(csv.DictReader(f))
    row64 = next(r for r in table if r["budget"] == "64")
    assert float(row64["pope_rel"]) == pytest.approx(95.0)
    assert float(row64["avg_rel"]) == pytest.approx(97.5)
    assert float(row64["avg_rel_stable"]) == pytest.approx(280 / 3, abs=1e-3)
    assert float(row64["paper_avg_rel"]) == 94.0
    png = out["plots"][0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # another metric than the headline, and a chosen set of unstable benchmarks
    out = report.build_report(root, tmp_path / "out2", benchmarks=["gqa", "pope"], unstable=["pope"],
                              metric_overrides={"gqa": "alt"}, make_plot=False)
    assert out["rows"]["llava-v1.5-7b"][2].scores["gqa"] == pytest.approx(28.5)
    assert "| Method | Tokens | GQA | POPE | Avg | Avg w/o POPE | Paper Avg |" in out["markdown"]


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.build_report(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no results found"):
        report.build_report(tmp_path / "empty", tmp_path / "out")
    _result(tmp_path / "r", "m", "visionzip", "64", "pope", 80.0, 64)
    out = report.build_report(tmp_path / "r", tmp_path / "out", make_plot=False)
    assert "No vanilla" in out["markdown"]
    with pytest.raises(ValueError, match="no metric 'nope'"):
        report.build_report(tmp_path / "r", tmp_path / "out", metric_overrides={"pope": "nope"})
    with pytest.raises(ValueError, match="unknown benchmark 'vqa3'"):
        report.build_report(tmp_path / "r", tmp_path / "out", benchmarks=["vqa3"])
    assert json.loads((tmp_path / "r" / "m" / "visionzip" / "64" / "pope.json").read_text())["score"] == 80.0


def test_report_relative_to_another_models_vanilla(tmp_path):
    root = tmp_path / "results"
    _result(root, "llava-v1.5-7b", "none", "full", "pope", 80.0, 576)
    _result(root, "llava-v1.5-7b-vz-tuned", "visionzip", "64", "pope", 78.0, 64)  # VisionZip‡
    out = report.main(["--results-dir", str(root), "--out-dir", str(tmp_path / "out"), "--no-plot",
                       "--vanilla-of", "llava-v1.5-7b-vz-tuned=llava-v1.5-7b"])
    (tuned,) = out["rows"]["llava-v1.5-7b-vz-tuned"]
    assert tuned.relative["pope"] == pytest.approx(97.5)
    assert "### llava-v1.5-7b-vz-tuned (percentages of llava-v1.5-7b's vanilla scores)" in out["markdown"]
    with pytest.raises(SystemExit):
        report.main(["--results-dir", str(root), "--vanilla-of", "llava-v1.5-7b-vz-tuned=llava-v9"])
