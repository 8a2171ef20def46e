"""Issue 22, item 2: one prompt-length policy (``llava.preflight.check_prompts_fit``) for every entry point.

A prompt whose positions (visual tokens included) do not fit the model's is never cut silently (the
original LLaVA cut its question and ``ASSISTANT:`` away and answered anyway): ``model.generate`` refuses
it by name (``PromptTooLong``), the eval engine stops naming the question or, with ``--prompt-too-long
refuse``, writes it empty, counted and reported; the lmms-eval plugin does the same
(``answer_with_refusals``); ``--prompt-too-long truncate`` / ``generate(prompt_too_long="truncate")``
reproduce the original's cut, marked and counted. The limit is lowered in a copy of the tiny checkpoint's config (576 visual
tokens + the template then pass it), which is the issue's tiny-NeXT case (2242 positions > 2048) at a
smaller size.
"""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from llava.eval.data_io import read_json, read_jsonl, settings_path_for, write_jsonl
from llava.lmms_eval_plugin.requests import answer_with_refusals
from llava.model.tiny import build_tiny_llava
from llava.preflight import PromptTooLong, check_prompts_fit

LIMIT = 680  # the short question fits (576 visual tokens + about 60 of template), the long one does not


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    tiny = build_tiny_llava(str(tmp_path_factory.mktemp("tiny") / "tiny15"))
    short = tmp_path_factory.mktemp("short") / "short-context"
    shutil.copytree(tiny, short)
    config = json.loads((short / "config.json").read_text())
    config["tokenizer_model_max_length"] = LIMIT
    (short / "config.json").write_text(json.dumps(config))
    return short


@pytest.fixture(scope="module")
def loaded(short_context):
    from llava.model.builder import load_pretrained_model
    from llava.processor import LlavaProcessor

    tokenizer, model, image_processor, _ = load_pretrained_model(str(short_context), None, device="cpu")
    return model.eval(), LlavaProcessor.from_model(model, tokenizer, image_processor, "vicuna_v1")


def test_policy_names_the_rows_lengths_and_limit():
    assert check_prompts_fit([10, 30], 100, 50) == 20  # the reply stops where the positions end
    assert check_prompts_fit([10], None, None) is None
    with pytest.raises(PromptTooLong, match=r"batch rows \[1\]\) takes 60 positions .* the model has 50") as err:
        check_prompts_fit([10, 60], 4, 50)
    assert err.value.rows == [1] and err.value.positions == [10, 60] and err.value.limit == 50


def test_model_generate_refuses_instead_of_cutting_the_question(loaded):
    model, processor = loaded
    image = Image.new("RGB", (40, 30), (0, 90, 200))
    short, long = "Is it red?", "Describe the colour of the picture in every detail. " * 20
    inputs = processor([short, long], [image, image])
    with pytest.raises(PromptTooLong, match=rf"batch rows \[1\]\) takes \d+ positions .* the model has {LIMIT}"):
        model.generate(**inputs.generate_kwargs(), max_new_tokens=2, pad_token_id=processor.pad_token_id)
    # the prompt that fits is answered, and its reply stops at the model's positions
    inputs = processor([short], [image])
    out = model.generate(**inputs.generate_kwargs(), max_new_tokens=500, suppress_tokens=[model.config.eos_token_id],
                         pad_token_id=processor.pad_token_id)
    positions = inputs.input_ids.shape[1] - 1 + 576
    assert out.shape[1] == LIMIT - positions
    # the original's cut, asked for explicitly (to reproduce its outputs): answered, with a warning
    inputs = processor([short, long], [image, image])
    cut = model.generate(**inputs.generate_kwargs(), max_new_tokens=2, pad_token_id=processor.pad_token_id,
                         prompt_too_long="truncate")
    assert cut.shape == (2, 2)
    # text-only prompts are counted too
    text = processor(["word " * 700], None)
    with pytest.raises(PromptTooLong, match=rf"the model has {LIMIT}"):
        model.generate(**text.generate_kwargs(), max_new_tokens=2, pad_token_id=processor.pad_token_id)


def test_compiled_generate_applies_the_same_policy(loaded):
    """``CompiledLlava.generate`` splices on its own path: it refuses the prompt that does not fit and caps
    the reply of the one that does, as ``model.generate`` (eager backend: the policy, not the compiler)."""
    from llava.model.compiled import CompiledLlava

    model, processor = loaded
    compiled = CompiledLlava(model, backend="eager")
    image = Image.new("RGB", (40, 30), (0, 90, 200))
    inputs = processor(["Is it red?", "Describe the colour of the picture in every detail. " * 20], [image, image])
    with pytest.raises(PromptTooLong, match=rf"batch rows \[1\]\) takes \d+ positions .* the model has {LIMIT}"):
        compiled.generate(**inputs.generate_kwargs(), max_new_tokens=2, pad_token_id=processor.pad_token_id)
    inputs = processor(["Is it red?"], [image])
    out = compiled.generate(**inputs.generate_kwargs(), max_new_tokens=500, min_new_tokens=500,
                            pad_token_id=processor.pad_token_id)
    assert out.shape[1] == LIMIT - (inputs.input_ids.shape[1] - 1 + 576)


def questions(tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    file = tmp_path / "q.jsonl"
    write_jsonl(file, [
        {"question_id": "short", "image": "red.png", "text": "Is it red?"},
        {"question_id": "long", "image": "red.png", "text": "Describe the colour in every detail. " * 20},
    ])
    return file


def test_eval_engine_refuses_or_counts_never_cuts(short_context, tmp_path):
    from llava.eval.generate import main

    file = questions(tmp_path)
    common = ["--format", "vqa", "--model-path", str(short_context), "--question-file", str(file),
              "--image-folder", str(tmp_path), "--device", "cpu", "--max_new_tokens", "2", "--batch-size", "2",
              "--no-progress"]
    answers = tmp_path / "error.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--answers-file", str(answers)])
    assert exit_info.value.code == 2
    record = read_json(settings_path_for(answers))
    assert record["status"] == "running" and record["num_answered"] == 0  # not marked complete

    answers = tmp_path / "refuse.jsonl"
    record = main(common + ["--answers-file", str(answers), "--prompt-too-long", "refuse"])
    written = {a["question_id"]: a for a in read_jsonl(answers)}
    assert written["long"]["text"] == "" and f"> the model's {LIMIT}" in written["long"]["refused"]
    assert "refused" not in written["short"]
    assert record["status"] == "complete" and record["num_refused"] == 1
    assert record["refused"][0]["question_id"] == "long" and record["prompt_too_long"] == "refuse"
    # a resumed or merged file cannot hide the policy: it is an answer-affecting setting
    with pytest.raises(SystemExit):
        main(common + ["--answers-file", str(answers)])

    # truncate: the original LLaVA's cut, to reproduce its answers; marked and counted
    answers = tmp_path / "truncate.jsonl"
    record = main(common + ["--answers-file", str(answers), "--prompt-too-long", "truncate"])
    written = {a["question_id"]: a for a in read_jsonl(answers)}
    assert f"> the model's {LIMIT}" in written["long"]["truncated"] and "truncated" not in written["short"]
    assert record["num_truncated"] == 1 and "num_refused" not in record


def test_plugin_policy_refuses_or_counts():
    def answer(contexts, images):
        lengths = [len(c) for c in contexts]
        check_prompts_fit(lengths, 4, 10)
        return [c.upper() for c in contexts], {"new_tokens": len(contexts)}

    with pytest.raises(ValueError, match=r"takes 12 positions .*prompt_too_long=refuse"):
        answer_with_refusals(answer, ["abc", "x" * 12, "de"], [[], [], []], "error")
    texts, metrics = answer_with_refusals(answer, ["abc", "x" * 12, "de"], [[], [], []], "refuse")
    assert texts == ["ABC", "", "DE"] and metrics == {"new_tokens": 2, "refused_prompts": 1}
    texts, metrics = answer_with_refusals(answer, ["y" * 11], [[]], "refuse")
    assert texts == [""] and metrics["refused_prompts"] == 1
