"""Real DeepSpeed runs with 2 CPU processes (gloo): ZeRO-3 projector tuning through the ``deepspeed``
launcher, ZeRO-2 full fine-tuning through ``torchrun``, killed and resumed; the outputs reload.

The workers run ``llava.train.train`` through ``tests/deepspeed_gloo_train.py``, which marks DeepSpeed's
shared-memory all-reduce op unavailable first: DeepSpeed would JIT-compile it (about 95 CPU-s per fresh
checkout) and runs on GPUs never use it."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from llava.model.builder import load_pretrained_model
from llava.train.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# llava.train.train, run as __main__ after DeepSpeed's shared-memory op is marked unavailable (see the file)
TRAIN_SCRIPT = Path(__file__).resolve().parent / "deepspeed_gloo_train.py"
VENV_BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 400


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ds_env() -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
    )
    return env


def train_args(base, data_dir, output_dir, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(base),
        "--data_path", str(data_dir / "data.json"),
        "--image_folder", str(data_dir / "images"),
        "--compression", "visionzip",
        "--visual_tokens", "64",
        "--image_aspect_ratio", "pad",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "1",
        "--logging_steps", "1",
        "--report_to", "none",
        "--disable_tqdm", "True",
        "--model_max_length", "2048",
        *extra,
    ]


def torchrun(args) -> list[str]:
    return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(TRAIN_SCRIPT), *args]


def deepspeed_launcher(args) -> list[str]:
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            str(TRAIN_SCRIPT), *args]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and its workers, by id (torchrun starts each worker in a session of its own)."""
    workers = psutil.Process(process.pid).children(recursive=True)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.send_signal(signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(workers, timeout=30)


def run_to_end(command) -> str:
    done = subprocess.run(command, cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds-data")
    write_synthetic_dataset(str(folder), num_image=4, num_text=2)
    return folder


@pytest.fixture(scope="module")
def base_dir(official_dir):
    return official_dir / "llava-v1.5-tiny"


def test_zero3_projector_tuning_two_processes(base_dir, data_dir, tmp_path):
    out = tmp_path / "llava-tiny-zero3-projector"
    args = train_args(base_dir, data_dir, out, "--tune_mm_mlp_adapter", "True", "--max_steps", "2",
                      "--learning_rate", "1e-2", "--save_strategy", "no",
                      "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero3.json"))
    output = run_to_end(deepspeed_launcher(args))
    assert "64 visual tokens per image (visionzip dominant=54 contextual=10)" in output
    assert "deepspeed_shm_comm" not in output  # gloo's collectives, no op compiled (tests/deepspeed_gloo_train.py)
    saved = torch.load(out / "mm_projector.bin", weights_only=True)
    # gathered from the ZeRO-3 partitions: full shapes, not the empty local shards
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "model.mm_projector.0.weight": (128, 64),
        "model.mm_projector.0.bias": (128,),
        "model.mm_projector.2.weight": (128, 128),
        "model.mm_projector.2.bias": (128,),
    }
    base = load_file(base_dir / "model.safetensors")
    assert not torch.equal(saved["model.mm_projector.0.weight"], base["model.mm_projector.0.weight"])
    _tok, model, _proc, _ = load_pretrained_model(str(out), model_base=str(base_dir), device="cpu")
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value)
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert model.get_visual_compression().tokens_per_image == 64


def test_zero2_full_finetuning_killed_and_resumed(base_dir, data_dir, tmp_path):
    out = tmp_path / "llava-tiny-zero2-full"
    total = 6
    args = train_args(base_dir, data_dir, out, "--max_steps", str(total), "--learning_rate", "1e-4",
                      "--save_strategy", "steps", "--save_steps", "1", "--group_by_modality_length", "True",
                      "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero2.json"))
    first = subprocess.Popen(torchrun(args), cwd=REPO, env=ds_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while not (out / "checkpoint-1" / "trainer_state.json").exists():
            assert first.poll() is None, f"the first run ended early (exit {first.returncode})"
            assert time.time() < deadline, "no checkpoint appeared in time"
            time.sleep(0.1)
    finally:
        kill_tree(first)
    assert not (out / "training_complete.json").exists()
    saved_steps = sorted(
        int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()
    )
    assert saved_steps and saved_steps[-1] < total
    resumed_from = saved_steps[-1]

    output = run_to_end(torchrun(args))
    assert f"resuming from {out / f'checkpoint-{resumed_from}'} (step {resumed_from}" in output
    # only the remaining steps ran: one loss line each
    assert output.count("'loss': ") == total - resumed_from
    state = json.load(open(out / "trainer_state.json"))
    assert state["global_step"] == total
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == list(range(1, total + 1))
    marker = json.load(open(out / "training_complete.json"))
    assert marker["global_step"] == total and marker["mode"] == "full"

    _tok, model, _proc, _ = load_pretrained_model(str(out), model_base=None, device="cpu")
    trained = model.state_dict()
    base = load_file(base_dir / "model.safetensors")
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert model.config.visual_compression["dominant"] == 54
