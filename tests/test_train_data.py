"""Training data pipeline: label masking, dataset checks, collator, sampler, subset, arguments, launchers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import CLIPImageProcessorPil, HfArgumentParser

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import tokenizer_image_token
from llava.model.tokenizer import load_tokenizer
from llava.processor import LlavaProcessor
from llava.train.arguments import (
    CompressionArguments,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    build_compression_config,
)
from llava.train.checkpointing import FINISHED_MARKER, plan_start
from llava.train.dataset import DataFileError, LazySupervisedDataset, SupervisedCollator
from llava.train.preprocess import SampleError, UnlearnableSample, conversation_turns, tokenize_conversation
from llava.train.sampler import ModalityLengthGroupedSampler, modality_grouped_order
from llava.train.subset import make_subset
from llava.train.synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer(official_dir):
    tok = load_tokenizer(str(official_dir / "llava-v1.5-tiny"), model_max_length=2048, padding_side="right")
    tok.pad_token = tok.unk_token
    return tok


@pytest.fixture(scope="module")
def processor(official_dir):
    return CLIPImageProcessorPil.from_pretrained(str(official_dir / "clip-vit-tiny-336"))


def supervised_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def turns_of(*pairs):
    return conversation_turns([{"from": s, "value": v} for s, v in pairs], "test sample")


# ---- label masking ----


def test_v1_labels_cover_exactly_the_replies_multi_turn(tokenizer):
    turns = turns_of(
        ("human", "<image>\nWhat is it?"), ("gpt", "A red cat."), ("human", "And now?"), ("gpt", "It sleeps: zzz")
    )
    out = tokenize_conversation(turns, get_conv_template("v1"), tokenizer, "s0")
    assert len(out.input_ids) == len(out.labels)
    # the supervised tokens are the two replies, each closed by </s>, and nothing else (no ':' of ASSISTANT:)
    assert supervised_text(tokenizer, out.labels) == "A red cat.</s>It sleeps: zzz</s>"
    supervised = [i for i, t in enumerate(out.labels) if t != IGNORE_INDEX]
    assert len(supervised) == sum(
        len(tokenizer(" " + r + "</s>", add_special_tokens=False).input_ids) for r in ("A red cat.", "It sleeps: zzz")
    )
    # the pieces add up to the whole prompt tokenized as at inference
    assert out.input_ids == tokenizer_image_token(out.prompt, tokenizer)
    assert out.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert out.labels[out.input_ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX


def test_v1_prompt_part_equals_the_inference_prompt(tokenizer):
    conv = get_conv_template("v1")
    question = "<image>\nDescribe the picture."
    out = tokenize_conversation(turns_of(("human", question), ("gpt", "Noise.")), conv, tokenizer, "s0")
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    inference = tokenizer_image_token(conv.get_prompt(), tokenizer)
    first_label = next(i for i, t in enumerate(out.labels) if t != IGNORE_INDEX)
    assert out.input_ids[:first_label] == inference


def test_plain_template_masks_the_image_and_learns_the_caption(tokenizer):
    out = tokenize_conversation(
        turns_of(("human", "<image>\nignored instruction"), ("gpt", "a small caption")),
        get_conv_template("plain"),
        tokenizer,
        "s0",
    )
    assert out.input_ids[:2] == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert out.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert all(t != IGNORE_INDEX for t in out.labels[2:])
    assert tokenizer.decode(out.labels[2:]).strip() == "a small caption"


def test_special_token_inside_a_reply_is_unlearnable(tokenizer):
    turns = turns_of(("human", "Hi"), ("gpt", "Bye</s> and more"))
    with pytest.raises(UnlearnableSample, match="s7.*special token"):
        tokenize_conversation(turns, get_conv_template("v1"), tokenizer, "s7")


def test_turns_must_alternate():
    with pytest.raises(SampleError, match="sample x: turns must alternate"):
        conversation_turns([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "sample x")
    with pytest.raises(SampleError, match="comes from 'robot'"):
        conversation_turns([{"from": "robot", "value": "a"}], "sample x")


# ---- dataset ----


def write_records(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def make_dataset(path, tokenizer, processor, folder=None, **kwargs):
    return LazySupervisedDataset(
        path, LlavaProcessor.for_training(tokenizer, processor, "v1", image_aspect_ratio="pad"), image_folder=folder,
        **kwargs,
    )


def test_dataset_items_and_collator(tmp_path, tokenizer, processor):
    data = write_synthetic_dataset(str(tmp_path), num_image=2, num_text=1)
    dataset = make_dataset(data, tokenizer, processor, str(tmp_path / "images"), visual_tokens_per_image=64)
    assert len(dataset) == 3 and dataset.count_modalities() == (2, 1)
    assert [length > 0 for length in dataset.modality_lengths] == [True, True, False]
    items = [dataset[i] for i in range(3)]
    assert items[0]["image"].shape == (3, 336, 336) and items[0]["image_size"] == (64, 48)
    assert not items[2]["input_ids"].eq(IMAGE_TOKEN_INDEX).any()
    assert items[2]["image"].abs().sum() == 0  # blank image for a text-only sample
    batch = SupervisedCollator(pad_token_id=tokenizer.pad_token_id, model_max_length=2048)(items)
    width = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == (3, width) and batch["images"].shape == (3, 3, 336, 336)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert "skipped_samples" not in batch


def test_multiple_images_rejected_naming_the_sample(tmp_path, tokenizer, processor):
    records = [
        {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {
            "id": "two-images",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}],
        },
    ]
    with pytest.raises(DataFileError, match=r"sample 1 \(id 'two-images'\): 2 <image> placeholders"):
        make_dataset(write_records(tmp_path, records), tokenizer, processor, str(tmp_path), check_image_files=False)


def test_missing_image_named(tmp_path, tokenizer, processor):
    data = write_synthetic_dataset(str(tmp_path), num_image=3, num_text=0)
    os.remove(tmp_path / "images" / "img_1.png")
    with pytest.raises(DataFileError, match=r"(?s)1 missing image files.*sample 1 \(id 'image-1'\).*img_1.png"):
        make_dataset(data, tokenizer, processor, str(tmp_path / "images"))


def test_corrupt_json_line_named(tmp_path, tokenizer, processor):
    good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"id": "b", "conversations": [\n' + json.dumps(good) + "\n")
    with pytest.raises(DataFileError, match=r"data.jsonl:2: corrupt JSON line \(record 1\)"):
        make_dataset(str(path), tokenizer, None)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a"},\n {"id": ]')
    with pytest.raises(DataFileError, match="broken.json: corrupt JSON at line 2"):
        make_dataset(str(broken), tokenizer, None)


def test_unlearnable_samples_are_skipped_and_reported_or_stop(tmp_path, tokenizer, processor):
    long_question = "word " * 400
    records = [
        {"id": "too-long", "conversations": [{"from": "human", "value": long_question}, {"from": "gpt", "value": "ok"}]},
        {"id": "fine", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    path = write_records(tmp_path, records)
    dataset = make_dataset(path, tokenizer, None, model_max_length=128)
    item = dataset[0]
    # the replacement is the next learnable sample, and the skip is reported by name
    assert supervised_text(tokenizer, item["labels"].tolist()) == "hello</s>"
    assert len(item["skipped_samples"]) == 1
    assert "sample 0 (id 'too-long'): no reply token within model_max_length 128" in item["skipped_samples"][0]
    batch = SupervisedCollator(tokenizer.pad_token_id, 128)([item, dataset[1]])
    assert batch["skipped_samples"] == item["skipped_samples"]
    strict = make_dataset(path, tokenizer, None, model_max_length=128, bad_sample_policy="error")
    with pytest.raises(UnlearnableSample, match="too-long"):
        strict[0]


def test_image_positions_count_towards_truncation(tmp_path, tokenizer, processor):
    data = write_synthetic_dataset(str(tmp_path), num_image=1, num_text=0, multi_turn=False)
    text_ids = len(make_dataset(data, tokenizer, processor, str(tmp_path / "images"), visual_tokens_per_image=1)[0]["input_ids"])
    # with 576 visual tokens the reply no longer fits in the same length; with 64 it does
    fits = make_dataset(data, tokenizer, processor, str(tmp_path / "images"), model_max_length=text_ids + 63,
                        visual_tokens_per_image=64, bad_sample_policy="error")
    assert fits[0]["labels"].ne(IGNORE_INDEX).any()
    cut = make_dataset(data, tokenizer, processor, str(tmp_path / "images"), model_max_length=text_ids + 63,
                       visual_tokens_per_image=576, bad_sample_policy="error")
    with pytest.raises(UnlearnableSample, match="image-0"):
        cut[0]


# ---- sampler ----


def test_modality_grouped_sampler_keeps_modalities_apart():
    lengths = [10 + i for i in range(37)] + [-(5 + i) for i in range(23)]
    batch, world = 4, 2
    order = list(ModalityLengthGroupedSampler(lengths, batch, world, seed=3))
    assert sorted(order) == list(range(60))
    mega = batch * world
    full = len([i for i in lengths if i > 0]) // mega + len([i for i in lengths if i < 0]) // mega
    for k in range(full):
        chunk = order[k * mega : (k + 1) * mega]
        assert len({lengths[i] > 0 for i in chunk}) == 1
    # deterministic per (seed, epoch); another epoch reshuffles
    sampler = ModalityLengthGroupedSampler(lengths, batch, world, seed=3)
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_megabatches_are_balanced_and_sorted():
    lengths = [100, 1, 90, 2, 80, 3, 70, 4]
    order = modality_grouped_order(lengths, batch_size=2, world_size=2, generator=torch.Generator().manual_seed(0))
    for start in range(0, 8, 4):
        first, second = order[start : start + 2], order[start + 2 : start + 4]
        totals = sum(lengths[i] for i in first), sum(lengths[i] for i in second)
        assert abs(totals[0] - totals[1]) <= max(lengths[i] for i in first + second)


# ---- subset ----


def test_subset_is_deterministic_and_keeps_the_mix(tmp_path):
    data = write_synthetic_dataset(str(tmp_path / "d"), num_image=40, num_text=20)
    out = str(tmp_path / "sub.json")
    summary = make_subset(data, out, fraction=0.1, seed=0)
    assert summary["written"] and (summary["with_image"], summary["text_only"]) == (4, 2)
    first = open(out, "rb").read()
    assert not make_subset(data, out, fraction=0.1, seed=0)["written"]
    assert open(out, "rb").read() == first
    with pytest.raises(FileExistsError, match="differs"):
        make_subset(data, out, fraction=0.1, seed=1)
    ids = [r["id"] for r in json.loads(first)]
    original = [r["id"] for r in json.load(open(data))]
    assert ids == [i for i in original if i in ids]  # file order kept


# ---- arguments and output directory ----


def test_compression_arguments():
    config = build_compression_config(CompressionArguments(compression="visionzip", visual_tokens=128), "pad")
    assert (config.dominant, config.contextual) == (108, 20)
    config = build_compression_config(CompressionArguments(compression="visionzip", visual_tokens=160), "anyres")
    assert (config.dominant, config.contextual) == (27, 5)
    config = build_compression_config(CompressionArguments(compression="vispruner", visual_tokens=64), "pad")
    assert config.tokens == 64
    config = build_compression_config(CompressionArguments(compression="visionzip:54,10"), "pad")
    assert config.tokens_per_image == 64
    with pytest.raises(ValueError, match="must divide by 5; got 101"):
        build_compression_config(CompressionArguments(compression="visionzip", visual_tokens=101), "anyres")
    with pytest.raises(ValueError, match="does not match"):
        build_compression_config(
            CompressionArguments(compression="visionzip", dominant=54, contextual=10, visual_tokens=128), "pad"
        )


def test_output_directory_plan(tmp_path):
    out = tmp_path / "run"
    assert plan_start(str(out), None, False).resume_from is None
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-4").mkdir()  # interrupted while saving: no trainer_state.json
    plan = plan_start(str(out), None, False)
    assert plan.resume_from == str(out / "checkpoint-2")
    assert plan_start(str(out), None, True).resume_from is None
    (out / FINISHED_MARKER).write_text("{}")
    with pytest.raises(FileExistsError, match="holds a finished run.*--overwrite_output_dir"):
        plan_start(str(out), None, False)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        plan_start(str(out), str(out / "checkpoint-4"), True)


@pytest.mark.parametrize(
    "script", ["finetune_projector_visionzip.sh", "finetune_visionzip.sh", "finetune_visionzip_24gb.sh"]
)
@pytest.mark.parametrize("size", ["7b", "13b"])
def test_launchers_pass_only_known_arguments(script, size):
    env = dict(os.environ, DRY_RUN="1", MODEL_SIZE=size, BUDGET="128")
    out = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "v1_5", "train", script)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[:1] == ["deepspeed"] and "--module" in words
    args = words[words.index("llava.train.train") + 1 :]
    parser = HfArgumentParser((ModelArguments, DataArguments, CompressionArguments, TrainingArguments))
    namespace, unknown = parser.parse_known_args(args)
    assert unknown == []
    assert namespace.compression == "visionzip:128" and namespace.learning_rate == 2e-5
    assert size in namespace.model_name_or_path
    if "projector" in script:
        assert namespace.tune_mm_mlp_adapter is True and "10pct" in namespace.data_path
    else:
        assert namespace.warmup_steps == 0.03 and namespace.lr_scheduler_type == "cosine"
        batch = namespace.per_device_train_batch_size * namespace.gradient_accumulation_steps * 8
        assert batch == 128
        assert namespace.per_device_train_batch_size == (4 if "24gb" in script else 16)


def test_subset_script_runs(tmp_path):
    data = write_synthetic_dataset(str(tmp_path / "d"), num_image=10, num_text=10)
    out = tmp_path / "s.json"
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "make_subset.py"), "--input", data, "--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "2 of 20 records (1 with an image, 1 text-only)" in run.stdout


def test_sampler_batches_as_accelerate_shards_them():
    """accelerate hands consecutive batches to processes in turn: each megabatch becomes one step on every
    process, and every step of a process is single-modality (except the final remainder steps)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    lengths = [20 + i % 7 for i in range(40)] + [-(3 + i % 5) for i in range(24)]
    batch, world = 4, 2
    sampler = ModalityLengthGroupedSampler(lengths, batch, world, seed=0)
    per_process = [
        list(BatchSamplerShard(BatchSampler(sampler, batch, drop_last=False), num_processes=world, process_index=rank))
        for rank in range(world)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 64 // (batch * world)
    for rank_batches in per_process:
        for step in rank_batches:
            assert len({lengths[i] > 0 for i in step}) == 1
    seen = sorted(i for rank_batches in per_process for step in rank_batches for i in step)
    assert seen == list(range(64))


def test_training_free_launcher_runs_the_evaluation_scripts_per_budget():
    env = dict(os.environ, DRY_RUN="1", MODEL_SIZE="13b", BENCHMARKS="pope gqa")
    out = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "v1_5", "train", "training_free.sh")], env=env,
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if line.strip()]
    runs = [(words[0], os.path.relpath(words[2], REPO), words[3], words[4]) for words in lines]
    assert runs == [
        ("MODEL_PATH=liuhaotian/llava-v1.5-13b", f"scripts/v1_5/eval/{bench}.sh", "visionzip", budget)
        for budget in ("192", "128", "64")
        for bench in ("pope", "gqa")
    ]
    for _model, script, _method, _budget in runs:
        assert os.path.isfile(os.path.join(REPO, script))
