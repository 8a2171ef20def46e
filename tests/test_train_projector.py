"""In-process training runs on the tiny fixture: projector-only (VisionZip‡) and full fine-tuning with
VisionZip, the compressed sequence the LLM trains on, saving and reloading, LoRA, the quick demo."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from llava.model.tiny import build_tiny_llava
from llava.train.checkpointing import FINISHED_MARKER
from llava.train.dataset import SupervisedCollator
from llava.train.quick import tune_projector_demo
from llava.train.synthetic import write_synthetic_dataset
from llava.train.train import parse_arguments, train

BUDGET, DOMINANT, CONTEXTUAL = 64, 54, 10


class SequenceRecorder(TrainerCallback):
    """Records the length of every multimodal sequence the language model receives in training."""

    def __init__(self):
        self.lengths: list[list[int]] = []
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(_module, _args, kwargs):
            mask = kwargs.get("attention_mask")
            embeds = kwargs["inputs_embeds"]
            rows = mask.sum(dim=1).tolist() if mask is not None else [embeds.shape[1]] * embeds.shape[0]
            self.lengths.append(sorted(int(r) for r in rows))

        self.handle = model.get_model().register_forward_pre_hook(record, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


def run(base, data_dir, output_dir, *extra, steps, lr, callbacks=None):
    argv = [
        "--model_name_or_path", str(base),
        "--data_path", os.path.join(data_dir, "data.json"),
        "--image_folder", os.path.join(data_dir, "images"),
        "--compression", "visionzip",
        "--visual_tokens", str(BUDGET),
        "--image_aspect_ratio", "pad",
        "--output_dir", str(output_dir),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", "2",
        "--learning_rate", str(lr),
        "--lr_scheduler_type", "constant",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu", "True",
        "--disable_tqdm", "True",
        "--model_max_length", "2048",
        *extra,
    ]
    return train(*parse_arguments(argv), callbacks=callbacks)


def expected_lengths(dataset) -> list[int]:
    """Text ids with the image placeholder replaced by the compressed visual tokens."""
    out = []
    for i in range(len(dataset)):
        ids = dataset[i]["input_ids"]
        out.append(len(ids) - int((ids == IMAGE_TOKEN_INDEX).sum()) + BUDGET)
    return sorted(out)


@pytest.fixture(scope="module")
def base_dir(official_dir):
    return official_dir / "llava-v1.5-tiny"


@pytest.fixture(scope="module")
def overfit_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overfit")
    write_synthetic_dataset(str(folder), num_image=2, num_text=0, multi_turn=False)
    return str(folder)


@pytest.fixture(scope="module")
def projector_run(base_dir, overfit_data, tmp_path_factory):
    before = {k: v.clone() for k, v in LlavaLlamaForCausalLM.from_pretrained(str(base_dir)).state_dict().items()}
    recorder = SequenceRecorder()
    output_dir = tmp_path_factory.mktemp("projector") / "llava-tiny-projector"
    result = run(base_dir, overfit_data, output_dir, "--tune_mm_mlp_adapter", "True", steps=6, lr=1e-2,
                 callbacks=[recorder])
    return before, recorder, result


def test_projector_only_changes_only_the_projector(projector_run):
    before, _recorder, result = projector_run
    after = result.model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    projector_keys = {k for k in after if ".mm_projector." in k}
    assert projector_keys == {f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert changed == projector_keys  # every projector tensor moved; everything else bit-identical


def test_projector_files_and_config(projector_run):
    _before, _recorder, result = projector_run
    out = result.output_dir
    saved = torch.load(os.path.join(out, "mm_projector.bin"), weights_only=True)
    assert set(saved) == {k for k in result.model.state_dict() if ".mm_projector." in k}
    for key, value in load_file(os.path.join(out, "mm_projector.safetensors")).items():
        assert torch.equal(value, saved[key])
        assert torch.equal(value, result.model.state_dict()[key])
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["visual_compression"]["method"] == "visionzip"
    assert (config["visual_compression"]["dominant"], config["visual_compression"]["contextual"]) == (DOMINANT, CONTEXTUAL)
    assert config["tune_mm_mlp_adapter"] is True and config["mm_projector_type"] == "mlp2x_gelu"
    marker = json.load(open(os.path.join(out, FINISHED_MARKER)))
    assert marker["mode"] == "projector" and marker["global_step"] == 6 and marker["skipped_samples"] == 0


def test_projector_reload_reproduces_logits(projector_run, base_dir):
    _before, _recorder, result = projector_run
    _tokenizer, loaded, _processor, _ = load_pretrained_model(result.output_dir, model_base=str(base_dir), device="cpu")
    assert loaded.get_visual_compression().tokens_per_image == BUDGET
    dataset = result.trainer.train_dataset
    pad_id = result.trainer.processing_class.pad_token_id  # the builder leaves pad unset, as the original
    batch = SupervisedCollator(pad_id, 2048)([dataset[0], dataset[1]])
    batch.pop("labels")
    model = result.model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = loaded(**batch).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_projector_training_sees_the_compressed_sequence_and_learns(projector_run):
    _before, recorder, result = projector_run
    expected = expected_lengths(result.trainer.train_dataset)
    assert len(recorder.lengths) == 6
    assert all(lengths == expected for lengths in recorder.lengths)
    assert max(expected) < 576  # the uncompressed image alone would be 576 positions
    assert result.losses[-1] < result.losses[0] - 0.5


def test_full_finetuning_sees_the_compressed_sequence_and_learns(base_dir, overfit_data, tmp_path):
    recorder = SequenceRecorder()
    result = run(base_dir, overfit_data, tmp_path / "full", steps=4, lr=1e-3, callbacks=[recorder])
    expected = expected_lengths(result.trainer.train_dataset)
    assert recorder.lengths == [expected] * 4
    assert result.losses[-1] < result.losses[0] / 2
    assert os.path.isfile(tmp_path / "full" / "model.safetensors")
    # a second start into the finished run is refused before any work
    with pytest.raises(FileExistsError, match="holds a finished run"):
        run(base_dir, overfit_data, tmp_path / "full", steps=4, lr=1e-3)


def test_lora_run_saves_adapter_and_reloads(base_dir, overfit_data, tmp_path):
    out = tmp_path / "llava-tiny-lora"
    result = run(base_dir, overfit_data, out, "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
                 steps=2, lr=1e-3)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".mm_projector." in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert non_lora and all("mm_projector" in k for k in non_lora)
    assert os.path.isfile(out / "adapter_config.json")
    _tok, loaded, _proc, _ = load_pretrained_model(str(out), model_base=str(base_dir), device="cpu")
    trained = {k.replace("base_model.model.", ""): v for k, v in non_lora.items()}
    torch.testing.assert_close(loaded.state_dict()["model.mm_projector.0.weight"], trained["model.mm_projector.0.weight"])


def test_projector_learning_rate_group_and_offline_wandb(base_dir, overfit_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    result = run(base_dir, overfit_data, tmp_path / "lr", "--mm_projector_lr", "5e-3", "--report_to", "wandb",
                 steps=1, lr=1e-4)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    optimizer = result.trainer.optimizer
    projector = {id(p) for n, p in result.model.named_parameters() if ".mm_projector." in n}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & projector:
            assert ids <= projector and group["initial_lr"] == 5e-3
        elif ids:
            assert group["initial_lr"] == 1e-4


def test_quick_projector_demo_on_the_embedded_model(tmp_path):
    model_dir = build_tiny_llava(str(tmp_path / "tiny-llava"))
    losses = tune_projector_demo(model_dir, str(tmp_path / "demo"), steps=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert os.path.isfile(tmp_path / "demo" / "run" / "mm_projector.bin")
    with pytest.raises(FileExistsError):
        tune_projector_demo(model_dir, str(tmp_path / "demo"), steps=2, overwrite=False)


def test_qlora_quantises_the_llm_but_not_the_projector(base_dir, overfit_data, tmp_path):
    import bitsandbytes as bnb

    out = tmp_path / "llava-tiny-qlora"
    result = run(base_dir, overfit_data, out, "--lora_enable", "True", "--lora_r", "4", "--bits", "4",
                 steps=1, lr=1e-3)
    modules = dict(result.model.named_modules())
    quantised = [n for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(".layers.0.self_attn.q_proj" in n for n in quantised)
    assert not any("mm_projector" in n or "lm_head" in n for n in quantised)
    projector = [p for n, p in result.model.named_parameters() if ".mm_projector." in n]
    assert projector and all(p.requires_grad and p.dtype == torch.float32 for p in projector)
    assert (out / "adapter_config.json").is_file() and (out / "non_lora_trainables.bin").is_file()
    assert json.load(open(out / FINISHED_MARKER))["mode"] == "qlora-4bit"
