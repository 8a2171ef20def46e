"""The lmms-eval plugin (llava.lmms_eval_plugin): lmms-eval's own CLI, in its own environment (.venv-lmms,
made by scripts/setup_lmms_env.sh, which scripts/test.sh runs), evaluates a local offline task
(tests/data/lmms_task: five questions on images drawn in code) with tiny models through
``--model visionzip_llava`` and ``--model visionzip_hf``, batched; the answers equal this environment's own
one-by-one generation with the same compression, and the results carry the compression spec, budget and
the visual tokens the language model received. Plus the plugin's argument and batching helpers."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from llava.lmms_eval_plugin import MODEL_CLASSES
from llava.lmms_eval_plugin.requests import (
    Prepared,
    check_model_args,
    compression_record,
    generation_settings,
    group_batches,
    parse_batch_size,
    parse_compression,
)

ROOT = Path(__file__).resolve().parents[1]
LMMS_VENV = Path(os.environ.get("LMMS_VENV", ROOT / ".venv-lmms"))
TASK_DIR = ROOT / "tests" / "data" / "lmms_task"
TASK = "visionzip_tiny_colors"
MAX_NEW_TOKENS = 4  # the task's generation_kwargs
STOP = "\n\n"


# ----- helpers (this environment) ------------------------------------------------------------------
def test_compression_argument_strips_quotes_and_refuses_bad_specs():
    assert parse_compression(None) is None
    assert parse_compression('"visionzip:dominant=54,contextual=10"').spec() == "visionzip:dominant=54,contextual=10"
    assert parse_compression("visionzip:64").tokens_per_image == 64
    assert not parse_compression("none").enabled
    with pytest.raises(ValueError, match="nosuchmethod"):
        parse_compression("nosuchmethod:64")
    with pytest.raises(ValueError, match="spec string"):
        parse_compression(64)


def test_compression_record_names_budget_and_settings():
    assert compression_record(parse_compression("visionzip:64")) == {
        "budget_tokens_per_view": 64, "compression_dominant": 54, "compression_contextual": 10,
    }
    assert compression_record(parse_compression("none")) == {}


def test_bad_model_args_and_batch_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match=r"\['compresion'\].*accepted: pretrained"):
        check_model_args("visionzip_hf", {"compresion": "visionzip:64"}, ("pretrained", "compression"))
    assert parse_batch_size("2") == 2
    for bad in ("auto", "0", "-1", "two"):
        with pytest.raises(ValueError, match="batch_size"):
            parse_batch_size(bad)


def test_generation_settings_and_stop_strings():
    settings = generation_settings({"until": ["\n\n", "USER:"], "max_new_tokens": 4, "temperature": 0}, 128)
    assert settings.generate_kwargs() == {
        "do_sample": False, "temperature": None, "top_p": None, "num_beams": 1, "max_new_tokens": 4,
    }
    assert settings.cut("red square\n\nmore USER: x") == "red square"
    assert settings.cut("blue USER: red\n\n") == "blue "
    assert generation_settings({"until": "."}, 16).cut("a. b") == "a"
    assert generation_settings(None, 16).max_new_tokens == 16
    with pytest.raises(ValueError, match="repetition_penalty"):
        generation_settings({"repetition_penalty": 1.1}, 16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation_settings({"max_new_tokens": 0}, 16)


def test_batches_group_settings_and_image_counts_in_order():
    greedy, sampled = {"max_new_tokens": 4}, {"max_new_tokens": 4, "temperature": 0.5}
    items = [
        Prepared(0, "a", ["img"], greedy), Prepared(1, "b", ["img"], sampled), Prepared(2, "c", ["img"], greedy),
        Prepared(3, "d", [], greedy), Prepared(4, "e", ["img"], greedy), Prepared(5, "f", ["img"], greedy),
    ]
    batches = [[item.index for item in batch] for batch in group_batches(items, 2)]
    assert batches == [[0, 2], [4, 5], [1], [3]]
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    with pytest.raises(ValueError, match="batch_size"):
        group_batches(items, 0)


def test_entry_point_is_declared_for_both_models():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert '"lmms_eval.models"' in setup and "llava.lmms_eval_plugin:manifests" in setup
    assert set(MODEL_CLASSES) == {"visionzip_llava", "visionzip_hf"}


# ----- lmms-eval end to end (.venv-lmms) -----------------------------------------------------------
@pytest.fixture(scope="module")
def lmms_python() -> Path:
    """The lmms-eval environment's python, with the plugin registered and refusing bad model_args by name
    before any model loads (lmms-eval's own registry and ``create_from_arg_string``)."""
    python = LMMS_VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(
            f"the lmms-eval environment {LMMS_VENV} is missing: run `bash scripts/setup_lmms_env.sh` "
            "(scripts/test.sh, the README's test command, does it before the tests)"
        )
    probe = """
import lmms_eval.models as models
for name in ("visionzip_llava", "visionzip_hf"):
    cls = models.get_model(name)
    print(name, cls.__module__ + "." + cls.__name__)
    for args in ("pretrained=/nowhere,compresion=visionzip:64", "pretrained=/nowhere,compression=nosuch:64"):
        try:
            cls.create_from_arg_string(args, {"batch_size": "2"})
        except ValueError as error:
            print("refused", name, error)
"""
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name, path in MODEL_CLASSES.items():
        assert f"{name} {path}" in lines, done.stdout
        refusals = [line for line in lines if line.startswith(f"refused {name} ")]
        assert len(refusals) == 2, done.stdout
        assert "['compresion']" in refusals[0] and "nosuch" in refusals[1]
    return python


def _env(tmp: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    if tmp is not None:
        env["HF_DATASETS_CACHE"] = str(tmp / "datasets-cache")
    return env


def run_lmms_eval(python: Path, model: str, model_args: str, tmp: Path) -> tuple[dict, list[dict]]:
    """lmms-eval's CLI on the local task with --batch_size 2 -> (results json, logged samples by doc_id)."""
    out = tmp / f"out-{model}"
    command = [
        str(python), "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", TASK,
        "--include_path", str(TASK_DIR), "--batch_size", "2", "--log_samples", "--output_path", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(tmp), cwd=tmp)
    log = (done.stdout + done.stderr)[-6000:]
    results_files = glob.glob(str(out / "*" / "*_results.json"))
    samples_files = glob.glob(str(out / "*" / f"*_samples_{TASK}.jsonl"))
    assert done.returncode == 0 and len(results_files) == 1 and len(samples_files) == 1, log
    results = json.loads(Path(results_files[0]).read_text(encoding="utf-8"))
    samples = [json.loads(line) for line in Path(samples_files[0]).read_text(encoding="utf-8").splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def task_docs() -> tuple[list[dict], object]:
    spec = importlib.util.spec_from_file_location("lmms_task_utils", TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = [json.loads(line) for line in (TASK_DIR / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    return docs, utils


def cut(text: str) -> str:
    return text.split(STOP)[0]


def check_results(results: dict, samples: list[dict], model: str, spec_arg: str, expected: list[str]) -> None:
    docs, _ = task_docs()
    assert results["n-samples"][TASK] == {"original": len(docs), "effective": len(docs)}
    assert 0.0 <= results["results"][TASK]["exact_match,none"] <= 1.0
    config = results["config"]
    assert config["model"] == model
    assert config["model_backend"] == f"{MODEL_CLASSES[model]} (simple)"
    assert spec_arg in config["model_args"]
    assert str(config["batch_size"]) == "2"
    # five requests in batches of at most two: 2, 2, 1
    assert results["throughput"]["avg_batch_size"] == pytest.approx(5 / 3)
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))
    assert [s["target"] for s in samples] == [d["answer"] for d in docs]
    answers = [s["filtered_resps"] for s in samples]
    answers = [a[0] if isinstance(a, list) else a for a in answers]
    assert answers == expected
    assert any(answers), answers  # the tiny model's words are gibberish, but it says something


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmms")


def test_lmms_eval_runs_visionzip_llava_batched(lmms_python, tmp):
    from llava.model.builder import load_pretrained_model
    from llava.model.tiny import build_tiny_llava
    from llava.processor import LlavaProcessor

    checkpoint = build_tiny_llava(str(tmp / "tiny-llava-v1.5"))
    results, samples = run_lmms_eval(lmms_python, "visionzip_llava", f"pretrained={checkpoint},compression=visionzip:64", tmp)

    # the same questions one by one in this environment, our stack with the same compression
    docs, utils = task_docs()
    tokenizer, model, image_processor, _ = load_pretrained_model(checkpoint, None, device="cpu", compression="visionzip:64")
    processor = LlavaProcessor.from_model(model, tokenizer, image_processor, "vicuna_v1")
    expected = []
    for doc in docs:
        inputs = processor([utils.doc_to_text(doc)], [utils.doc_to_visual(doc)])
        with torch.inference_mode():
            ids = model.generate(**inputs.generate_kwargs(), do_sample=False, num_beams=1,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=processor.pad_token_id)
        expected.append(cut(tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()))
    check_results(results, samples, "visionzip_llava", "compression=visionzip:64", expected)

    throughput = results["throughput"]
    assert throughput["avg_budget_tokens_per_view"] == 64
    assert (throughput["avg_compression_dominant"], throughput["avg_compression_contextual"]) == (54, 10)
    # measured at the projector: the language model got 64 of the tower's 576 tokens per image
    assert throughput["avg_visual_tokens_per_view"] == 64
    assert model.get_vision_tower().num_patches == 576


def test_lmms_eval_runs_visionzip_hf_batched(lmms_python, tmp):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import visionzip
    from visionzip.hf import compression_aware_processor
    from visionzip.hf.tiny import tiny_llava

    folder = tmp / "tiny-llava-hf"
    model, processor = tiny_llava()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    spec_arg = 'compression="visionzip:dominant=12,contextual=4"'
    results, samples = run_lmms_eval(lmms_python, "visionzip_hf", f"pretrained={folder},{spec_arg}", tmp)

    docs, utils = task_docs()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    visionzip.apply_compression(model, "visionzip:dominant=12,contextual=4")
    aware = compression_aware_processor(AutoProcessor.from_pretrained(folder), model)
    expected = []
    for doc in docs:
        prompt = f"USER: <image>\n{utils.doc_to_text(doc)} ASSISTANT:"
        inputs = aware(text=[prompt], images=utils.doc_to_visual(doc), return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 pad_token_id=aware.tokenizer.pad_token_id)
        new = ids[:, inputs["input_ids"].shape[1]:]
        expected.append(cut(aware.tokenizer.batch_decode(new, skip_special_tokens=True)[0].strip()))
    check_results(results, samples, "visionzip_hf", spec_arg, expected)

    throughput = results["throughput"]
    assert throughput["avg_budget_tokens_per_view"] == 16
    assert (throughput["avg_compression_dominant"], throughput["avg_compression_contextual"]) == (12, 4)
    # the placeholders the compression-aware processor wrote: 16 of the tower's 64 patch tokens per image
    assert throughput["avg_visual_tokens_per_image"] == 16
    assert (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 == 64
