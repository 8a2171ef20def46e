"""The generation engine without a model: readers, sharding, batching, resuming, settings, merging."""
from __future__ import annotations

import json

import pytest

from llava.eval import formats, generate
from llava.eval.data_io import read_json, read_jsonl, settings_path_for, write_json, write_jsonl
from llava.eval.merge_answers import merge_answers
from llava.eval.mini_benchmark import build_mini_benchmark


class EchoAnswerer:
    """Answers with the question's first line; remembers the batches it saw."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append([item.key for item in batch])
        return [(item.question.split("\n")[0].upper(), 3) for item in batch]


SETTINGS = {"model_path": "m", "compression": {"method": "none"}, "format": "vqa", "temperature": 0.0,
            "num_chunks": 1, "chunk_idx": 0}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return build_mini_benchmark(tmp_path_factory.mktemp("mini"))


def vqa_items(mini, **kw):
    options = formats.ReaderOptions(image_folder=str(mini / "pope" / "val2014"))
    return formats.read_items(formats.get_format("vqa"), mini / "pope" / "llava_pope_test.jsonl", options, **kw)


def test_chunks_are_balanced_and_cover_everything():
    bounds = [formats.chunk_bounds(10, 4, k) for k in range(4)]
    assert bounds == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [formats.chunk_bounds(3, 4, k) for k in range(4)] == [(0, 0), (0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match=r"--chunk-idx must be in \[0, 3\], got 4"):
        formats.chunk_bounds(10, 4, 4)


def test_readers(mini):
    items = vqa_items(mini)
    assert len(items) == 9 and items[0].has_image
    assert items[0].load_image().mode == "RGB"
    shard = vqa_items(mini, num_chunks=2, chunk_idx=1)
    assert [i.key for i in shard] == [i.key for i in items[4:]]

    science = formats.read_items(formats.get_format("science"), mini / "scienceqa" / "llava_test_CQM-A.json",
                                 formats.ReaderOptions(str(mini / "scienceqa" / "images" / "test"), True))
    assert [s.has_image for s in science] == [True, False, True]
    assert science[0].prompt.startswith("<image>\nContext:")  # LLaVA's cur_prompt
    assert science[1].question.endswith("Answer with the option's letter from the given choices directly.")
    assert "<image>" not in science[0].question

    mmb = formats.read_items(formats.get_format("mmbench"), mini / "mmbench" / "mmbench_dev_20230712.tsv",
                             formats.ReaderOptions(single_pred_prompt=True, all_rounds=True))
    # question 0 has 4 options -> 4 rounds; question 1 has 2 -> 2 rounds
    assert [(i.question_id, i.extra["round_id"]) for i in mmb] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert mmb[1].extra["options"] == ["blue", "green", "white", "red"]
    assert mmb[1].question.split("\n")[:3] == ["A hint.", "What color is it? (0)", "A. blue"]
    assert mmb[4].question.split("\n")[0] == "What color is it? (1)"  # "nan" hint left out
    decoded = mmb[0].load_image()  # base64 column -> RGB image
    assert decoded.mode == "RGB" and decoded.size in {(64, 48), (40, 72), (56, 56)}
    cn = formats.read_items(formats.get_format("mmbench"), mini / "mmbench" / "mmbench_dev_cn_20231003.tsv",
                            formats.ReaderOptions(single_pred_prompt=True, lang="cn"))
    assert cn[0].question.endswith("请直接回答选项字母。") and len(cn) == 2

    mmmu = formats.read_items(formats.get_format("mmmu"), mini / "MMMU" / "llava_mmmu_val.jsonl",
                              formats.ReaderOptions(str(mini / "MMMU" / "images")))
    assert mmmu[0].question.endswith("C. Pop art\nAnswer with the option's letter from the given choices directly.")
    assert mmmu[1].question.endswith("Answer the question using a single word or phrase.")

    # MME asks two questions with the same id: the key tells them apart
    mme = formats.read_items(formats.get_format("vqa"), mini / "MME" / "llava_mme.jsonl", formats.ReaderOptions())
    assert len({i.key for i in mme}) == len(mme) == 8
    assert len({i.question_id for i in mme}) == 4


def test_duplicate_questions_are_refused(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 1, "text": "a"}])
    with pytest.raises(ValueError, match="repeats question"):
        formats.read_items(formats.get_format("vqa"), tmp_path / "q.jsonl", formats.ReaderOptions())


def test_batches_never_mix_image_and_text_only():
    def item(key, image):
        return formats.EvalItem(key, key, "q", "q", (lambda: None) if image else None)

    items = [item("a", True), item("b", True), item("c", False), item("d", True), item("e", True), item("f", True)]
    assert [[i.key for i in b] for b in generate.batches(items, 2)] == [["a", "b"], ["c"], ["d", "e"], ["f"]]


def test_generation_writes_answers_and_settings(tmp_path, mini):
    items = vqa_items(mini)
    answerer = EchoAnswerer()
    fmt = formats.get_format("vqa")
    out = tmp_path / "answers" / "1_0.jsonl"
    record = generate.run_generation(items, fmt, out, answerer, SETTINGS, batch_size=4, progress=False,
                                     model_id="tiny")
    written = read_jsonl(out)
    assert [fmt.answer_key(a) for a in written] == [i.key for i in items]
    assert written[0]["text"] == "IS THERE A DOG IN THE IMAGE?" and written[0]["model_id"] == "tiny"
    assert set(written[0]) >= {"question_id", "prompt", "text", "answer_id", "metadata"}
    assert [len(b) for b in answerer.batches] == [4, 4, 1]
    settings = read_json(settings_path_for(out))
    assert settings["status"] == "complete" and settings["num_answered"] == 9 == settings["num_questions"]
    assert settings["generated_tokens"] == 27 and settings["model_path"] == "m"
    assert record["generation_seconds"] >= 0


def test_generation_resumes_after_a_crash(tmp_path, mini):
    items = vqa_items(mini)
    fmt = formats.get_format("vqa")
    out = tmp_path / "a.jsonl"
    generate.run_generation(items[:4], fmt, out, EchoAnswerer(), SETTINGS, progress=False)
    # a crash in the middle of the fifth write
    with out.open("a") as f:
        f.write(json.dumps({"question_id": items[4].question_id})[:12])
    answerer = EchoAnswerer()
    record = generate.run_generation(items, fmt, out, answerer, SETTINGS, batch_size=8, progress=False)
    assert answerer.batches == [[i.key for i in items[4:]]]  # only the unanswered ones
    assert [fmt.answer_key(a) for a in read_jsonl(out)] == [i.key for i in items]
    assert record["resumed_from"] == 4 and record["status"] == "complete"

    # a finished file: nothing is asked again
    again = EchoAnswerer()
    generate.run_generation(items, fmt, out, again, SETTINGS, progress=False)
    assert again.batches == []

    # other settings are refused rather than mixed in, --overwrite starts over
    with pytest.raises(ValueError, match=r"other settings \(compression: \{'method': 'none'\} -> "):
        generate.run_generation(items, fmt, out, EchoAnswerer(), {**SETTINGS, "compression": {"method": "visionzip"}},
                                progress=False)
    fresh = EchoAnswerer()
    generate.run_generation(items[:2], fmt, out, fresh, {**SETTINGS, "compression": {"method": "visionzip"}},
                            overwrite=True, progress=False)
    assert len(read_jsonl(out)) == 2 and len(fresh.batches) == 2  # batch size 1

    # answers of another shard in this file: refused
    with pytest.raises(ValueError, match="not in this shard"):
        generate.run_generation(items[4:], fmt, out, EchoAnswerer(), {**SETTINGS, "compression": {"method": "visionzip"}},
                                progress=False)


def test_merge_checks_completeness_and_duplicates(tmp_path, mini):
    fmt = formats.get_format("vqa")
    shards = []
    for k in range(2):
        items = vqa_items(mini, num_chunks=2, chunk_idx=k)
        path = tmp_path / f"2_{k}.jsonl"
        generate.run_generation(items, fmt, path, EchoAnswerer(), {**SETTINGS, "num_chunks": 2, "chunk_idx": k},
                                progress=False)
        shards.append(path)
    summary = merge_answers(shards, tmp_path / "merge.jsonl")
    assert summary["num_answered"] == 9 and len(summary["shards"]) == 2
    assert [fmt.answer_key(a) for a in read_jsonl(tmp_path / "merge.jsonl")] == [i.key for i in vqa_items(mini)]
    assert read_json(tmp_path / "merge.settings.json")["generated_tokens"] == 27

    settings = read_json(settings_path_for(shards[1]))
    write_json(settings_path_for(shards[1]), {**settings, "status": "running"})
    with pytest.raises(ValueError, match=r"2_1.jsonl is incomplete"):
        merge_answers(shards, tmp_path / "merge.jsonl")
    write_json(settings_path_for(shards[1]), {**settings, "model_path": "other"})
    with pytest.raises(ValueError, match=r"other settings than .*\['model_path'\]"):
        merge_answers(shards, tmp_path / "merge.jsonl")
    write_json(settings_path_for(shards[1]), settings)
    with pytest.raises(ValueError, match="answered in both"):
        merge_answers([shards[0], shards[0]], tmp_path / "merge.jsonl")


class RefusingAnswerer(EchoAnswerer):
    """Refuses the first question it sees (as the prompt-length policy ``refuse`` does)."""

    def __call__(self, batch):
        answers = super().__call__(batch)
        if len(self.batches) == 1:
            answers[0] = ("", 0, {"refused": "prompt of 3000 positions > 2048"})
        return answers


def test_merge_sums_the_refused_questions_of_its_shards(tmp_path, mini):
    fmt = formats.get_format("vqa")
    shards = []
    for k, answerer in enumerate((RefusingAnswerer(), EchoAnswerer())):
        items = vqa_items(mini, num_chunks=2, chunk_idx=k)
        path = tmp_path / f"2_{k}.jsonl"
        generate.run_generation(items, fmt, path, answerer, {**SETTINGS, "num_chunks": 2, "chunk_idx": k},
                                progress=False)
        shards.append(path)
    assert read_json(settings_path_for(shards[0]))["num_refused"] == 1
    summary = merge_answers(shards, tmp_path / "merge.jsonl")
    assert summary["num_answered"] == 9 and summary["num_refused"] == 1 and len(summary["refused"]) == 1
    assert "num_truncated" not in summary
    assert summary["shards"][0]["num_refused"] == 1 and "num_refused" not in summary["shards"][1]


def test_prepare_mmmu_rows_to_question_file(tmp_path):
    from PIL import Image

    from llava.eval.prepare_mmmu import mmmu_questions

    rows = [
        {"id": "validation_Art_Theory_3", "question": "<image 1> Who painted it?", "options": "['Monet', 'Manet']",
         "answer": "A", "question_type": "multiple-choice", "image_1": Image.new("RGB", (8, 6), (255, 0, 0)),
         "image_2": Image.new("L", (4, 4))},
        {"id": "validation_Math_9", "question": "What is x?", "options": "[]", "answer": "4",
         "question_type": "open", "image_1": None},
    ]
    records = mmmu_questions(rows, tmp_path / "images")
    assert records[0]["image"] == ["validation_Art_Theory_3_1.png", "validation_Art_Theory_3_2.png"]
    assert records[0]["options"] == ["Monet", "Manet"] and records[0]["subject"] == "Art_Theory"
    assert records[1]["image"] == [] and records[1]["subject"] == "Math"
    write_jsonl(tmp_path / "q.jsonl", records)
    items = formats.read_items(formats.get_format("mmmu"), tmp_path / "q.jsonl",
                               formats.ReaderOptions(str(tmp_path / "images")))
    assert items[0].load_image().getpixel((0, 0)) == (255, 0, 0)  # the first image
    assert items[0].question == ("<image 1> Who painted it?\nA. Monet\nB. Manet\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert not items[1].has_image
    with pytest.raises(ValueError, match="options of MMMU question validation_X_1 is not a list"):
        mmmu_questions([{"id": "validation_X_1", "question": "?", "options": "Monet", "answer": "A"}], tmp_path)


def test_merging_and_scoring_start_without_the_model_stack():
    # every eval script runs merge_answers and evaluate once per setting (tests/test_methods_e2e.py: once per
    # registered method): importing torch and transformers there cost ~5 s of CPU each time for nothing
    import subprocess
    import sys

    code = ("import sys, llava.eval.merge_answers, llava.eval.evaluate; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
