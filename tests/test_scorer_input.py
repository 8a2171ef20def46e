"""The scorers on bad input: null answers, answers as one JSON array, empty or repeated questions, a
question file given as answers, NaN external scores: each a named error, never a score.

Defects found by hostile-input testing (issue 13), each reproduced as a test that failed before its fix.
"""
from __future__ import annotations

import json

import pytest

# --------------------------------------------------------------------------------------- scorers


@pytest.fixture
def gqa_files(tmp_path):
    from llava.eval.data_io import write_json, write_jsonl

    annotations = tmp_path / "testdev.json"
    write_json(annotations, {"q1": {"answer": "yes"}, "q2": {"answer": "no"}})
    questions = tmp_path / "gqa_questions.jsonl"
    write_jsonl(questions, [{"question_id": q, "image": "x.jpg", "text": "?"} for q in ("q1", "q2")])
    answers = tmp_path / "answers.jsonl"
    write_jsonl(answers, [{"question_id": q, "prompt": "?", "text": t, "answer_id": q} for q, t in (("q1", "yes"), ("q2", "no"))])
    return annotations, questions, answers


def test_gqa_scores_good_input(gqa_files):
    from llava.eval.scoring import score_gqa

    annotations, questions, answers = gqa_files
    assert score_gqa(annotations, answers, questions)["score"] == 100.0


def test_a_null_answer_text_is_a_named_error(gqa_files):
    from llava.eval.data_io import write_jsonl
    from llava.eval.normalize import normalize_vqa_answer, parse_yes_no
    from llava.eval.scoring import score_gqa

    annotations, questions, answers = gqa_files
    write_jsonl(answers, [{"question_id": "q1", "prompt": "?", "text": None}, {"question_id": "q2", "prompt": "?", "text": "no"}])
    with pytest.raises(ValueError, match=r"answer #1: 'text' must be the answer string, got None"):
        score_gqa(annotations, answers, questions)
    for normalize in (normalize_vqa_answer, parse_yes_no):
        with pytest.raises(ValueError, match="must be a string, got NoneType"):
            normalize(None)


def test_answers_written_as_one_json_array_are_a_named_error(gqa_files):
    from llava.eval.scoring import score_gqa

    annotations, questions, answers = gqa_files
    answers.write_text(json.dumps([{"question_id": "q1", "text": "yes"}, {"question_id": "q2", "text": "no"}]))
    with pytest.raises(ValueError, match=r"answers.jsonl:1 holds a JSON list, expected one JSON object per line"):
        score_gqa(annotations, answers, questions)


def test_no_score_over_zero_or_repeated_questions(gqa_files, tmp_path):
    from llava.eval.data_io import write_json, write_jsonl
    from llava.eval.scoring import score_gqa

    annotations, questions, answers = gqa_files
    questions.write_text("")
    with pytest.raises(ValueError, match="has no GQA questions"):
        score_gqa(annotations, answers, questions)
    write_jsonl(questions, [{"question_id": q, "image": "x.jpg", "text": "?"} for q in ("q1", "q2", "q1")])
    with pytest.raises(ValueError, match=r"repeats 1 GQA question id\(s\), e.g. 'q1'"):
        score_gqa(annotations, answers, questions)
    write_json(annotations, {})
    with pytest.raises(ValueError, match="holds no GQA questions"):
        score_gqa(annotations, answers)


def test_pope_question_file_as_answers_and_empty_question_file(tmp_path):
    from llava.eval.data_io import write_jsonl
    from llava.eval.scoring import score_pope

    questions = tmp_path / "pope.jsonl"
    write_jsonl(questions, [{"question_id": i, "image": f"{i}.jpg", "text": f"Is there a cat {i}?", "category": "random"}
                            for i in range(4)])
    write_jsonl(tmp_path / "coco_pope_random.json",
                [{"image": f"{i}.jpg", "text": f"Is there a cat {i}?", "label": "yes" if i % 2 else "no"} for i in range(4)])
    with pytest.raises(ValueError, match="looks like a question file, not answers"):
        score_pope(tmp_path, questions, questions)  # scored 50.0 before
    answers = tmp_path / "answers.jsonl"
    write_jsonl(answers, [{"question_id": i, "prompt": "?", "text": "Yes" if i % 2 else "No"} for i in range(4)])
    assert score_pope(tmp_path, questions, answers)["metrics"]["accuracy"] == 100.0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="has no POPE questions"):  # ZeroDivisionError before
        score_pope(tmp_path, empty, answers)


def test_external_score_nan_is_refused(tmp_path, capsys):
    from llava.eval.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["external", "--name", "vqav2", "--score", "nan", "--output", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert "--score must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
