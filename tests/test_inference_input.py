"""Bad input to inference, refused by name and before any model loads where possible: image files and
modes, generation options, devices, budgets at and beyond the edges, prompts that do not fit the model.

Defects found by hostile-input testing (issue 13), each reproduced as a test that failed before its fix.
Models are the tiny builds of ``llava.model.tiny``.
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

from llava.model.tiny import build_tiny_llava


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny") / "tiny15"))


# ------------------------------------------------------------------ 16-bit and other unusual images


def test_sixteen_bit_greyscale_keeps_its_brightness(tmp_path):
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


def test_float_images_are_refused_with_the_mode_named(tmp_path):
    from llava.mm_utils import ImageLoadError, load_image

    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(ImageLoadError, match="mode 'F'"):
        load_image(str(path))


# ------------------------------------------------------------- edge budgets (dominant = 1 drops CLS)


@pytest.fixture(scope="module")
def tower(tiny):
    from transformers import CLIPVisionModel

    from llava.model.tiny import TOWER_DIR

    return CLIPVisionModel.from_pretrained(os.path.join(tiny, TOWER_DIR)).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))


def test_visionzip_with_one_dominant_token_keeps_cls(tower, pixels):
    from visionzip.methods.visionzip import zip_vision_tokens

    out = zip_vision_tokens(tower, pixels, 1, 10)  # 10 tokens and empty keep_indices before
    assert out.keep_indices.tolist() == [[0]]
    assert out.tokens.shape == (1, 11, tower.config.hidden_size) and torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("dominant", [1, 2, 288, 576, 577])
def test_visionzip_dominant_selection_at_the_edges(dominant):
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
def test_vispruner_selection_at_the_edges(tokens, ratio):
    from visionzip.methods.vispruner import vispruner_keep_indices

    generator = torch.Generator().manual_seed(tokens)
    scores, features = torch.rand(2, 576, generator=generator), torch.randn(2, 576, 8, generator=generator)
    keep = vispruner_keep_indices(scores, features, tokens, ratio)
    assert keep.shape == (2, tokens)
    for row, score in zip(keep, scores):
        assert len(set(row.tolist())) == tokens and 0 <= int(row.min()) and int(row.max()) < 576
        important = int(tokens * ratio)
        assert set(row[:important].tolist()) == set(score.topk(important).indices.tolist())


def test_budgets_beyond_the_edges_are_named_errors(tower, pixels):
    from visionzip.methods.visionzip import zip_vision_tokens
    from visionzip.methods.vispruner import vispruner_select

    with pytest.raises(ValueError, match="dominant"):
        zip_vision_tokens(tower, pixels, 0, 10)
    with pytest.raises(ValueError, match="exceeds the 577 tokens"):
        zip_vision_tokens(tower, pixels, 568, 10)
    with pytest.raises(ValueError, match="exceeds the 576 patch tokens"):
        vispruner_select(tower, pixels, 577)


# ---------------------------------------------------------------------- context overflow in chat


@pytest.fixture(scope="module")
def chat_model(tiny):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(tiny, None, None, device="cpu", compression="visionzip:54,10")
    return tokenizer, model, processor


def test_chat_never_cuts_silently_and_the_cache_stays_within_the_positions(chat_model):
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


# ---------------------------------------------------------------------- fail-late inference


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
def test_bad_generation_options_are_refused_before_loading(tmp_path, never_load, extra, message):
    from llava.eval.run_llava import main

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(ValueError, match=message):
        main(["--model-path", "m", "--image-file", str(image), "--query", "q", "--device", "cpu", *extra])


def test_device_and_image_are_checked_before_loading(tmp_path, never_load, monkeypatch):
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


def test_an_image_path_with_a_comma_is_one_image(tmp_path, never_load):
    from llava.eval.run_llava import main
    from llava.preflight import split_image_files

    image = tmp_path / "photo, 2024.png"
    Image.new("RGB", (8, 8)).save(image)
    assert split_image_files(str(image), ",") == [str(image)]
    assert split_image_files("a.png,b.png", ",") == ["a.png", "b.png"]
    with pytest.raises(never_load):  # the image loaded; the next step would be the model
        main(["--model-path", "m", "--image-file", str(image), "--query", "q", "--device", "cpu"])


def test_load_image_fetches_urls_with_a_timeout(monkeypatch):
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
def test_bad_pixels_are_named(pixels, message):
    from llava.preflight import check_pixel_values

    with pytest.raises(ValueError, match=message):
        check_pixel_values(pixels)
    check_pixel_values(torch.zeros(1, 3, 4, 4).uniform_(-2, 2))


def test_run_llava_refuses_a_prompt_that_does_not_fit(tiny, tmp_path):
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
