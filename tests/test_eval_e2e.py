"""End to end on CPU: an eval script (bash) on the tiny model and a generated mini POPE, vanilla and
VisionZip 64, then the report table built from the two runs; plus batched generation on the real model."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import formats, report
from llava.eval.data_io import read_json, read_jsonl
from llava.eval.generate import LlavaAnswerer
from llava.eval.mini_benchmark import build_mini_benchmark
from llava.model.tiny import build_tiny_llava

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_v15(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny"
    build_tiny_llava(str(path), version="v1.5", seed=0)
    return path


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return build_mini_benchmark(tmp_path_factory.mktemp("eval"), ["pope", "sqa"])


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the in-process model test: on a busy 2-core machine, torch's threads
    wait on each other and a tiny-model step takes seconds instead of milliseconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_script(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} {args} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_pope_script_vanilla_and_visionzip_then_report(tiny_v15, mini, tmp_path):
    results = tmp_path / "results"
    env = {
        **os.environ,
        "MODEL_PATH": str(tiny_v15), "EVAL_DIR": str(mini), "RESULTS_DIR": str(results),
        "DEVICE": "cpu", "BATCH_SIZE": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        # the random tiny model never ends an answer: POPE's 128 new tokens would be most of this test's time
        "MAX_NEW_TOKENS": "4",
    }
    # vanilla on two "GPUs" (two CPU shards run in parallel, then merged); VisionZip 64 on one
    run_script("scripts/v1_5/eval/pope.sh", "none", env={**env, "CUDA_VISIBLE_DEVICES": "0,1"})
    run_script("scripts/v1_5/eval/pope.sh", "visionzip", "64", env={**env, "CUDA_VISIBLE_DEVICES": "0"})

    answers_root = mini / "pope" / "answers" / "llava-v1.5-tiny"
    assert sorted(p.name for p in (answers_root / "none" / "full").glob("*.jsonl")) == ["2_0.jsonl", "2_1.jsonl",
                                                                                      "merge.jsonl"]
    for run, spec in (("none/full", {"method": "none"}), ("visionzip/64", {"method": "visionzip", "dominant": 54,
                                                                           "contextual": 10})):
        merged = read_jsonl(answers_root / run / "merge.jsonl")
        assert sorted(a["question_id"] for a in merged) == list(range(1, 10))
        result = read_json(results / "llava-v1.5-tiny" / run / "pope.json")
        assert result["benchmark"] == "pope" and result["num_questions"] == 9
        splits = result["metrics"]["splits"]
        assert sorted(splits) == ["adversarial", "popular", "random"]
        assert all(s["total"] == 3 and s["tp"] + s["fp"] + s["tn"] + s["fn"] == 3 for s in splits.values())
        assert 0.0 <= result["score"] <= 100.0
        assert result["score"] == pytest.approx(sum(s["f1"] for s in splits.values()) / 3)
        generation = result["generation"]
        assert {k: generation["compression"][k] for k in spec} == spec
        assert generation["num_answered"] == 9 and generation["status"] == "complete"
        assert generation["max_new_tokens"] == 4  # the script's MAX_NEW_TOKENS reached the generation
    vz = read_json(results / "llava-v1.5-tiny" / "visionzip" / "64" / "pope.json")["generation"]
    assert (vz["visual_tokens"], vz["budget_label"], vz["batch_size"]) == (64, "64", 2)

    out = report.main(["--results-dir", str(results), "--out-dir", str(tmp_path / "report")])
    rows = out["rows"]["llava-v1.5-tiny"]
    assert [(r.method, r.visual_tokens) for r in rows] == [("none", 576), ("visionzip", 64)]
    vanilla, zipped = (r.scores["pope"] for r in rows)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| Method | Tokens | POPE | Avg | Paper Avg |" in markdown
    assert f"| Vanilla | 576 | {vanilla:.1f} | 100.0% | 100.0% |" in markdown
    if vanilla:  # a random tiny model may answer "no" everywhere: F1 0, no percentage then
        assert f"| VisionZip | 64 | {zipped:.1f} ({100 * zipped / vanilla:.1f}%) |" in markdown
    assert "| 94.0% |" in markdown  # the paper's average at 64 tokens beside ours
    with open(tmp_path / "report" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["budget"]) for r in table] == [("none", "full"), ("visionzip", "64")]
    assert float(table[1]["pope"]) == pytest.approx(zipped, abs=1e-3)
    assert (tmp_path / "report" / "llava-v1.5-tiny_score_vs_tokens.png").stat().st_size > 1000

    # running a finished setting again reuses its answers (no regeneration)
    before = [a["answer_id"] for a in read_jsonl(answers_root / "visionzip" / "64" / "merge.jsonl")]
    done = run_script("scripts/v1_5/eval/pope.sh", "visionzip", "64", env={**env, "CUDA_VISIBLE_DEVICES": "0"})
    assert "all 9 questions already answered" in done.stdout
    assert [a["answer_id"] for a in read_jsonl(answers_root / "visionzip" / "64" / "merge.jsonl")] == before


def test_batched_generation_matches_one_by_one(tiny_v15, mini, one_torch_thread):
    """Left-padded batches answer as batch size 1 does (questions with images, and text-only ones)."""
    from visionzip import CompressionConfig

    answerer = LlavaAnswerer(str(tiny_v15), None, "vicuna_v1", CompressionConfig.parse("visionzip:54,10"), "cpu",
                             "float32", max_new_tokens=12)
    items = formats.read_items(formats.get_format("science"), mini / "scienceqa" / "llava_test_CQM-A.json",
                               formats.ReaderOptions(str(mini / "scienceqa" / "images" / "test"), True))
    pope = formats.read_items(formats.get_format("vqa"), mini / "pope" / "llava_pope_test.jsonl",
                              formats.ReaderOptions(str(mini / "pope" / "val2014")))[:3]
    # the same questions without their image: the text-only path of generate()
    text_only = [formats.EvalItem(i.key, i.question_id, i.question, i.prompt, None) for i in pope]
    one_by_one = [answerer([item])[0] for item in pope + text_only + items]
    batched = answerer(pope) + answerer(text_only) + [answerer([item])[0] for item in items]
    assert batched == one_by_one
    assert all(tokens > 0 for _, tokens in batched)
    # the prompt is the vicuna_v1 template with the image token first
    prompt = answerer.prompt_for(pope[0])
    assert prompt.startswith("A chat between") and "USER: <image>\nIs there a dog in the image?" in prompt
    assert prompt.endswith("ASSISTANT:")
    assert "<image>" not in answerer.prompt_for(items[1])  # ScienceQA question without an image
