"""Training runs that must not destroy or corrupt anything: the output folder is never the input model and
holds only what the run wrote, a run resumes only its own checkpoints with its own settings, saves are
atomic, one bad image does not kill a run mid-epoch, and the data is read before the model loads.

Defects found by hostile-input testing (issue 13), each reproduced as a test that failed before its fix.
Models are the tiny builds of ``llava.model.tiny``; training runs are 1-2 steps on 2 samples.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from llava.model import LlavaLlamaForCausalLM
from llava.model.tiny import build_tiny_llava
from llava.train.checkpointing import FINISHED_MARKER, RUN_RECORD
from llava.train.synthetic import write_synthetic_dataset
from llava.train.train import parse_arguments, train


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


# ------------------------------------------------------------- output = input deletes the input model


def test_output_dir_equal_to_the_model_is_refused_and_nothing_deleted(tiny, data_dir, tmp_path, no_model_loading):
    inplace = tmp_path / "inplace"
    shutil.copytree(tiny, inplace)
    before = sorted(os.listdir(inplace))
    with pytest.raises(ValueError, match="is the folder of --model_name_or_path"):
        run_training(inplace, data_dir, inplace, "--overwrite_output_dir", "True")
    assert sorted(os.listdir(inplace)) == before
    assert os.path.getsize(inplace / "model.safetensors") > 0


def test_weights_this_code_did_not_write_are_never_deleted(tiny, data_dir, tmp_path, no_model_loading):
    other = tmp_path / "original-llava-output"
    other.mkdir()
    (other / "mm_projector.bin").write_bytes(b"weights of another tool")
    with pytest.raises(FileExistsError, match="not written by a run of this code"):
        run_training(tiny, data_dir, other, "--overwrite_output_dir", "True")
    assert (other / "mm_projector.bin").read_bytes() == b"weights of another tool"


# ------------------------------------------------------------------- run identity on checkpoints


def test_an_overwritten_run_never_resumes_from_the_old_runs_checkpoints(tiny, data_dir, tmp_path):
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


def test_resuming_with_other_settings_is_refused_before_loading(tiny, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run64"
    with pytest.raises(Killed):
        run_training(tiny, data_dir, out, "--save_strategy", "steps", "--save_steps", "1", callbacks=[KillAtStep(2)])
    assert (out / "checkpoint-1" / RUN_RECORD).is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(LlavaLlamaForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ValueError, match=r"compression.visual_tokens: 64 -> 128"):
        run_training(tiny, data_dir, out, "--save_strategy", "steps", "--save_steps", "1", tokens=128)


def test_explicit_resume_from_a_checkpoint_without_identity_is_refused(tiny, data_dir, tmp_path, no_model_loading):
    foreign = tmp_path / "downloaded" / "checkpoint-5"
    foreign.mkdir(parents=True)
    (foreign / "trainer_state.json").write_text("{}")
    (foreign / "optimizer.pt").write_bytes(b"untrusted pickle")
    with pytest.raises(ValueError, match="weights_only=False"):
        run_training(tiny, data_dir, tmp_path / "out", "--resume_from_checkpoint", str(foreign))


# ---------------------------------------------------------------------------- saves are not atomic


def test_a_failed_final_save_leaves_no_half_file_and_the_run_can_be_run_again(tiny, data_dir, tmp_path, monkeypatch):
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


def test_an_unwritable_output_dir_is_found_before_loading(tiny, data_dir, tmp_path, no_model_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="not writable"):
        run_training(tiny, data_dir, blocker / "out")


def test_an_output_dir_without_room_is_found_before_loading(tiny, data_dir, tmp_path, monkeypatch, no_model_loading):
    import llava.preflight as preflight

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(OSError, match="MiB free, less than"):
        run_training(tiny, data_dir, tmp_path / "out")


# ------------------------------------------------------------- one bad image kills a run mid-epoch


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


def test_a_decompression_bomb_is_skipped_and_counted(tiny, tmp_path, monkeypatch):
    dataset = bomb_dataset(tiny, tmp_path, monkeypatch, check_image_decode="no", bad_sample_policy="skip")
    example = dataset[1]  # raised DecompressionBombError before
    assert len(example["skipped_samples"]) == 1 and "sample 1" in example["skipped_samples"][0]
    assert "decompression bomb" in example["skipped_samples"][0].lower()


def test_a_decompression_bomb_stops_the_run_naming_the_sample(tiny, tmp_path, monkeypatch):
    from llava.train.preprocess import UnlearnableSample

    dataset = bomb_dataset(tiny, tmp_path, monkeypatch, check_image_decode="no", bad_sample_policy="error")
    with pytest.raises(UnlearnableSample, match="sample 1 .*cannot read image"):
        dataset[1]


def test_preflight_decodes_the_images_of_a_small_dataset(tiny, tmp_path, monkeypatch):
    from llava.train.dataset import DataFileError, check_data_file

    bomb_dataset(tiny, tmp_path, monkeypatch, check_image_decode="no")
    with pytest.raises(DataFileError, match="1 images that do not decode.*\n  sample 1"):
        check_data_file(str(tmp_path / "data.json"), image_folder=str(tmp_path / "images"))  # "auto": decodes
    assert len(check_data_file(str(tmp_path / "data.json"), image_folder=str(tmp_path / "images"),
                               check_image_decode="no")) == 2


# ------------------------------------------------------------------------------------ fail-late


def test_training_reads_the_data_file_before_loading_the_model(tiny, tmp_path, no_model_loading):
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
