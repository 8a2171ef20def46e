"""Every registered method end to end through the eval pipeline of ``pope.sh METHOD BUDGET`` on a tiny
LLaVA-1.5 (4 LLM layers, so that the in-LLM methods have layers to act at) and a generated mini POPE, then
the report table with one row per method.

The script itself (bash, its budget resolution, a generation shard per GPU, merge, scoring) runs for one method
of each stage (tower, encoder output, LLM; vanilla through the script is ``test_eval_e2e``'s); every other
method, and vanilla, runs the same steps
in-process (``llava.eval.budgets`` -> ``llava.eval.generate`` -> ``merge_answers`` -> ``llava.eval.evaluate``
with the script's arguments and folders), so a new method adds about a second here, not a script's worth of
process starts. Each method's stage comes from the registry, never from its name."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import visionzip
from llava.eval import evaluate, generate, report
from llava.eval.budgets import resolve_budget
from llava.eval.data_io import read_json, read_jsonl
from llava.eval.merge_answers import merge_answers
from llava.eval.mini_benchmark import build_mini_benchmark
from llava.model.tiny import build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
CKPT = "llava-v1.5-tiny"

# the paper budget (64 visual tokens) for every method (PDrop's and SparseVLM's stage layers scale to the
# 4-layer LLM), and PDrop also with explicit per-stage settings through the script's settings argument
BUDGETS = {
    "pdrop": "layers=1/2/3,ratios=0.5/0.25/0.111",
}
# the random tiny model never ends an answer: POPE's own 128 new tokens per question were most of this test's
# time (15 settings x 9 questions); the script's MAX_NEW_TOKENS (and the same argument in-process) caps them
MAX_NEW_TOKENS = "4"


def scripted_methods(methods: list[str]) -> list[str]:
    """One registered method of each stage: one with explicit settings (``BUDGETS``: the script's settings
    argument) where the stage has one, else the first."""
    first = {}
    for name in sorted(methods, key=lambda m: (m not in BUDGETS, m)):
        first.setdefault(visionzip.get_method(name).stage, name)
    return sorted(first.values())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tmp_path_factory.mktemp("ckpt") / CKPT
    build_tiny_llava(str(model), version="v1.5", seed=0, layers=4)
    mini = build_mini_benchmark(tmp_path_factory.mktemp("eval"), ["pope"])
    return model, mini


def run_in_process(model: Path, mini: Path, results: Path, method: str, budget: str | None) -> None:
    """What pope.sh runs (scripts/v1_5/eval/_common.sh + pope.sh), one shard, in this process."""
    run = resolve_budget(method, budget, "v1.5")
    pope = mini / "pope"
    answers = pope / "answers" / CKPT / run.method / run.label
    result_dir = results / CKPT / run.method / run.label
    result_dir.mkdir(parents=True, exist_ok=True)
    shard = answers / "1_0.jsonl"
    generate.main([
        "--format", "vqa", "--model-path", str(model), "--question-file", str(pope / "llava_pope_test.jsonl"),
        "--image-folder", str(pope / "val2014"), "--answers-file", str(shard), "--num-chunks", "1", "--chunk-idx", "0",
        "--method", run.method, *(["--budget", budget] if budget else []), "--budget-family", "v1.5",
        "--batch-size", "3", "--device", "cpu", "--dtype", "auto", "--temperature", "0", "--conv-mode", "vicuna_v1",
        "--no-progress", "--max-new-tokens", MAX_NEW_TOKENS,
    ])
    merge_answers([shard], answers / "merge.jsonl")
    evaluate.main([
        "pope", "--annotation-dir", str(pope / "coco"), "--question-file", str(pope / "llava_pope_test.jsonl"),
        "--result-file", str(answers / "merge.jsonl"), "--output", str(result_dir / "pope.json"),
    ])


def test_pope_pipeline_for_every_registered_method(setup, tmp_path):
    model, mini = setup
    results = tmp_path / "results"
    env = {
        **os.environ,
        "MODEL_PATH": str(model), "EVAL_DIR": str(mini), "RESULTS_DIR": str(results),
        "DEVICE": "cpu", "BATCH_SIZE": "3", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "MAX_NEW_TOKENS": MAX_NEW_TOKENS,
    }
    methods = visionzip.registered_methods()
    assert {"tome", "fastv", "sparsevlm", "prumerge", "prumerge+", "pdrop", "random", "pooling"} <= set(methods)
    scripted = scripted_methods(methods)
    # one method of each stage the registry has goes through the script itself
    assert {visionzip.get_method(m).stage for m in scripted} == {visionzip.get_method(m).stage for m in methods}
    runs = [("none", None)] + [(m, BUDGETS.get(m, "64")) for m in methods]
    for method, budget in runs:
        if method in scripted:
            done = subprocess.run(["bash", "scripts/v1_5/eval/pope.sh", method, *([budget] if budget else [])],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"pope.sh {method} {budget} failed:\n{done.stdout}\n{done.stderr}"
        else:
            run_in_process(model, mini, results, method, budget)
    answers_root = mini / "pope" / "answers" / CKPT
    questions = len(read_jsonl(mini / "pope" / "llava_pope_test.jsonl"))
    for method, _ in runs:
        [run_dir] = [p for p in (answers_root / method).iterdir() if p.is_dir()]
        answers = read_jsonl(run_dir / "merge.jsonl")
        assert len(answers) == questions and all(isinstance(a["text"], str) for a in answers)
        [scored] = list((results / CKPT / method).glob("*/pope.json"))
        assert 0.0 <= read_json(scored)["score"] <= 100.0
        assert read_json(scored)["generation"]["max_new_tokens"] == int(MAX_NEW_TOKENS)
    table = report.collect(results)[CKPT]
    assert {row.method for row in table} == {m for m, _ in runs}
