"""Issue 13: each defect found by hostile-input testing, reproduced as a test that failed before its fix.

Data files and images are made here; models are the tiny builds of ``llava.model.tiny``. Training runs
are 1-2 steps on 2 samples.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from llava.model import LlavaLlamaForCausalLM
from llava.model.tiny import build_tiny_llava
from llava.train.checkpointing import FINISHED_MARKER, RUN_RECORD
from llava.train.synthetic import write_synthetic_dataset
from llava.train.train import parse_arguments, train

# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny") / "tiny15"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(str(folder), num_image=2, num_text=0, multi_turn=False)
    return folder


def train_args(model, data, output, *extra, steps=2, tokens=64):
    return [
        "--model_name_or_path", str(model),
        "--data_path", str(data / "data.json"),
        "--image_folder", str(data / "images"),
        "--compression", "visionzip", "--visual_tokens", str(tokens),
        "--image_aspect_ratio", "pad",
        "--tune_mm_mlp_adapter", "True",
        "--output_dir", str(output),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--lr_scheduler_type", "constant",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu", "True",
        "--disable_tqdm", "True",
        *extra,
    ]


def run_training(*args, callbacks=None, **kwargs):
    return train(*parse_arguments(train_args(*args, **kwargs)), callbacks=callbacks)


class Killed(Exception):
    """Stands for kill -9: the run stops at once, nothing after the current step is written."""


class KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed at step {state.global_step}")


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if anything loads a model: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(LlavaLlamaForCausalLM, "from_pretrained", refuse)


# ------------------------------------------------------------- 1. output = input deletes the input model


def test_1_output_dir_equal_to_the_model_is_refused_and_nothing_deleted(tiny, data_dir, tmp_path, no_model_loading):
    inplace = tmp_path / "inplace"
    shutil.copytree(tiny, inplace)
    before = sorted(os.listdir(inplace))
    with pytest.raises(ValueError, match="is the folder of --model_name_or_path"):
        run_training(inplace, data_dir, inplace, "--overwrite_output_dir", "True")
    assert sorted(os.listdir(inplace)) == before
    assert os.path.getsize(inplace / "model.safetensors") > 0


def test_1_weights_this_code_did_not_write_are_never_deleted(tiny, data_dir, tmp_path, no_model_loading):
    other = tmp_path / "original-llava-output"
    other.mkdir()
    (other / "mm_projector.bin").write_bytes(b"weights of another tool")
    with pytest.raises(FileExistsError, match="not written by a run of this code"):
        run_training(tiny, data_dir, other, "--overwrite_output_dir", "True")
    assert (other / "mm_projector.bin").read_bytes() == b"weights of another tool"


# ------------------------------------------------------------------- 2. run identity on checkpoints


def test_2_an_overwritten_run_never_resumes_from_the_old_runs_checkpoints(tiny, data_dir, tmp_path):
    out = tmp_path / "run"
    first = run_training(tiny, data_dir, out, "--save_strategy", "steps", "--save_steps", "1", steps=1)
    assert first.global_step == 1 and (out / "checkpoint-1").is_dir()
    old_identity = json.loads((out / "checkpoint-1" / RUN_RECORD).read_text())
    # a new run over it, killed at its step 1 before its first checkpoint
    with pytest.raises(Killed):
        run_training(tiny, data_dir, out, "--overwrite_output_dir", "True", "--save_strategy", "steps",
                     "--save_steps", "1", callbacks=[KillAtStep(1)], steps=1)
    assert not (out / FINISHED_MARKER).exists()
    assert json.loads((out / RUN_RECORD).read_text())["run_id"] != old_identity["run_id"]
    # started again: it must not pick up the old run's checkpoint-1 (and report a finished run at once)
    again = run_training(tiny, data_dir, out, "--save_strategy", "no", steps=1)
    assert again.start.resume_from is None
    assert str(out / "checkpoint-1") in again.start.ignored_checkpoints
    assert len(again.losses) == 1  # its step trained


def test_2_resuming_with_other_settings_is_refused_before_loading(tiny, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run64"
    with pytest.raises(Killed):
        run_training(tiny, data_dir, out, "--save_strategy", "steps", "--save_steps", "1", callbacks=[KillAtStep(2)])
    assert (out / "checkpoint-1" / RUN_RECORD).is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(LlavaLlamaForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ValueError, match=r"compression.visual_tokens: 64 -> 128"):
        run_training(tiny, data_dir, out, "--save_strategy", "steps", "--save_steps", "1", tokens=128)


def test_2_explicit_resume_from_a_checkpoint_without_identity_is_refused(tiny, data_dir, tmp_path, no_model_loading):
    foreign = tmp_path / "downloaded" / "checkpoint-5"
    foreign.mkdir(parents=True)
    (foreign / "trainer_state.json").write_text("{}")
    (foreign / "optimizer.pt").write_bytes(b"untrusted pickle")
    with pytest.raises(ValueError, match="weights_only=False"):
        run_training(tiny, data_dir, tmp_path / "out", "--resume_from_checkpoint", str(foreign))


# ---------------------------------------------------------------------------- 3. saves are not atomic


def test_3_a_failed_final_save_leaves_no_half_file_and_the_run_can_be_run_again(tiny, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "full-disk"
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        with pytest.raises(OSError, match="mm_projector.bin failed .*nothing was written"):
            run_training(tiny, data_dir, out, steps=1)
    assert torch.save is real_save
    assert not (out / "mm_projector.bin").exists() and not (out / FINISHED_MARKER).exists()
    assert not [name for name in os.listdir(out) if name.endswith(".partial")]
    rerun = run_training(tiny, data_dir, out, steps=1)  # not refused as "a finished run"
    assert rerun.global_step == 1 and (out / FINISHED_MARKER).is_file()
    assert set(torch.load(out / "mm_projector.bin", weights_only=True)) == {
        f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
    }


def test_3_an_unwritable_output_dir_is_found_before_loading(tiny, data_dir, tmp_path, no_model_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="not writable"):
        run_training(tiny, data_dir, blocker / "out")


def test_3_an_output_dir_without_room_is_found_before_loading(tiny, data_dir, tmp_path, monkeypatch, no_model_loading):
    import llava.preflight as preflight

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(OSError, match="MiB free, less than"):
        run_training(tiny, data_dir, tmp_path / "out")


# ------------------------------------------------------------- 4. one bad image kills a run mid-epoch


def bomb_dataset(tiny, folder, monkeypatch, **kwargs):
    """A two-sample dataset whose second image is over PIL's (lowered) decompression-bomb limit."""
    from transformers import CLIPImageProcessorPil

    from llava.model.tiny import TOWER_DIR
    from llava.model.tokenizer import load_tokenizer
    from llava.processor import LlavaProcessor
    from llava.train.dataset import LazySupervisedDataset

    write_synthetic_dataset(str(folder), num_image=2, num_text=0, multi_turn=False, image_size=(64, 48))
    records = json.loads((folder / "data.json").read_text())
    Image.new("RGB", (200, 200), (10, 20, 30)).save(folder / "images" / records[1]["image"].split("/")[-1])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 200 x 200 > 2 x 5000: a "bomb"; 64 x 48 is not
    processor = LlavaProcessor.for_training(
        load_tokenizer(tiny), CLIPImageProcessorPil.from_pretrained(os.path.join(tiny, TOWER_DIR)), "v1",
        image_aspect_ratio="pad",
    )
    return LazySupervisedDataset(
        str(folder / "data.json"), processor, image_folder=str(folder / "images"), model_max_length=512,
        visual_tokens_per_image=64, **kwargs,
    )


def test_4_a_decompression_bomb_is_skipped_and_counted(tiny, tmp_path, monkeypatch):
    dataset = bomb_dataset(tiny, tmp_path, monkeypatch, check_image_decode="no", bad_sample_policy="skip")
    example = dataset[1]  # raised DecompressionBombError before
    assert len(example["skipped_samples"]) == 1 and "sample 1" in example["skipped_samples"][0]
    assert "decompression bomb" in example["skipped_samples"][0].lower()


def test_4_a_decompression_bomb_stops_the_run_naming_the_sample(tiny, tmp_path, monkeypatch):
    from llava.train.preprocess import UnlearnableSample

    dataset = bomb_dataset(tiny, tmp_path, monkeypatch, check_image_decode="no", bad_sample_policy="error")
    with pytest.raises(UnlearnableSample, match="sample 1 .*cannot read image"):
        dataset[1]


def test_4_preflight_decodes_the_images_of_a_small_dataset(tiny, tmp_path, monkeypatch):
    from llava.train.dataset import DataFileError, check_data_file

    bomb_dataset(tiny, tmp_path, monkeypatch, check_image_decode="no")
    with pytest.raises(DataFileError, match="1 images that do not decode.*\n  sample 1"):
        check_data_file(str(tmp_path / "data.json"), image_folder=str(tmp_path / "images"))  # "auto": decodes
    assert len(check_data_file(str(tmp_path / "data.json"), image_folder=str(tmp_path / "images"),
                               check_image_decode="no")) == 2


# ------------------------------------------------------------------ 5. 16-bit and other unusual images


def test_5_sixteen_bit_greyscale_keeps_its_brightness(tmp_path):
    from llava.mm_utils import load_image, process_images, to_rgb

    values = np.full((20, 30), 30000, dtype=np.uint16)  # 46 % grey in 16 bits
    values[:, :10] = 65535
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(str(path)))
    assert rgb.shape == (20, 30, 3)
    assert rgb[0, 20].tolist() == [117, 117, 117]  # round(30000 * 255 / 65535); convert("RGB") gave 255
    assert rgb[0, 0].tolist() == [255, 255, 255]
    # the processor path (an I;16 image handed to process_images) converts the same way
    direct = np.asarray(to_rgb(Image.open(path)))
    assert np.array_equal(direct, rgb)

    class Processor:
        image_mean = (0.5, 0.5, 0.5)

        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.tensor(np.stack([np.asarray(i) for i in images]))}

    pixels = process_images([Image.open(path)], Processor(), type("Cfg", (), {"image_aspect_ratio": "square"})())
    assert int(pixels[0, 0, 20, 0]) == 117


def test_5_float_images_are_refused_with_the_mode_named(tmp_path):
    from llava.mm_utils import ImageLoadError, load_image

    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(ImageLoadError, match="mode 'F'"):
        load_image(str(path))


# ------------------------------------------------------------------------------------ 11. fail-late


def test_11_training_reads_the_data_file_before_loading_the_model(tiny, tmp_path, no_model_loading):
    from llava.train.dataset import DataFileError

    bad = tmp_path / "data"
    (bad / "images").mkdir(parents=True)
    (bad / "data.json").write_text('[{"id": 1, "image": "missing.png", "conversations": [')
    with pytest.raises(DataFileError, match="corrupt JSON"):
        run_training(tiny, bad, tmp_path / "out")
    (bad / "data.json").write_text(json.dumps([{"id": 1, "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}]))
    with pytest.raises(DataFileError, match="image file not found"):
        run_training(tiny, bad, tmp_path / "out")


# ------------------------------------------------------------------------ 6. merging answer shards


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


def test_6_merge_refuses_a_missing_shard_and_an_output_that_is_a_shard(tmp_path):
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


def test_6_a_shard_launched_twice_at_once_is_refused(tmp_path):
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


# --------------------------------------------------------------------------------------- 8. scorers


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


def test_8_gqa_scores_good_input(gqa_files):
    from llava.eval.scoring import score_gqa

    annotations, questions, answers = gqa_files
    assert score_gqa(annotations, answers, questions)["score"] == 100.0


def test_8_a_null_answer_text_is_a_named_error(gqa_files):
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


def test_8_answers_written_as_one_json_array_are_a_named_error(gqa_files):
    from llava.eval.scoring import score_gqa

    annotations, questions, answers = gqa_files
    answers.write_text(json.dumps([{"question_id": "q1", "text": "yes"}, {"question_id": "q2", "text": "no"}]))
    with pytest.raises(ValueError, match=r"answers.jsonl:1 holds a JSON list, expected one JSON object per line"):
        score_gqa(annotations, answers, questions)


def test_8_no_score_over_zero_or_repeated_questions(gqa_files, tmp_path):
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


def test_8_pope_question_file_as_answers_and_empty_question_file(tmp_path):
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


def test_8_external_score_nan_is_refused(tmp_path, capsys):
    from llava.eval.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["external", "--name", "vqav2", "--score", "nan", "--output", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert "--score must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------- 9. edge budgets (dominant = 1 drops CLS)


@pytest.fixture(scope="module")
def tower(tiny):
    from transformers import CLIPVisionModel

    from llava.model.tiny import TOWER_DIR

    return CLIPVisionModel.from_pretrained(os.path.join(tiny, TOWER_DIR)).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))


def test_9_visionzip_with_one_dominant_token_keeps_cls(tower, pixels):
    from visionzip.methods.visionzip import zip_vision_tokens

    out = zip_vision_tokens(tower, pixels, 1, 10)  # 10 tokens and empty keep_indices before
    assert out.keep_indices.tolist() == [[0]]
    assert out.tokens.shape == (1, 11, tower.config.hidden_size) and torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("dominant", [1, 2, 288, 576, 577])
def test_9_visionzip_dominant_selection_at_the_edges(dominant):
    from visionzip.methods.visionzip import select_dominant

    scores = torch.rand(3, 576, generator=torch.Generator().manual_seed(dominant))
    keep = select_dominant(scores, dominant, has_cls=True)
    assert keep.shape == (3, dominant) and (keep[:, 0] == 0).all()
    best = scores.topk(dominant - 1, dim=1).indices + 1
    for row, top in zip(keep, best):
        assert row.tolist() == sorted({0, *top.tolist()})
    no_cls = select_dominant(scores, dominant if dominant < 577 else 576, has_cls=False)
    assert no_cls.shape[1] == min(dominant, 576) and int(no_cls.min()) >= 0


@pytest.mark.parametrize("tokens, ratio", [(1, 0.5), (1, 0.0), (1, 1.0), (2, 0.5), (575, 0.5), (576, 0.0), (576, 1.0)])
def test_9_vispruner_selection_at_the_edges(tokens, ratio):
    from visionzip.methods.vispruner import vispruner_keep_indices

    generator = torch.Generator().manual_seed(tokens)
    scores, features = torch.rand(2, 576, generator=generator), torch.randn(2, 576, 8, generator=generator)
    keep = vispruner_keep_indices(scores, features, tokens, ratio)
    assert keep.shape == (2, tokens)
    for row, score in zip(keep, scores):
        assert len(set(row.tolist())) == tokens and 0 <= int(row.min()) and int(row.max()) < 576
        important = int(tokens * ratio)
        assert set(row[:important].tolist()) == set(score.topk(important).indices.tolist())


def test_9_budgets_beyond_the_edges_are_named_errors(tower, pixels):
    from visionzip.methods.visionzip import zip_vision_tokens
    from visionzip.methods.vispruner import vispruner_select

    with pytest.raises(ValueError, match="dominant"):
        zip_vision_tokens(tower, pixels, 0, 10)
    with pytest.raises(ValueError, match="exceeds the 577 tokens"):
        zip_vision_tokens(tower, pixels, 568, 10)
    with pytest.raises(ValueError, match="exceeds the 576 patch tokens"):
        vispruner_select(tower, pixels, 577)


# ----------------------------------------------------------- 7. NeXT runs recorded under the wrong budget


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


def test_7_next_budgets_come_from_the_checkpoint_and_record_what_ran(tiny16, tmp_path, monkeypatch, capsys):
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


# ---------------------------------------------------------------------- 10. context overflow in chat


@pytest.fixture(scope="module")
def chat_model(tiny):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(tiny, None, None, device="cpu", compression="visionzip:54,10")
    return tokenizer, model, processor


def test_10_chat_never_cuts_silently_and_the_cache_stays_within_the_positions(chat_model):
    from llava.serve.chat import ChatSession

    tokenizer, model, processor = chat_model
    model.config.tokenizer_model_max_length = 150
    try:
        session = ChatSession(model, tokenizer, processor)
        session.set_image(Image.new("RGB", (60, 40), (200, 30, 30)))
        with pytest.raises(ValueError, match=r"takes \d+ positions .* the model has 150"):
            session.ask("Describe it. " * 40, max_new_tokens=4)  # was cut at 150 (question and ASSISTANT: lost)
        assert session.conv.messages == [] and session.cache is None
        session.ask("<image> What is this?", max_new_tokens=500)  # an explicit placeholder is accepted
        assert session.conv.messages[0][1].count("<image>") == 1
        assert session.cache.get_seq_length() <= 150
        for _ in range(10):  # later turns: refused once they no longer fit; the cache never passes 150
            try:
                session.ask("And then?", max_new_tokens=500)
            except ValueError as err:
                assert "positions" in str(err)
                break
            assert session.cache.get_seq_length() <= 150
        else:
            pytest.fail("ten turns of up to 500 tokens fit in 150 positions")
        assert session.cache.get_seq_length() <= 150
        assert session.conv.messages[-1][1] is not None  # the refused turn left no half exchange
    finally:
        model.config.tokenizer_model_max_length = 2048


# ---------------------------------------------------------------------- 11 / 12. fail-late inference


@pytest.fixture
def never_load(monkeypatch):
    import llava.eval.run_llava as run_llava
    import llava.serve.cli as serve_cli

    class Loaded(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Loaded("the model would load now: every check before it passed")

    monkeypatch.setattr(run_llava, "load_pretrained_model", refuse)
    monkeypatch.setattr(serve_cli, "load_pretrained_model", refuse)
    return Loaded


@pytest.mark.parametrize("extra, message", [
    (["--num_beams", "0"], "--num_beams must be an integer >= 1"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--max_new_tokens", "-5"], "--max_new_tokens must be an integer >= 1"),
    (["--top_p", "1.5"], r"--top_p must be in \(0, 1\]"),
])
def test_12_bad_generation_options_are_refused_before_loading(tmp_path, never_load, extra, message):
    from llava.eval.run_llava import main

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(ValueError, match=message):
        main(["--model-path", "m", "--image-file", str(image), "--query", "q", "--device", "cpu", *extra])


def test_11_device_and_image_are_checked_before_loading(tmp_path, never_load, monkeypatch):
    from llava.eval.run_llava import main
    from llava.mm_utils import ImageLoadError
    from llava.serve.cli import main as cli_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    for entry in (main, cli_main):
        args = ["--model-path", "m", "--image-file", str(image), "--device", "cuda"]
        with pytest.raises(ValueError, match="CUDA is not available"):  # ran float16 on the CPU before
            entry(args + (["--query", "q"] if entry is main else []))
        args = ["--model-path", "m", "--image-file", str(tmp_path / "missing.png"), "--device", "cpu"]
        with pytest.raises(ImageLoadError, match="missing.png"):
            entry(args + (["--query", "q"] if entry is main else []))


def test_12_an_image_path_with_a_comma_is_one_image(tmp_path, never_load):
    from llava.eval.run_llava import main
    from llava.preflight import split_image_files

    image = tmp_path / "photo, 2024.png"
    Image.new("RGB", (8, 8)).save(image)
    assert split_image_files(str(image), ",") == [str(image)]
    assert split_image_files("a.png,b.png", ",") == ["a.png", "b.png"]
    with pytest.raises(never_load):  # the image loaded; the next step would be the model
        main(["--model-path", "m", "--image-file", str(image), "--query", "q", "--device", "cpu"])


def test_12_load_image_fetches_urls_with_a_timeout(monkeypatch):
    import socket
    import urllib.request

    from llava.mm_utils import URL_TIMEOUT_S, ImageLoadError, load_image

    seen = {}

    def stalled(url, timeout=None):
        seen["timeout"] = timeout
        raise socket.timeout("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", stalled)
    with pytest.raises(ImageLoadError, match="http://example.invalid/x.png"):
        load_image("http://example.invalid/x.png")
    assert seen["timeout"] == URL_TIMEOUT_S and math.isfinite(seen["timeout"])


@pytest.mark.parametrize("pixels, message", [
    (torch.full((1, 3, 4, 4), float("nan")), "NaN or infinite"),
    (torch.full((1, 3, 4, 4), float("inf")), "NaN or infinite"),
    (torch.full((1, 3, 4, 4), 200, dtype=torch.uint8), "dtype torch.uint8"),
    (torch.full((1, 3, 4, 4), 200.0), "beyond the 10 of normalised pixels"),
])
def test_12_bad_pixels_are_named(pixels, message):
    from llava.preflight import check_pixel_values

    with pytest.raises(ValueError, match=message):
        check_pixel_values(pixels)
    check_pixel_values(torch.zeros(1, 3, 4, 4).uniform_(-2, 2))


def test_10_run_llava_refuses_a_prompt_that_does_not_fit(tiny, tmp_path):
    from llava.eval.run_llava import main

    short = tmp_path / "short-context"
    shutil.copytree(tiny, short)
    config = json.loads((short / "config.json").read_text())
    config["tokenizer_model_max_length"] = 600  # 576 visual tokens + the template leave no room
    (short / "config.json").write_text(json.dumps(config))
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (0, 90, 200)).save(image)
    with pytest.raises(ValueError, match=r"takes \d+ positions .*the model has 600"):
        # answered after cutting the question end and "ASSISTANT:" away, with one log line, before
        main(["--model-path", str(short), "--image-file", str(image), "--query", "What is shown? " * 10,
              "--device", "cpu", "--temperature", "0", "--max_new_tokens", "4"])
