"""``llava.convert``'s outputs and destinations, and the compression saved in a transformers checkpoint.

- The destination guard (``llava.output_folder``): never into the input, never over another artifact,
  never beside a live lock, nothing half-written on a failure; a rerun replaces its own earlier output.
- Sources are recognised before anything else is read: a CLIP folder or a llava-hf folder given to
  ``to-hf`` is named for what it is (not a projector-type error).
- A ``to-hf`` folder is a usable llava-hf folder through transformers' stock ``AutoProcessor``: the chat
  template writes the original's prompt, the pixels are the original's, BOS is added, and on identical
  ids both formats answer with the same greedy tokens. The stock tokenizer writes one piece fewer after
  each ``<image>`` (docs/models.md, "Converting"): the test pins exactly that difference.
- ``visionzip.hf.from_pretrained`` applies the compression a checkpoint saved; a stock ``from_pretrained``
  model with a saved compression is refused by ``compression_aware_processor`` (not run uncompressed).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import visionzip
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.convert import core as convert_core
from llava.convert import to_hf, to_llava
from llava.convert.__main__ import main as convert_main
from llava.model.builder import load_pretrained_model
from llava.output_folder import MARKER
from llava.processor import LlavaProcessor
from visionzip.hf import compression_aware_processor

HF_CLASSES = {"llava-v1.5-tiny": LlavaForConditionalGeneration, "llava-v1.6-tiny": LlavaNextForConditionalGeneration}


def tree_digest(folder) -> str:
    """A hash of every file's relative path and bytes under ``folder``."""
    digest = hashlib.sha256()
    for root, _dirs, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def converted(official_checkpoints):
    root = official_checkpoints
    for name in HF_CLASSES:
        to_hf(str(root / name), str(root / f"hf-{name}"))
    return root


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))


# ----- destinations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["to-hf", "to-llava"])
def test_a_conversion_never_writes_into_its_input(command, converted):
    src = converted / ("llava-v1.5-tiny" if command == "to-hf" else "hf-llava-v1.5-tiny")
    before = tree_digest(src)
    for dst in (src, src / "inside"):
        with pytest.raises(ValueError, match="overwrite what is being read"):
            convert_main([command, str(src), str(dst)])
    assert tree_digest(src) == before
    assert not (src / "inside").exists()


def test_projector_only_output_never_lands_on_a_full_model(converted, tmp_path):
    full = tmp_path / "full"
    to_llava(str(converted / "hf-llava-v1.5-tiny"), str(full))
    before = tree_digest(full)
    with pytest.raises(ValueError, match="not empty and was not written by this command"):
        to_llava(str(converted / "hf-llava-v1.5-tiny"), str(full), projector_only=True)
    assert tree_digest(full) == before


def test_unrelated_folders_are_refused_and_own_outputs_replaced(converted, tmp_path):
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        to_hf(str(converted / "llava-v1.5-tiny"), str(unrelated))
    assert (unrelated / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in unrelated.iterdir()) == ["notes.txt"]

    again = tmp_path / "again"
    to_hf(str(converted / "llava-v1.5-tiny"), str(again))
    (again / "stale.bin").write_bytes(b"from an earlier run")  # replaced with the folder: written by us
    to_hf(str(converted / "llava-v1.5-tiny"), str(again))
    assert not (again / "stale.bin").exists()
    assert json.loads((again / MARKER).read_text())["command"] == "llava.convert to-hf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine"]  # no lock, no staging left


def test_a_live_lock_refuses_and_a_failure_leaves_nothing(converted, tmp_path, monkeypatch):
    dst = tmp_path / "locked"
    lock = tmp_path / ".locked.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(FileExistsError, match="in use by another process"):
        to_hf(str(converted / "llava-v1.5-tiny"), str(dst))
    lock.unlink()
    assert not dst.exists()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_core, "save_torch_state_dict", full_disk)
    with pytest.raises(OSError, match="No space left"):
        to_hf(str(converted / "llava-v1.5-tiny"), str(dst))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sources_are_named_for_what_they_are(converted, tmp_path):
    with pytest.raises(ValueError, match="is a vision tower, not a LLaVA checkpoint"):
        to_hf(str(converted / "clip-vit-tiny-336"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="already a llava-hf folder"):
        to_hf(str(converted / "hf-llava-v1.5-tiny"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="use to-hf"):
        to_llava(str(converted / "llava-v1.5-tiny"), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="has no config.json"):
        to_hf(str(tmp_path), str(tmp_path / "d"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----- a usable llava-hf folder ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(HF_CLASSES))
def test_stock_autoprocessor_answers_as_the_original_on_identical_ids(name, converted, image):
    tokenizer, model, image_processor, _ = load_pretrained_model(str(converted / name), None, None, device="cpu")
    ours = LlavaProcessor.from_model(model, tokenizer, image_processor)(["What is it?"], [image])
    processor = AutoProcessor.from_pretrained(str(converted / f"hf-{name}"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ours.prompts[0]
    stock = processor(text=prompt, images=image, return_tensors="pt")
    ours_pixels = ours.images if torch.is_tensor(ours.images) else ours.images[0]
    assert torch.equal(ours_pixels.reshape(stock.pixel_values.shape), stock.pixel_values)

    ids = stock.input_ids[0]
    assert ids[0] == tokenizer.bos_token_id
    is_image = ids == processor.image_token_id
    first, count = int(is_image.nonzero()[0]), int(is_image.sum())
    assert bool(is_image[first : first + count].all())
    # the same text around one image placeholder, in the original's notation
    stock_as_original = torch.cat([ids[:first], torch.tensor([IMAGE_TOKEN_INDEX]), ids[first + count :]])
    # the one documented difference: the original tokenizes the text after <image> as new text, with its
    # leading "▁" piece; the stock processor continues after a special token, without it
    prefix = tokenizer.convert_tokens_to_ids("▁")
    expected = torch.cat([stock_as_original[: first + 1], torch.tensor([prefix]), stock_as_original[first + 1 :]])
    assert torch.equal(ours.input_ids[0], expected)

    hf_model = HF_CLASSES[name].from_pretrained(str(converted / f"hf-{name}")).eval()
    hf_tokens = hf_model.generate(**stock, max_new_tokens=6, do_sample=False)[0, ids.shape[0] :]
    ours_tokens = model.generate(
        input_ids=stock_as_original[None], attention_mask=torch.ones(1, len(stock_as_original), dtype=torch.long),
        images=ours.images, image_sizes=ours.image_sizes, max_new_tokens=6, do_sample=False,
    )[0]
    assert hf_tokens.tolist() == ours_tokens.tolist()


@pytest.mark.parametrize("model_type,mode", [("llava_llama", "vicuna_v1"), ("llava_mistral", "mistral_instruct")])
def test_chat_template_writes_the_conversation_template(model_type, mode):
    template = jinja2.Environment().from_string(convert_core.chat_template_for({"model_type": model_type}))
    conversation = conv_templates[mode].copy()
    conversation.append_message("USER", "<image>\nWhat is it?")
    conversation.append_message("ASSISTANT", "A cat.")
    conversation.append_message("USER", "Its colour?")
    conversation.append_message("ASSISTANT", None)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "Its colour?"}]},
    ]
    assert template.render(messages=messages, add_generation_prompt=True) == conversation.get_prompt()


# ----- the compression saved in a transformers checkpoint ----------------------------------------------------
def test_saved_compression_is_applied_on_reload_or_refused(converted, image, tmp_path):
    folder = converted / "hf-llava-v1.5-tiny"
    model = LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()
    visionzip.apply_compression(model, "visionzip:dominant=20,contextual=4")
    model.save_pretrained(str(tmp_path / "saved"))
    processor = AutoProcessor.from_pretrained(str(folder))
    inputs = compression_aware_processor(processor, model)(text="USER: <image>\nWhat? ASSISTANT:", images=image,
                                                           return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    reloaded = visionzip.hf.from_pretrained(str(tmp_path / "saved")).eval()
    assert visionzip.hf.current_compression(reloaded).spec() == visionzip.hf.current_compression(model).spec()
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=4, do_sample=False), expected)

    stock = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="not applied to this instance"):
        compression_aware_processor(processor, stock)
    visionzip.apply_compression(stock, "none")  # an explicit choice to run it uncompressed
    assert compression_aware_processor(processor, stock) is processor


def test_to_hf_of_a_compressed_checkpoint_reloads_compressed(converted, tmp_path):
    src = tmp_path / "compressed"
    src.mkdir()
    for item in (converted / "llava-v1.5-tiny").iterdir():
        if item.name != "config.json":
            os.symlink(item, src / item.name)
    config = json.loads((converted / "llava-v1.5-tiny" / "config.json").read_text())
    config["visual_compression"] = visionzip.CompressionConfig.parse("visionzip:dominant=20,contextual=4").to_dict()
    (src / "config.json").write_text(json.dumps(config))
    to_hf(str(src), str(tmp_path / "hf"))
    model = visionzip.hf.from_pretrained(str(tmp_path / "hf"))
    applied = visionzip.hf.current_compression(model)
    assert applied.method == "visionzip" and applied.settings.to_dict() == {"dominant": 20, "contextual": 4}
