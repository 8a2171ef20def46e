"""Every registered method end to end through an eval script: ``pope.sh METHOD BUDGET`` on a tiny
LLaVA-1.5 (4 LLM layers, so that the in-LLM methods have layers to act at) and a generated mini POPE,
then the report table with one row per method."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import visionzip
from llava.eval import report
from llava.eval.data_io import read_json, read_jsonl
from llava.eval.mini_benchmark import build_mini_benchmark
from llava.model.tiny import build_tiny_llava

REPO = Path(__file__).resolve().parents[1]

# the paper budget (64 visual tokens) for every method (PDrop's and SparseVLM's stage layers scale to the
# 4-layer LLM), and PDrop also with explicit per-stage settings through the script's settings argument
BUDGETS = {
    "pdrop": "layers=1/2/3,ratios=0.5/0.25/0.111",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny"
    build_tiny_llava(str(model), version="v1.5", seed=0, layers=4)
    mini = build_mini_benchmark(tmp_path_factory.mktemp("eval"), ["pope"])
    return model, mini


def test_pope_script_for_every_registered_method(setup, tmp_path):
    model, mini = setup
    results = tmp_path / "results"
    env = {
        **os.environ,
        "MODEL_PATH": str(model), "EVAL_DIR": str(mini), "RESULTS_DIR": str(results),
        "DEVICE": "cpu", "BATCH_SIZE": "3", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    methods = visionzip.registered_methods()
    assert {"tome", "fastv", "sparsevlm", "prumerge", "prumerge+", "pdrop", "random", "pooling"} <= set(methods)
    runs = [("none", None)] + [(m, BUDGETS.get(m, "64")) for m in methods]
    for method, budget in runs:
        done = subprocess.run(["bash", "scripts/v1_5/eval/pope.sh", method, *([budget] if budget else [])],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"pope.sh {method} {budget} failed:\n{done.stdout}\n{done.stderr}"
    answers_root = mini / "pope" / "answers" / "llava-v1.5-tiny"
    questions = len(read_jsonl(mini / "pope" / "llava_pope_test.jsonl"))
    for method, _ in runs:
        [run_dir] = [p for p in (answers_root / method).iterdir() if p.is_dir()]
        answers = read_jsonl(run_dir / "merge.jsonl")
        assert len(answers) == questions and all(isinstance(a["text"], str) for a in answers)
        [scored] = list((results / "llava-v1.5-tiny" / method).glob("*/pope.json"))
        assert 0.0 <= read_json(scored)["score"] <= 100.0
    table = report.collect(results)["llava-v1.5-tiny"]
    assert {row.method for row in table} == {m for m, _ in runs}
