"""The front-ends on the natively implemented families (``llava.model.builder.NATIVE_FAMILIES``: CogVLM,
Qwen-VL), through the model's own processor (``model.build_processor``, ``llava.eval.model_processor``): the
eval engine (``llava.eval.generate`` / ``model_vqa_loader``, batched with the eval scripts' flags, resumed,
on a mini benchmark), ``scripts/cogvlm/eval``'s wrappers and the chat CLI, on tiny checkpoints in the hubs'
layouts. Every answer equals the model's own one-by-one ``generate`` on its processor's inputs. (The scripts
end to end, bash and all, cost 20 s of subprocesses: run by hand, ``docs/cogvlm.md``.)"""
from __future__ import annotations

import builtins
import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from llava.eval import generate
from llava.eval.data_io import read_json, read_jsonl, settings_path_for
from llava.eval.formats import ReaderOptions, get_format, read_items
from llava.eval.merge_answers import merge_answers
from llava.eval.mini_benchmark import build_mini_benchmark
from llava.eval.model_processor import builds_own_inputs, processor_for, resolve_conv_mode
from llava.mm_utils import load_image
from llava.model.builder import load_pretrained_model
from llava.model.cogvlm import CogVLMProcessor
from llava.model.cogvlm.tiny import build_tiny_cogvlm
from llava.model.qwen_vl.processor import QwenVLProcessor
from llava.model.qwen_vl.tiny import build_tiny_qwen_vl
from llava.processor import LlavaProcessor

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 5
GQA_QUESTIONS = ("gqa", "llava_gqa_testdev_balanced.jsonl")
GQA_IMAGES = ("gqa", "data", "images")


class Family:
    def __init__(self, build, processor_class, default_conv_mode, script_conv_mode, chat_spec, chat_visual_tokens,
                 budget_family):
        self.build = build  # (folder) -> tiny checkpoint
        self.processor_class = processor_class
        self.default_conv_mode = default_conv_mode  # what the front-ends run without --conv-mode
        self.script_conv_mode = script_conv_mode  # a --conv-mode the eval scripts would pass
        self.chat_spec = chat_spec
        self.chat_visual_tokens = chat_visual_tokens  # positions one image takes in the LLM under chat_spec
        self.budget_family = budget_family  # the MODEL_FAMILY its eval scripts set (visionzip.budgets)


FAMILIES = {
    # CogVLM: the checkpoint's template_version, a LLaVA template passed by _common.sh is ignored; the image
    # is boi + kept tokens + eoi
    "cogvlm": Family(build_tiny_cogvlm, CogVLMProcessor, None, "vicuna_v1", "visionzip:64", 64 + 2, "cogvlm"),
    # Qwen-VL: the checkpoint's chat format (chatml); <img> and </img> are text ids around the kept queries
    "qwen_vl": Family(build_tiny_qwen_vl, QwenVLProcessor, "qwen_chatml", "qwen_chatml", "vispruner:64", 64, "qwen-vl"),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Torch on one thread: on a busy 2-core machine its threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> tuple[str, Family]:
    return request.param, FAMILIES[request.param]


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory) -> str:
    name, spec = family
    return spec.build(str(tmp_path_factory.mktemp(name) / f"{name}-tiny"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    tokenizer, model, image_processor, _ = load_pretrained_model(checkpoint, None, None, device="cpu")
    return tokenizer, model, image_processor


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return build_mini_benchmark(tmp_path_factory.mktemp("eval"), ["gqa", "sqa"])


def one_by_one(loaded, spec: str, questions: list[str], images: list, max_new: int = MAX_NEW) -> list[str]:
    """The model's own answers, one question at a time, greedy, ``max_new`` tokens, with compression ``spec``."""
    tokenizer, model, image_processor = loaded
    processor = model.build_processor(tokenizer, image_processor)
    model.set_visual_compression(spec)
    try:
        out = []
        for question, image in zip(questions, images):
            inputs = processor([question], None if image is None else [image])
            with torch.no_grad():
                ids = model.generate(**inputs.generate_kwargs(), do_sample=False, temperature=None, top_p=None,
                                     num_beams=1, max_new_tokens=max_new, pad_token_id=processor.pad_token_id)
            out.append(tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
        return out
    finally:
        model.set_visual_compression(None)


def expected_answers(loaded, spec: str, fmt: str, question_file: Path, image_folder: Path, **options) -> dict:
    items = read_items(get_format(fmt), question_file, ReaderOptions(str(image_folder), **options))
    answers = one_by_one(loaded, spec, [item.question for item in items],
                         [item.load_image() if item.has_image else None for item in items])
    return {str(item.question_id): answer for item, answer in zip(items, answers)}


def answers_by_id(path: Path) -> dict:
    return {str(record["question_id"]): record["text"] for record in read_jsonl(path)}


def test_the_processor_hook_is_chosen_by_capability(family, loaded):
    _, spec = family
    tokenizer, model, image_processor = loaded
    assert builds_own_inputs(model)
    processor, conv_mode = processor_for(model, tokenizer, image_processor)
    assert isinstance(processor, spec.processor_class)
    assert conv_mode == resolve_conv_mode(model) == spec.default_conv_mode


def test_eval_engine_answers_batched_with_the_eval_scripts_flags(family, checkpoint, loaded, mini, tmp_path):
    _, spec = family
    questions, images = mini.joinpath(*GQA_QUESTIONS), mini.joinpath(*GQA_IMAGES)
    shard = tmp_path / "answers" / "1_0.jsonl"
    # what an eval script runs (scripts/v1_5/eval/_common.sh's generate_answers: `python -m llava.eval.generate`,
    # as `model_vqa_loader` does; scripts/cogvlm/eval/gqa.sh vispruner 64), with a short reply
    record = generate.main([
        "--format", "vqa", "--model-path", checkpoint, "--question-file", str(questions), "--image-folder", str(images),
        "--answers-file", str(shard), "--num-chunks", "1", "--chunk-idx", "0", "--method", "vispruner",
        "--budget", "64", "--budget-family", spec.budget_family, "--batch-size", "2", "--device", "cpu", "--dtype", "auto",
        "--temperature", "0", "--conv-mode", spec.script_conv_mode, "--max_new_tokens", str(MAX_NEW), "--no-progress",
    ])
    merged = tmp_path / "answers" / "merge.jsonl"
    merge_answers([shard], merged)
    expected = expected_answers(loaded, "vispruner:64", "vqa", questions, images)
    assert answers_by_id(merged) == expected and len(expected) == 3
    assert any(expected.values())  # the tiny model's words are gibberish, but it says something
    settings = read_json(settings_path_for(merged))
    assert settings["status"] == "complete" and record["num_answered"] == 3
    assert settings["compression_per_view"] == "vispruner:tokens=64,important_ratio=0.5"
    assert settings["visual_tokens"] == 64 and settings["dtype"] == "float32"


def test_eval_engine_science_format_with_a_text_only_question_and_resume(family, checkpoint, loaded, mini, tmp_path,
                                                                        capsys):
    _, spec = family
    questions, images = mini / "scienceqa" / "llava_test_CQM-A.json", mini / "scienceqa" / "images" / "test"
    answers = tmp_path / "sqa.jsonl"
    argv = ["--format", "science", "--model-path", checkpoint, "--question-file", str(questions),
            "--image-folder", str(images), "--answers-file", str(answers), "--single-pred-prompt",
            "--compression", "none", "--batch-size", "2", "--max_new_tokens", str(MAX_NEW), "--device", "cpu",
            "--no-progress"]
    record = generate.main(argv)
    expected = expected_answers(loaded, "none", "science", questions, images, single_pred_prompt=True)
    got = answers_by_id(answers)
    assert got == expected and len(got) == 3
    assert record["conv_mode"] == spec.default_conv_mode  # the checkpoint's own template, found on loading
    # run again: nothing to answer, the model is not loaded, and the record (template included) still matches
    again = generate.main(argv)
    assert again["status"] == "complete" and again["conv_mode"] == spec.default_conv_mode
    assert "already answered" in capsys.readouterr().out
    assert answers_by_id(answers) == got


def test_llava_only_options_are_refused_by_name(family, checkpoint, mini, tmp_path):
    common = ["--format", "vqa", "--model-path", checkpoint, "--question-file", str(mini.joinpath(*GQA_QUESTIONS)),
              "--image-folder", str(mini.joinpath(*GQA_IMAGES)), "--device", "cpu", "--no-progress"]
    with pytest.raises(ValueError, match="--prompt-too-long truncate .*builds its own inputs"):
        generate.main([*common, "--answers-file", str(tmp_path / "a.jsonl"), "--prompt-too-long", "truncate"])
    with pytest.raises(ValueError, match="--compile .*run it without --compile"):
        generate.main([*common, "--answers-file", str(tmp_path / "b.jsonl"), "--compile"])
    assert not (tmp_path / "a.jsonl").exists() or not read_jsonl(tmp_path / "a.jsonl")


def test_chat_cli_answers_each_message_through_the_model_processor(family, checkpoint, loaded, mini, monkeypatch):
    from llava.serve import cli

    _, spec = family
    image_file = sorted(mini.joinpath(*GQA_IMAGES).iterdir())[0]
    messages = ["What is in the picture?", "And what color is it?"]
    feed = iter(messages)

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli.main(["--model-path", checkpoint, "--image-file", str(image_file), "--device", "cpu",
                         "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--compression", spec.chat_spec,
                         "--debug"]) == 0
    replies = [line.split("ASSISTANT: ", 1)[1] for line in out.getvalue().splitlines() if "ASSISTANT: " in line]
    image = load_image(str(image_file))
    assert replies == one_by_one(loaded, spec.chat_spec, messages, [image, image])
    stats = [json.loads(line) for line in err.getvalue().splitlines() if line.startswith("{")]
    tokenizer, model, image_processor = loaded
    processor = model.build_processor(tokenizer, image_processor)
    # the prompt's text ids + the image's positions in the LLM under the compression, one by one
    text_ids = [int((processor([m], [image]).input_ids >= 0).sum()) for m in messages]
    assert [s["prefill_tokens"] for s in stats] == [n + spec.chat_visual_tokens for n in text_ids]
    assert [s["reused_cache"] for s in stats] == [False, False]
    with pytest.raises(ValueError, match="--compile"):
        cli.main(["--model-path", checkpoint, "--image-file", str(image_file), "--device", "cpu", "--compile"])


def test_every_cogvlm_script_runs_a_v1_5_script_that_exists():
    scripts = sorted((REPO / "scripts" / "cogvlm" / "eval").glob("*.sh"))
    assert {s.name for s in scripts} >= {"all.sh", "gqa.sh", "sqa.sh", "textvqa.sh", "vizwiz.sh", "vqav2.sh"}
    for script in scripts:
        text = script.read_text(encoding="utf-8")
        target = re.search(r'exec bash "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)/([^"]+)"', text)
        assert target, script
        assert (script.parent / target.group(1)).resolve().is_file(), (script, target.group(1))
        assert "MODEL_FAMILY=cogvlm" in text and "THUDM/cogvlm-chat-hf" in text
    # all.sh's default benchmarks: VisPruner's Table 4 rows, each one a script of scripts/v1_5/eval
    listed = re.search(r"BENCHMARKS:-([a-z0-9 ]+)\}", (REPO / "scripts/cogvlm/eval/all.sh").read_text()).group(1).split()
    assert sorted(listed) == ["gqa", "sqa", "textvqa", "vizwiz", "vqav2"]
    assert all((REPO / "scripts" / "v1_5" / "eval" / f"{name}.sh").is_file() for name in listed)


def test_a_llava_checkpoint_still_gets_llava_processor_and_its_templates(tmp_path_factory):
    from llava.model.tiny import build_tiny_llava

    path = build_tiny_llava(str(tmp_path_factory.mktemp("llava") / "tiny"), version="v1.5")
    tokenizer, model, image_processor, _ = load_pretrained_model(path, None, None, device="cpu")
    assert not builds_own_inputs(model)
    processor, conv_mode = processor_for(model, tokenizer, image_processor)
    assert isinstance(processor, LlavaProcessor) and conv_mode == "vicuna_v1"
    with pytest.raises(ValueError, match="unknown --conv-mode 'nosuch'"):
        processor_for(model, tokenizer, image_processor, "nosuch")


def test_a_model_that_measures_the_whole_batch_has_its_too_long_question_found_one_by_one():
    """A model's generate may refuse a batch by its padded width (one length, row 0): the engine then asks its
    questions one at a time, so that the short one is answered and only the long one refused."""
    from llava.eval.formats import EvalItem
    from llava.preflight import PromptTooLong

    def answer(batch, prompt_too_long="error"):
        width = max(len(item.question) for item in batch)
        if width > 10:
            raise PromptTooLong(f"the prompt takes {width} positions", [0], [width], 10)
        return [(item.question.upper(), 1) for item in batch]

    answerer = object.__new__(generate.LlavaAnswerer)  # the batching policy only, no model
    answerer.answer, answerer.prompt_too_long = answer, "refuse"
    batch = [EvalItem(str(i), i, question, question) for i, question in enumerate(["short", "a long question"])]
    assert answerer(batch) == [("SHORT", 1), ("", 0, {"refused": "prompt too long: 15 positions (visual tokens "
                                                             "included) > the model's 10"})]
    answerer.prompt_too_long = "error"
    with pytest.raises(ValueError, match=r"question\(s\) \[1\]"):
        answerer(batch)


def test_the_lmms_plugin_finds_the_too_long_request_of_a_batch_measured_as_a_whole():
    from llava.lmms_eval_plugin.requests import answer_with_refusals
    from llava.preflight import PromptTooLong

    def answer(contexts, images):
        width = max(len(c) for c in contexts)
        if width > 10:
            raise PromptTooLong(f"the prompt takes {width} positions", [0], [width], 10)
        return [c.upper() for c in contexts], {"new_tokens": len(contexts), "visual_tokens_per_view": 7}

    texts, metrics = answer_with_refusals(answer, ["ab", "x" * 12, "cd"], [[], [], []], "refuse")
    assert texts == ["AB", "", "CD"]
    assert metrics == {"new_tokens": 2, "refused_prompts": 1, "visual_tokens_per_view": 7}
    with pytest.raises(ValueError, match="takes 12 positions"):
        answer_with_refusals(answer, ["ab", "x" * 12], [[], []], "error")
