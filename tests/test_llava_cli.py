"""The command lines end to end on the tiny model, and the chat session's KV-cache reuse."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llava.eval.run_llava import main
from llava.model.builder import load_pretrained_model
from llava.model.tiny import build_tiny_llava
from llava.processor import place_images
from llava.serve.chat import ChatSession

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {version: build_tiny_llava(str(root / version), version=version) for version in ("v1.5", "v1.6")}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "noise.png"
    Image.fromarray((np.random.default_rng(4).random((280, 420, 3)) * 255).astype("uint8")).save(path)
    return str(path)


def run_module(module: str, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True, cwd=REPO, env=env,
        timeout=300,
    )


def test_run_llava_end_to_end(tiny, image_file):
    common = ["--image-file", image_file, "--query", "What is this?", "--device", "cpu",
              "--temperature", "0", "--max_new_tokens", "6"]
    zipped = run_module("llava.eval.run_llava", ["--model-path", tiny["v1.5"], *common, "--visionzip", "54,10"])
    pruned = run_module("llava.eval.run_llava", ["--model-path", tiny["v1.6"], *common, "--compression", "vispruner:32"])
    for result in (zipped, pruned):
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip()


def test_run_llava_in_process(tiny, image_file, capsys):
    common = ["--model-path", tiny["v1.5"], "--image-file", f"{image_file},{image_file}", "--device", "cpu",
              "--temperature", "0", "--max_new_tokens", "4"]
    assert main([*common, "--query", "Compare <image-placeholder> with <image-placeholder>."]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(ValueError, match="exceeds the 577 tokens"):
        main([*common, "--query", "What?", "--visionzip", "570,10"])


def test_build_query_places_images():
    assert place_images("Q?", "<image>", 1) == "<image>\nQ?"
    assert place_images("A <image-placeholder> B", "<im_start><image><im_end>", 1) == "A <im_start><image><im_end> B"
    with pytest.raises(ValueError, match="1 <image-placeholder> but 2 images"):
        place_images("A <image-placeholder>", "<image>", 2)


def test_serve_cli_multi_turn_keeps_the_image_in_the_cache(tiny, image_file):
    result = run_module(
        "llava.serve.cli",
        ["--model-path", tiny["v1.6"], "--image-file", image_file, "--device", "cpu", "--temperature", "0",
         "--max-new-tokens", "5", "--visionzip", "27,5", "--debug"],
        stdin="What is in the picture?\nAnd what color is it?\n",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("ASSISTANT: ") == 2
    turns = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert len(turns) == 2
    first, second = turns
    assert first["image_encodes"] == second["image_encodes"] == 1
    assert not first["reused_cache"] and second["reused_cache"]
    # turn 2 reads only its new text; the visual tokens (3 views x 32 here) stay in the cache
    assert second["prefill_tokens"] < 20 < 96 < first["prefill_tokens"]
    assert second["cached_tokens"] > first["cached_tokens"] + second["prefill_tokens"]


def test_chat_session_cache_equals_recomputing_the_conversation(tiny, image_file):
    """What turn 2 generates from the cache equals greedy decoding over the whole conversation read
    afresh (the same token ids: prompt 1, reply 1, stop, the new turn)."""
    tokenizer, model, processor, _ = load_pretrained_model(tiny["v1.5"], None, None, device="cpu")
    model.set_visual_compression("visionzip:54,10")
    session = ChatSession(model, tokenizer, processor)
    session.set_image(Image.open(image_file).convert("RGB"))
    session.ask("What is in the picture?", max_new_tokens=6)
    before_turn_2 = list(session.cached_ids)
    session.ask("Tell me more.", max_new_tokens=6)
    assert session.turns[1].reused_cache and session.image_encodes == 1

    new_prompt = session.cached_ids[len(before_turn_2) : len(before_turn_2) + session.turns[1].prefill_tokens]
    ids = before_turn_2 + new_prompt
    embeds, _ = session._embed(ids)
    expected = []
    with torch.no_grad():
        for _ in range(session.turns[1].generated_tokens):
            token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
            expected.append(token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    generated = session.cached_ids[len(ids) : len(ids) + len(expected)]
    assert generated == expected


def test_chat_session_compiled_image_path_replies_equal_eager(tiny, image_file):
    """--compile (aot_eager here): the chat encodes its image through the runner's captured image path (one
    graph: tower, VisionZip, projector) and replies as the eager chat does, turn by turn."""
    from llava.model.compiled import CompiledLlava

    tokenizer, model, processor, _ = load_pretrained_model(tiny["v1.5"], None, None, device="cpu")
    model.set_visual_compression("visionzip:54,10")
    image = Image.open(image_file).convert("RGB")
    compiled = CompiledLlava(model, backend="aot_eager")
    replies, features = {}, {}
    for name, runner in (("eager", None), ("compiled", compiled)):
        chat = ChatSession(model, tokenizer, processor, compiled=runner, max_cache_len=1024)
        chat.set_image(image)
        features[name] = chat.image_features
        replies[name] = [chat.ask(q, max_new_tokens=5) for q in ("What is in the picture?", "Tell me more.")]
    assert compiled.captured_image_paths == 1 and compiled.eager_image_paths == {}
    assert len(features["compiled"]) == 1 and features["compiled"][0].shape[0] == 64
    assert torch.equal(features["compiled"][0], features["eager"][0])  # aot_eager: the same kernels, traced
    assert replies["compiled"] == replies["eager"]
