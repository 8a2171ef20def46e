"""Issue 22, item 6: an answers file whose ``<answers>.settings.json`` was deleted is never resumed (what
made its answers is unknown), and so never marked complete with answers of other settings mixed in."""
from __future__ import annotations

import pytest

from llava.eval import formats, generate
from llava.eval.data_io import read_jsonl, settings_path_for, write_jsonl

SETTINGS = {"model_path": "m", "compression": {"method": "none"}, "format": "vqa", "temperature": 0.0,
            "num_chunks": 1, "chunk_idx": 0}


def items(tmp_path):
    file = tmp_path / "q.jsonl"
    write_jsonl(file, [{"question_id": i, "text": f"question {i}"} for i in range(3)])
    return formats.read_items(formats.get_format("vqa"), file, formats.ReaderOptions())


def echo(batch):
    return [(item.question, 1) for item in batch]


def test_answers_without_their_settings_record_are_not_resumed(tmp_path):
    fmt, questions = formats.get_format("vqa"), items(tmp_path)
    answers = tmp_path / "a.jsonl"
    generate.run_generation(questions[:2], fmt, answers, echo, SETTINGS, progress=False)
    settings_path_for(answers).unlink()  # deleted by hand: the answers' settings are now unknown
    other = {**SETTINGS, "compression": {"method": "visionzip"}}
    for shard in (questions, questions[:2]):  # something left to answer, or nothing (marked complete before)
        with pytest.raises(ValueError, match=r"a.jsonl holds answers but its settings record .*a.settings.json is missing"):
            generate.run_generation(shard, fmt, answers, echo, other, progress=False)
    assert not settings_path_for(answers).exists() and len(read_jsonl(answers)) == 2  # nothing written
    record = generate.run_generation(questions, fmt, answers, echo, other, overwrite=True, progress=False)
    assert record["status"] == "complete" and len(read_jsonl(answers)) == 3


def test_the_cli_refuses_before_loading_a_model(tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    write_jsonl(answers, [{"question_id": 0, "prompt": "q", "text": "a"}])
    file = tmp_path / "q.jsonl"
    write_jsonl(file, [{"question_id": 0, "text": "q"}])
    with pytest.raises(SystemExit) as exit_info:  # the model path does not exist: refused before loading
        generate.main(["--format", "vqa", "--model-path", str(tmp_path / "no-model"), "--question-file", str(file),
                       "--answers-file", str(answers), "--device", "cpu"])
    assert exit_info.value.code == 2 and "settings record" in capsys.readouterr().err
