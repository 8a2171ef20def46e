"""A miniature copy of every evaluation benchmark in its real file formats, with random images.

    python -m llava.eval.mini_benchmark /tmp/eval-mini            # all benchmarks
    python -m llava.eval.mini_benchmark /tmp/eval-mini --benchmarks pope,mme

The folder has the ``playground/data/eval`` layout (``playground/README.md``), so any eval script runs on
it with ``EVAL_DIR=/tmp/eval-mini``: a smoke test of the whole pipeline (generation, merge, scoring,
report) in seconds on a tiny model, before spending GPU hours on the real data.
"""
from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from .data_io import write_json, write_jsonl, write_tsv
from .scoring import MME_COGNITION, MME_PERCEPTION

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


class _Images:
    """Seeded random RGB images of a few sizes (some non-square, to exercise padding / anyres)."""

    SIZES = ((64, 48), (40, 72), (56, 56))

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def image(self) -> Image.Image:
        w, h = self.SIZES[self.count % len(self.SIZES)]
        self.count += 1
        return Image.fromarray((self.rng.random((h, w, 3)) * 255).astype("uint8"))

    def save(self, path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image().save(path)
        return path.name

    def base64(self) -> str:
        buffer = BytesIO()
        self.image().save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")


def _jsonl_lines(path: Path, records: list[dict]) -> None:
    write_jsonl(path, records)


def make_gqa(root: Path, images: _Images) -> None:
    d = root / "gqa"
    answers = ["yes", "left", "red"]
    questions, annotations = [], {}
    for i, gold in enumerate(answers):
        qid = f"20{i:06d}"
        name = images.save(d / "data" / "images" / f"n{i}.jpg")
        questions.append({"question_id": qid, "image": name, "text": f"Question {i}?{SHORT}"})
        annotations[qid] = {"question": f"Question {i}?", "answer": gold, "imageId": name[:-4],
                            "types": {"structural": "verify" if i == 0 else "query"}}
    _jsonl_lines(d / "llava_gqa_testdev_balanced.jsonl", questions)
    write_json(d / "data" / "testdev_balanced_questions.json", annotations)


def make_textvqa(root: Path, images: _Images) -> None:
    d = root / "textvqa"
    data, questions = [], []
    for i, answers in enumerate([["stop"] * 7 + ["stop sign"] * 3, ["2"] * 5 + ["two"] * 5, ["coca cola"] * 10]):
        name = images.save(d / "train_images" / f"t{i}.jpg")
        data.append({"question_id": 34600 + i, "image_id": name[:-4], "question": f"what is written {i}?",
                     "answers": answers})
        # as LLaVA's file: the question id is the image id
        questions.append({"question_id": name[:-4], "image": name,
                          "text": f"what is written {i}?\nReference OCR token: x{SHORT}"})
    write_json(d / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": data})
    _jsonl_lines(d / "llava_textvqa_val_v051_ocr.jsonl", questions)


def make_pope(root: Path, images: _Images) -> None:
    d = root / "pope"
    questions = []
    qid = 0
    for category in ("adversarial", "popular", "random"):
        labels = []
        for i, (obj, label) in enumerate([("dog", "yes"), ("car", "no"), ("cup", "no")]):
            qid += 1
            name = images.save(d / "val2014" / f"COCO_val2014_{category[:3]}{i:09d}.jpg")
            text = f"Is there a {obj} in the image?"
            labels.append({"question_id": i + 1, "image": name, "text": text, "label": label})
            questions.append({"question_id": qid, "image": name, "text": text + SHORT, "category": category})
        _jsonl_lines(d / "coco" / f"coco_pope_{category}.json", labels)
    _jsonl_lines(d / "llava_pope_test.jsonl", questions)


def make_mme(root: Path, images: _Images) -> None:
    d = root / "MME"
    release = d / "MME_Benchmark_release_version"
    questions = []
    for category in (MME_PERCEPTION[0], MME_COGNITION[0]):
        for i in range(2):
            stem = f"{i:04d}"
            folder = release / category
            if category == MME_PERCEPTION[0]:  # the two layouts of the release: flat, and images/ + txt/
                image_name, txt = images.save(folder / f"{stem}.jpg"), folder / f"{stem}.txt"
            else:
                image_name = images.save(folder / "images" / f"{stem}.png")
                txt = folder / "questions_answers_YN" / f"{stem}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            pair = [(f"Is there a cat in image {i}? Please answer yes or no.", "Yes"),
                    (f"Is there a cow in image {i}? Please answer yes or no.", "No")]
            txt.write_text("".join(f"{q}\t{a}\n" for q, a in pair), encoding="utf-8")
            image_path = f"{category}/{'images/' if category != MME_PERCEPTION[0] else ''}{image_name}"
            for q, _ in pair:
                questions.append({"question_id": image_path, "image": image_path, "text": q, "category": category})
    _jsonl_lines(d / "llava_mme.jsonl", questions)


def make_scienceqa(root: Path, images: _Images) -> None:
    d = root / "scienceqa"
    problems, records = {}, []
    for i, (choices, answer, with_image) in enumerate([(["cat", "dog"], 0, True), (["1", "2", "3"], 2, False),
                                                       (["up", "down"], 1, True)]):
        pid = str(100 + i)
        options = " ".join(f"({'ABCDE'[k]}) {c}" for k, c in enumerate(choices))
        value = f"Context: none\nQuestion: question {i}?\nOptions: {options}"
        record = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if with_image else "") + value},
                                               {"from": "gpt", "value": f"The answer is {'ABCDE'[answer]}."}]}
        if with_image:
            images.save(d / "images" / "test" / pid / "image.png")
            record["image"] = f"{pid}/image.png"
        records.append(record)
        problems[pid] = {"question": f"question {i}?", "choices": choices, "answer": answer,
                         "image": "image.png" if with_image else None, "split": "test"}
    write_json(d / "llava_test_CQM-A.json", records)
    write_json(d / "problems.json", problems)
    write_json(d / "pid_splits.json", {"test": list(problems)})


def make_seed(root: Path, images: _Images) -> None:
    d = root / "seed_bench"
    questions, annotations = [], []
    for i, answer in enumerate("ABC"):
        qid = str(101669 + i)
        name = images.save(d / "SEED-Bench-image" / f"s{i}.jpg")
        choices = " ".join(f"\n{letter}. option {letter}" for letter in "ABCD")
        questions.append({"question_id": qid, "image": f"SEED-Bench-image/{name}",
                          "text": f"Question {i}?{choices}{LETTER}", "category": "Scene Understanding"})
        annotations.append({"question_id": qid, "answer": answer, "question_type_id": 1 + i % 2,
                            "data_type": "image", "data_id": name})
    _jsonl_lines(d / "llava-seed-bench.jsonl", questions)
    write_json(d / "SEED-Bench.json", {"questions": annotations,
                                       "question_type": {"Scene Understanding": 1, "Instance Identity": 2}})


def _mmbench_rows(images: _Images, chinese: bool) -> list[dict]:
    rows = []
    for i, (options, answer) in enumerate([(["red", "blue", "green", "white"], "B"), (["yes", "no", "", ""], "A")]):
        row = {"index": str(i), "question": ("这是什么颜色？" if chinese else "What color is it?") + f" ({i})",
               "hint": "nan" if i else "A hint.", "A": options[0], "B": options[1], "C": options[2] or "nan",
               "D": options[3] or "nan", "answer": answer, "category": "color", "image": images.base64(),
               "source": "mini", "l2-category": "attribute_reasoning", "comment": "nan", "split": "dev"}
        rows.append(row)
    return rows


MMBENCH_FIELDS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                  "l2-category", "comment", "split"]


def make_mmbench(root: Path, images: _Images) -> None:
    write_tsv(root / "mmbench" / "mmbench_dev_20230712.tsv", _mmbench_rows(images, False), MMBENCH_FIELDS)


def make_mmbench_cn(root: Path, images: _Images) -> None:
    write_tsv(root / "mmbench" / "mmbench_dev_cn_20231003.tsv", _mmbench_rows(images, True), MMBENCH_FIELDS)


def make_vqav2(root: Path, images: _Images) -> None:
    d = root / "vqav2"
    test = []
    for i in range(4):
        name = images.save(d / "test2015" / f"COCO_test2015_{i:012d}.jpg")
        test.append({"question_id": 1000 + i, "image": name, "text": f"What is this {i}?{SHORT}"})
    _jsonl_lines(d / "llava_vqav2_mscoco_test2015.jsonl", test)
    _jsonl_lines(d / "llava_vqav2_mscoco_test-dev2015.jsonl", test[:2])


def make_vizwiz(root: Path, images: _Images) -> None:
    d = root / "vizwiz"
    questions = []
    for i in range(2):
        name = images.save(d / "test" / f"VizWiz_test_{i:08d}.jpg")
        questions.append({"question_id": i, "image": name, "text": f"What is this {i}?\nWhen the provided "
                          "information is insufficient, respond with 'Unanswerable'." + SHORT})
    _jsonl_lines(d / "llava_test.jsonl", questions)


def make_mmvet(root: Path, images: _Images) -> None:
    d = root / "mm-vet"
    questions = [{"question_id": i, "image": images.save(d / "images" / f"v1_{i}.png"),
                  "text": f"Describe image {i}."} for i in range(2)]
    _jsonl_lines(d / "llava-mm-vet.jsonl", questions)


def make_llavabench(root: Path, images: _Images) -> None:
    d = root / "llava-bench-in-the-wild"
    questions, contexts, references = [], [], []
    for i, category in enumerate(["conv", "detail", "complex"]):
        name = images.save(d / "images" / f"{i:03d}.jpg")
        questions.append({"question_id": i, "image": name, "text": f"What is in picture {i}?", "category": category})
        contexts.append({"id": f"c{i}", "image": name, "caption": f"A random picture number {i}."})
        references.append({"question_id": i, "text": f"Random coloured pixels ({i}).", "model_id": "gpt-4"})
    _jsonl_lines(d / "questions.jsonl", questions)
    _jsonl_lines(d / "context.jsonl", contexts)
    _jsonl_lines(d / "answers_gpt4.jsonl", references)


def make_mmmu(root: Path, images: _Images) -> None:
    d = root / "MMMU"
    questions = [
        {"question_id": "validation_Art_1", "image": [images.save(d / "images" / "validation_Art_1_1.png")],
         "text": "<image 1> Which style is this?", "options": ["Baroque", "Cubism", "Pop art"],
         "question_type": "multiple-choice", "answer": "B", "subject": "Art"},
        {"question_id": "validation_Math_1", "image": [images.save(d / "images" / "validation_Math_1_1.png")],
         "text": "<image 1> How many sides does the shape have?", "options": [],
         "question_type": "open", "answer": "4", "subject": "Math"},
    ]
    _jsonl_lines(d / "llava_mmmu_val.jsonl", questions)


MAKERS: dict[str, Callable[[Path, _Images], None]] = {
    "gqa": make_gqa, "textvqa": make_textvqa, "pope": make_pope, "mme": make_mme, "sqa": make_scienceqa,
    "seed": make_seed, "mmbench": make_mmbench, "mmbench_cn": make_mmbench_cn, "vqav2": make_vqav2,
    "vizwiz": make_vizwiz, "mmvet": make_mmvet, "llavabench": make_llavabench, "mmmu": make_mmmu,
}


def build_mini_benchmark(root, benchmarks: list[str] | None = None, seed: int = 0) -> Path:
    root = Path(root)
    names = benchmarks or list(MAKERS)
    unknown = [n for n in names if n not in MAKERS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {list(MAKERS)}")
    images = _Images(seed)
    for name in names:
        MAKERS[name](root, images)
    (root / "MINI_BENCHMARK.json").write_text(json.dumps({"benchmarks": names, "seed": seed}) + "\n")
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.mini_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--benchmarks", help=f"comma-separated subset of {','.join(MAKERS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.benchmarks.split(",")] if args.benchmarks else None
    try:
        root = build_mini_benchmark(args.out_dir, names, args.seed)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"mini benchmark written to {root}")


if __name__ == "__main__":
    main()
