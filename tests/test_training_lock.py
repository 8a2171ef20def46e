"""Issue 22, item 5: a training run holds a lock on its output folder (``llava.train.checkpointing.
training_lock``, a ``llava.utils_io.FileLock`` as generation holds on its answers file): a second run
into the same folder fails at once, naming the holder, before loading anything; the lock goes with the run.
Item 11: a compression that cannot be trained (PruMerge's adaptive mode: a token count per image) is
refused before the model loads."""
from __future__ import annotations

import os
import socket

import pytest

from llava.model import LlavaLlamaForCausalLM
from llava.model.tiny import build_tiny_llava
from llava.train.checkpointing import FINISHED_MARKER, TRAINING_LOCK, training_lock
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


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(LlavaLlamaForCausalLM, "from_pretrained", refuse)


def run_training(model, data, output, *extra, compression="visionzip:64"):
    return train(*parse_arguments([
        "--model_name_or_path", str(model), "--data_path", str(data / "data.json"),
        "--image_folder", str(data / "images"), "--compression", compression, "--image_aspect_ratio", "pad",
        "--tune_mm_mlp_adapter", "True", "--output_dir", str(output), "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "True", "--disable_tqdm", "True", *extra,
    ]))


def test_a_second_run_into_a_held_folder_fails_at_once_naming_the_holder(tiny, data_dir, tmp_path, no_model_loading):
    out = tmp_path / "out"
    with training_lock(str(out)):  # stands for the first run, still training
        holder = rf"host '{socket.gethostname()}', pid {os.getpid()}"
        with pytest.raises(FileExistsError, match=rf"training output folder .*out is in use .*{holder}"):
            run_training(tiny, data_dir, out)
        assert os.listdir(out) == [TRAINING_LOCK]  # the refused run wrote nothing
    assert not out.exists()  # the lock's folder, created for it and left empty, is gone with it


def test_the_lock_is_released_after_a_run(tiny, data_dir, tmp_path):
    out = tmp_path / "out"
    run_training(tiny, data_dir, out)
    assert (out / FINISHED_MARKER).is_file() and not (out / TRAINING_LOCK).exists()
    with pytest.raises(FileExistsError, match="holds a finished run"):  # the usual refusal, not the lock
        run_training(tiny, data_dir, out)
    assert not (out / TRAINING_LOCK).exists()


@pytest.mark.parametrize("spec", ["prumerge:mode=adaptive", "prumerge+:mode=adaptive"])
def test_an_adaptive_token_count_is_refused_for_training(tiny, data_dir, tmp_path, spec, no_model_loading):
    with pytest.raises(ValueError, match=r"mode=adaptive keeps a number of tokens that depends on each image"):
        run_training(tiny, data_dir, tmp_path / "out", compression=spec)
    assert not (tmp_path / "out").exists()
