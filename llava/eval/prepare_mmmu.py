"""Write MMMU (the Hugging Face dataset ``MMMU/MMMU``) as a question jsonl + images for the ``mmmu`` format.

    pip install datasets      # only for this one-off conversion
    python -m llava.eval.prepare_mmmu --out-dir playground/data/eval/MMMU --split validation

Output: ``<out-dir>/llava_mmmu_<split>.jsonl`` (``llava_mmmu_val.jsonl`` for validation, the split the paper
reports) with one ``{"question_id", "image", "text", "options", "question_type", "answer", "subject"}`` per
question, and ``<out-dir>/images/<question id>_<k>.png``.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from .data_io import write_jsonl
from .formats import parse_list_field

# The 30 subjects of MMMU (one dataset configuration each).
MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)
MAX_IMAGES = 7


def mmmu_questions(rows: Iterable[dict], image_dir) -> list[dict]:
    """Question records from MMMU dataset rows (``id``, ``question``, ``options``, ``answer``,
    ``question_type``, ``image_1`` .. ``image_7`` as PIL images or None); images are saved as PNG."""
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for row in rows:
        qid = str(row["id"])
        images = []
        for k in range(1, MAX_IMAGES + 1):
            image = row.get(f"image_{k}")
            if image is None:
                continue
            name = f"{qid}_{k}.png"
            image.convert("RGB").save(image_dir / name)
            images.append(name)
        parts = qid.split("_")
        records.append({
            "question_id": qid,
            "image": images,
            "text": row["question"],
            "options": parse_list_field(row.get("options"), f"options of MMMU question {qid}"),
            "question_type": row.get("question_type", "multiple-choice"),
            "answer": row["answer"],
            "subject": "_".join(parts[1:-1]) if len(parts) > 2 else "unknown",
        })
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.prepare_mmmu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="playground/data/eval/MMMU")
    parser.add_argument("--split", default="validation", choices=["dev", "validation", "test"])
    parser.add_argument("--dataset", default="MMMU/MMMU", help="Hugging Face dataset name or local copy")
    args = parser.parse_args(argv)
    try:
        from datasets import load_dataset
    except ImportError:
        parser.exit(2, "error: this conversion reads the Hugging Face dataset: `pip install datasets` first\n")
    out_dir = Path(args.out_dir)
    records = []
    for subject in MMMU_SUBJECTS:
        rows = load_dataset(args.dataset, subject, split=args.split)
        records.extend(mmmu_questions(rows, out_dir / "images"))
    name = "llava_mmmu_val.jsonl" if args.split == "validation" else f"llava_mmmu_{args.split}.jsonl"
    write_jsonl(out_dir / name, records)
    print(f"wrote {len(records)} questions to {out_dir / name}")


if __name__ == "__main__":
    main()
