"""The training data's lookup-table pixels (llava.train.fast_pixels) against the image processor's own."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

from llava.mm_utils import process_images, processor_crop_size
from llava.model.tokenizer import load_tokenizer
from llava.processor import LlavaProcessor
from llava.train.dataset import LazySupervisedDataset
from llava.train.fast_pixels import ElementwisePixels


@pytest.fixture(scope="module")
def clip_processor(official_dir):
    return CLIPImageProcessorPil.from_pretrained(str(official_dir / "clip-vit-tiny-336"))


def random_image(side_w: int, side_h: int, seed: int, mode: str = "RGB") -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, size=(side_h, side_w, 3), dtype=np.uint8)
    return Image.fromarray(values, mode="RGB").convert(mode)


def processor_pixels(image_processor, image: Image.Image, aspect: str = "pad") -> torch.Tensor:
    """The pixels the training data took before the table: ``process_images`` as the model config asks."""
    return process_images([image], image_processor, SimpleNamespace(image_aspect_ratio=aspect))[0]


@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_clip_table_gives_the_processors_pixels_bit_for_bit(clip_processor, aspect):
    fast = ElementwisePixels.probe(clip_processor)
    assert fast is not None
    side = processor_crop_size(clip_processor)
    for seed in range(4):
        image = random_image(side, side, seed)
        expected = processor_pixels(clip_processor, image, aspect)
        got = fast(image)
        assert got.dtype == expected.dtype == torch.float32
        assert torch.equal(got, expected)


def test_siglip_table_gives_the_processors_pixels_bit_for_bit():
    siglip = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    fast = ElementwisePixels.probe(siglip)
    assert fast is not None and fast.side == 64
    image = random_image(64, 64, seed=7)
    assert torch.equal(fast(image), processor_pixels(siglip, image))


def test_images_that_need_geometry_or_conversion_take_the_processor(clip_processor):
    fast = ElementwisePixels.probe(clip_processor)
    side = processor_crop_size(clip_processor)
    assert fast(random_image(side + 1, side + 1, 0)) is None  # resized by the processor
    assert fast(random_image(side, side - 10, 0)) is None  # padded to a square first
    assert fast(random_image(side, side, 0, mode="L")) is None  # converted to RGB first
    assert fast(random_image(side, side, 0, mode="RGBA")) is None


def test_a_processor_that_resamples_is_refused(clip_processor):
    side = processor_crop_size(clip_processor)
    # resize to twice the side, then a centre crop of the side: each output pixel mixes its neighbours
    resampling = CLIPImageProcessorPil(size={"shortest_edge": 2 * side}, crop_size={"height": side, "width": side})
    assert ElementwisePixels.probe(resampling) is None
    # the same processor without the resize is a per-value map again
    plain = CLIPImageProcessorPil(do_resize=False, crop_size={"height": side, "width": side})
    assert ElementwisePixels.probe(plain) is not None


def test_dataset_items_equal_with_and_without_the_table(tmp_path, official_dir, clip_processor):
    side = processor_crop_size(clip_processor)
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for index, (width, height) in enumerate([(side, side), (side, side), (side + 40, side - 30)]):
        random_image(width, height, seed=100 + index).save(folder / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]})
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    tokenizer = load_tokenizer(str(official_dir / "llava-v1.5-tiny"), model_max_length=2048, padding_side="right")
    processor = LlavaProcessor.for_training(tokenizer, clip_processor, "v1", image_aspect_ratio="pad")
    dataset = LazySupervisedDataset(str(data), processor, image_folder=str(folder))
    assert dataset.fast_pixels is not None
    with_table = [dataset[i] for i in range(len(records))]
    dataset.fast_pixels = None
    without = [dataset[i] for i in range(len(records))]
    for a, b in zip(with_table, without):
        assert torch.equal(a["image"], b["image"]) and a["image_size"] == b["image_size"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_anyres_datasets_never_use_the_table(tmp_path, official_dir, clip_processor):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "0", "conversations": [
        {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]))
    tokenizer = load_tokenizer(str(official_dir / "llava-v1.5-tiny"), model_max_length=2048, padding_side="right")
    processor = LlavaProcessor.for_training(tokenizer, clip_processor, "v1", image_aspect_ratio="anyres",
                                            image_grid_pinpoints=[[336, 672]])
    assert LazySupervisedDataset(str(data), processor).fast_pixels is None


def test_remembered_tokenization_equals_a_fresh_one(tmp_path, official_dir, monkeypatch):
    import llava.train.dataset as dataset_module

    questions = ["What is it?", "Where is it?", "What is it?", "How many?", "What is it?"]
    records = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": f"Answer {i % 2}."}]}
               for i, q in enumerate(questions)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    tokenizer = load_tokenizer(str(official_dir / "llava-v1.5-tiny"), model_max_length=2048, padding_side="right")
    processor = LlavaProcessor.for_training(tokenizer, None, "v1")
    monkeypatch.setattr(dataset_module, "TOKENIZATION_MEMO", 2)
    remembering = LazySupervisedDataset(str(data), processor)
    first = [remembering.tokenize(i) for i in range(len(records))]
    first[0].input_ids.append(-5)  # a caller's change to its copy is not remembered
    again = [remembering.tokenize(i) for i in range(len(records))]
    assert len(remembering._tokenized) == 2  # bounded
    for index in range(len(records)):
        fresh = LazySupervisedDataset(str(data), processor).tokenize(index)
        assert again[index].input_ids == fresh.input_ids and again[index].labels == fresh.labels
        assert again[index].prompt == fresh.prompt
    assert again[0].input_ids != again[1].input_ids  # the key tells conversations apart
