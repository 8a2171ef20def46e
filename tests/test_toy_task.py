"""The toy task and toy LLaVA (llava.toy) and the toy study's accuracy table (llava.toy.study).

A smaller toy model (fewer scenes and steps, the same 24-layer ViT-L/14-336 token geometry) is trained
through llava.train.train once per module, and the accuracy table must have a row for every registered
method."""
from __future__ import annotations

import hashlib
import json
import random

import pytest

from llava.toy import QUESTION_TYPES, ToySettings, make_scene, prepare_toy
from llava.toy.evaluate import ToyEvaluator
from llava.toy.model import tune_projector
from llava.toy.study import accuracy_rows, markdown_table
from llava.toy.task import COLOURS, scene_questions, write_eval_set, write_train_set
from visionzip import registered_methods

SMALL = ToySettings(train_images=160, eval_images=36, epochs=1, batch_size=4, learning_rate=3e-3)


def file_digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_task_is_deterministic_and_in_llava_formats(tmp_path):
    first = write_train_set(str(tmp_path / "a"), 6, seed=3)
    second = write_train_set(str(tmp_path / "b"), 6, seed=3)
    other = write_train_set(str(tmp_path / "c"), 6, seed=4)
    assert open(first).read() == open(second).read()
    assert open(first).read() != open(other).read()
    records = json.load(open(first))
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        assert file_digest(tmp_path / "a" / "images" / record["image"]) == \
            file_digest(tmp_path / "b" / "images" / record["image"])

    question_file, annotation_file = write_eval_set(str(tmp_path / "eval"), 9, seed=3)
    questions = [json.loads(line) for line in open(question_file)]
    annotations = json.load(open(annotation_file))
    assert [q["question_id"] for q in questions] == list(annotations)
    assert [q["category"] for q in questions] == list(QUESTION_TYPES) * 3
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category"}
        assert annotations[q["question_id"]]["types"]["structural"] == q["category"]


def test_answers_match_the_drawn_scene():
    for seed in range(20):
        scene = make_scene(seed)
        image = scene.image()
        assert image.size == (336, 336)
        for kind, question, answer in scene_questions(scene, random.Random(seed)):
            if kind == "count":
                assert answer == str(len(scene.objects))
            elif kind == "exist":
                colour = question.split()[3]
                assert answer == ("yes" if colour in [o.colour for o in scene.objects] else "no")
            else:
                (only,) = scene.objects
                assert answer == only.colour
                x0, y0, x1, y1 = only.box  # the shape's centre pixel has its colour
                assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 4)) == COLOURS[only.colour]


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="train_images must be a positive integer, got 0"):
        ToySettings(train_images=0)
    with pytest.raises(ValueError, match="learning_rate"):
        ToySettings(learning_rate=2.0)
    with pytest.raises(ValueError, match="num_images must be a positive integer"):
        write_eval_set(str(tmp_path), 0, seed=0)
    assert ToySettings().key() == ToySettings().key() != SMALL.key()


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory):
    return prepare_toy(SMALL, tmp_path_factory.mktemp("toy"), printer=lambda *a, **k: None)


@pytest.fixture(scope="module")
def evaluator(small_toy, tmp_path_factory):
    return ToyEvaluator(small_toy, tmp_path_factory.mktemp("answers"), batch_size=12)


def test_small_toy_model_trains_through_the_entry_point_and_is_cached(small_toy):
    """Training runs through llava.train.train and the loss falls; a second call reuses the run. (Learning
    the task, i.e. beating the majority answer on held-out questions, is not reached yet: docs/toy_task.md.)"""
    assert not small_toy.cached
    assert small_toy.train_losses[-1] < small_toy.train_losses[0]
    again = prepare_toy(SMALL, small_toy.folder.parent, printer=lambda *a, **k: None)
    assert again.cached and again.model_path == small_toy.model_path and again.train_losses == small_toy.train_losses


def test_accuracy_table_has_a_row_for_every_registered_method(evaluator):
    methods = registered_methods()
    assert {"visionzip", "vispruner"} <= set(methods)
    vanilla, table, reasons = accuracy_rows(evaluator, methods, budgets=(64, 1000), printer=lambda *a: None)
    assert list(table) == methods
    for method in methods:
        assert table[method][1000] is None  # more tokens than the 576 patches: refused, named
        # the first refused budget's reason (SparseVLM's paper layers do not fit this 4-layer LLM at 64 either)
        assert reasons[method].startswith(f"{method}:1000: " if table[method][64] is not None else f"{method}:64: ")
    for method in ("visionzip", "vispruner"):
        score = table[method][64]
        assert score.visual_tokens == 64 and 0 <= score.accuracy <= 100
        assert score.answers_file.is_file()
    markdown = markdown_table(vanilla, table, reasons, 50.0, len(evaluator.items), budgets=(64, 1000))
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["vanilla", *methods]
    assert all(f"n/a ({method}): {reasons[method]}" in markdown for method in methods)


def test_projector_tuning_refuses_no_compression(small_toy):
    with pytest.raises(ValueError, match="needs a compression spec"):
        tune_projector(small_toy, "none", steps=1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        tune_projector(small_toy, "visionzip:64", steps=0)
