"""The eval engine's records: answer shards merge only when complete and unique, and a run records the
budget that ran (LLaVA-NeXT budgets counted over the checkpoint's views).

Defects found by hostile-input testing (issue 13), each reproduced as a test that failed before its fix.
"""
from __future__ import annotations

import json

import pytest

from llava.model.tiny import build_tiny_llava

# ------------------------------------------------------------------------ merging answer shards


def write_vqa_questions(folder, count=6):
    from llava.eval.data_io import write_jsonl

    path = folder / "questions.jsonl"
    write_jsonl(path, [{"question_id": i, "image": f"{i}.png", "text": f"question {i}?"} for i in range(count)])
    return path


def generate_shard(questions, folder, num_chunks, chunk_idx):
    from llava.eval import formats, generate

    fmt = formats.get_format("vqa")
    items = formats.read_items(fmt, questions, formats.ReaderOptions(image_folder=str(folder)), num_chunks, chunk_idx)
    path = folder / f"{num_chunks}_{chunk_idx}.jsonl"
    settings = {"model_path": "m", "compression": {"method": "none"}, "format": "vqa", "temperature": 0.0,
                "num_chunks": num_chunks, "chunk_idx": chunk_idx}
    generate.run_generation(items, fmt, path, lambda batch: [("yes", 1) for _ in batch], settings, progress=False)
    return path


def test_merge_refuses_a_missing_shard_and_an_output_that_is_a_shard(tmp_path):
    from llava.eval.merge_answers import merge_answers

    questions = write_vqa_questions(tmp_path)
    shard0 = generate_shard(questions, tmp_path, 2, 0)
    with pytest.raises(ValueError, match=r"--num-chunks 2, but chunk\(s\) \[1\] are missing"):
        merge_answers([shard0], tmp_path / "merge.jsonl")  # wrote "status: complete" over 3 of 6 before
    assert not (tmp_path / "merge.jsonl").exists()
    shard1 = generate_shard(questions, tmp_path, 2, 1)
    before = shard0.read_bytes()
    with pytest.raises(ValueError, match="is one of the shards"):
        merge_answers([shard0, shard1], shard0)
    assert shard0.read_bytes() == before
    summary = merge_answers([shard0, shard1], tmp_path / "merge.jsonl")
    assert summary["num_answered"] == summary["num_questions"] == 6


def test_a_shard_launched_twice_at_once_is_refused(tmp_path):
    from llava.eval.data_io import answers_lock, read_jsonl
    from llava.eval.merge_answers import merge_answers

    questions = write_vqa_questions(tmp_path)
    answers = tmp_path / "1_0.jsonl"
    with answers_lock(answers):  # the first launch, still running
        with pytest.raises(FileExistsError, match="is in use by another process"):
            generate_shard(questions, tmp_path, 1, 0)
        assert not answers.exists()
    generate_shard(questions, tmp_path, 1, 0)
    assert len(read_jsonl(answers)) == 6
    # answers appended to a finished shard by a second writer: the counts disagree and merging stops
    with answers.open("a") as handle:
        handle.write(json.dumps({"question_id": 99, "prompt": "x", "text": "yes"}) + "\n")
    with pytest.raises(ValueError, match="holds 7 answers but its settings count 6"):
        merge_answers([answers], tmp_path / "merge.jsonl")


# ----------------------------------------------------------- NeXT runs recorded under the wrong budget


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny16") / "tiny16"), version="v1.6")


class FakeAnswerer:
    """Stands for LlavaAnswerer (no model): remembers the compression it was given."""

    def __init__(self, model_path, model_base, conv_mode, compression, *args, **kwargs):
        from types import SimpleNamespace

        FakeAnswerer.compression = compression
        self.model = SimpleNamespace(config=SimpleNamespace(image_aspect_ratio="anyres"))
        self.model_name = "fake"

    def __call__(self, batch):
        return [("yes", 1) for _ in batch]


def test_next_budgets_come_from_the_checkpoint_and_record_what_ran(tiny16, tmp_path, monkeypatch, capsys):
    from llava.eval import generate
    from llava.eval.data_io import read_json, settings_path_for

    monkeypatch.setattr(generate, "LlavaAnswerer", FakeAnswerer)
    questions = write_vqa_questions(tmp_path, count=2)
    common = ["--format", "vqa", "--model-path", tiny16, "--question-file", str(questions),
              "--image-folder", str(tmp_path), "--device", "cpu", "--no-progress"]
    # 64 is no LLaVA-NeXT budget (5 views): refused, where it ran 54 + 10 per view and recorded 64
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*common, "--answers-file", str(tmp_path / "a.jsonl"), "--method", "visionzip", "--budget", "64"])
    assert exit_info.value.code == 2 and "must divide by 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main([*common, "--answers-file", str(tmp_path / "a.jsonl"), "--method", "visionzip",
                       "--budget", "160", "--budget-family", "v1.5"])
    assert "contradicts the checkpoint" in capsys.readouterr().err
    # the paper's NeXT budget: 160 over the 5 views = 27 + 5 per view, recorded as such
    answers = tmp_path / "b.jsonl"
    generate.main([*common, "--answers-file", str(answers), "--method", "visionzip", "--budget", "160"])
    settings = read_json(settings_path_for(answers))
    assert (FakeAnswerer.compression.settings.dominant, FakeAnswerer.compression.settings.contextual) == (27, 5)
    assert settings["budget_family"] == "v1.6" and settings["image_aspect_ratio"] == "anyres"
    assert settings["visual_tokens_per_view"] == 32 and settings["views_per_image_max"] == 5
    assert settings["visual_tokens"] == settings["max_visual_tokens_per_image"] == 160
    # an explicit per-view spec is recorded with the tokens it can reach per image
    answers = tmp_path / "c.jsonl"
    generate.main([*common, "--answers-file", str(answers), "--compression", "visionzip:54,10"])
    settings = read_json(settings_path_for(answers))
    assert settings["visual_tokens_per_view"] == 64 and settings["max_visual_tokens_per_image"] == 320
