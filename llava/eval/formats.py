"""Question-file readers: each benchmark format becomes a list of ``EvalItem`` for the generation engine.

Formats (the files LLaVA's evaluation uses, see ``playground/README.md``):

- ``vqa``: jsonl, one ``{"question_id", "image", "text", ...}`` per line (GQA, TextVQA, POPE, MME, VQAv2,
  VizWiz, SEED, MM-Vet, LLaVA-Bench). The prompt is the text as it is (it carries its own hint, e.g.
  "Answer the question using a single word or phrase.").
- ``science``: ScienceQA's ``llava_test_CQM-A.json``, a json list of ``{"id", "image"?, "conversations"}``;
  some questions have no image.
- ``mmbench``: the MMBench tsv (``index, question, hint, A..D, image`` base64, ...); ``--all-rounds`` asks
  each question once per option with the options rotated (circular evaluation).
- ``mmmu``: jsonl ``{"question_id", "image", "text", "options", "question_type", "answer", "subject"}``
  written by ``python -m llava.eval.prepare_mmmu``.

A reader works in two steps so that sharding splits *questions* (not MMBench rounds) between processes:
``load(path)`` -> records, ``expand(record)`` -> items. Every item has a ``key`` unique in its question file;
``answer_key(answer record)`` recomputes it from a written answer, which is what resuming relies on.
"""
from __future__ import annotations

import ast
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from PIL import Image

from .data_io import read_json, read_jsonl, read_tsv, require_fields
from .scoring import MMBENCH_LETTERS, is_missing, mmbench_options, rotate

SINGLE_LETTER_HINT = "Answer with the option's letter from the given choices directly."
SINGLE_LETTER_HINT_CN = "请直接回答选项字母。"
SHORT_ANSWER_HINT = "Answer the question using a single word or phrase."


@dataclass
class EvalItem:
    key: str  # unique within the question file (resume / merge identity)
    question_id: object  # written to the answers file as found in the question file
    question: str  # what follows the image token in the user turn
    prompt: str  # the answers file's "prompt" field (LLaVA's cur_prompt)
    load_image: Callable[[], Image.Image] | None = None  # None: a text-only question
    extra: dict = field(default_factory=dict)  # more answer fields (MMBench: round_id, options, ...)

    @property
    def has_image(self) -> bool:
        return self.load_image is not None


@dataclass
class ReaderOptions:
    image_folder: str | None = None
    single_pred_prompt: bool = False  # ScienceQA / MMBench: append the "answer with the letter" hint
    all_rounds: bool = False  # MMBench: one round per option, options rotated
    lang: str = "en"  # MMBench: "cn" uses the Chinese letter hint


def _to_rgb(image: Image.Image, source: str) -> Image.Image:
    """``llava.mm_utils.to_rgb``, imported when an image is loaded: mm_utils imports the model (torch,
    transformers), which ``python -m llava.eval.merge_answers`` and the scorers never need (every eval
    script runs them once per setting; docs/architecture.md, "Test time")."""
    from llava.mm_utils import to_rgb as convert

    return convert(image, source)


def _image_file_loader(folder: str | None, name: str, where: str) -> Callable[[], Image.Image]:
    path = Path(folder) / name if folder else Path(name)

    def load() -> Image.Image:
        if not path.is_file():
            raise FileNotFoundError(f"image {path} of {where} does not exist (check --image-folder)")
        with Image.open(path) as image:
            return _to_rgb(image, str(path))

    return load


def _base64_loader(data: str, where: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            with Image.open(BytesIO(base64.b64decode(data))) as image:
                return _to_rgb(image, where)
        except (ValueError, OSError) as err:
            raise ValueError(f"{where}: the image column is not a base64-encoded image ({err})") from err

    return load


class QuestionFormat:
    name = ""

    def load(self, path) -> list:
        raise NotImplementedError

    def expand(self, record, options: ReaderOptions) -> list[EvalItem]:
        raise NotImplementedError

    def answer_key(self, answer: dict) -> str:
        raise NotImplementedError


class VQAFormat(QuestionFormat):
    name = "vqa"

    def load(self, path) -> list:
        records = read_jsonl(path)
        for n, record in enumerate(records, 1):
            require_fields(record, ("question_id", "text"), f"{path} question #{n}")
        return records

    def expand(self, record, options):
        where = f"question {record['question_id']}"
        image = record.get("image")
        loader = _image_file_loader(options.image_folder, image, where) if image else None
        text = record["text"]
        return [EvalItem(self._key(record["question_id"], text), record["question_id"], text, text, loader)]

    @staticmethod
    def _key(question_id, text: str) -> str:
        # MME uses one id (the image path) for both questions of an image: the text tells them apart
        return json.dumps([str(question_id), text], ensure_ascii=False)

    def answer_key(self, answer):
        return self._key(answer["question_id"], answer["prompt"])


class ScienceQAFormat(QuestionFormat):
    name = "science"

    def load(self, path) -> list:
        records = read_json(path)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a json list of ScienceQA questions (llava_test_CQM-A.json)")
        for n, record in enumerate(records, 1):
            require_fields(record, ("id", "conversations"), f"{path} question #{n}")
        return records

    def expand(self, record, options):
        text = record["conversations"][0]["value"].replace("<image>", "").strip()
        prompt = text
        loader = None
        if record.get("image"):
            loader = _image_file_loader(options.image_folder, record["image"], f"question {record['id']}")
            prompt = "<image>\n" + prompt
        if options.single_pred_prompt:
            text += "\n" + SINGLE_LETTER_HINT
            prompt += "\n" + SINGLE_LETTER_HINT
        return [EvalItem(str(record["id"]), record["id"], text, prompt, loader)]

    def answer_key(self, answer):
        return str(answer["question_id"])


class MMBenchFormat(QuestionFormat):
    name = "mmbench"

    def load(self, path) -> list:
        rows = read_tsv(path)
        for n, row in enumerate(rows, 2):
            require_fields(row, ("index", "question", "A", "B", "image"), f"{path}:{n}")
        return rows

    @staticmethod
    def _index(value: str):
        # indices are integers in the published files; keep them as numbers in the answers like LLaVA
        try:
            return int(value)
        except ValueError:
            return value

    def expand(self, row, options):
        index = self._index(row["index"])
        choices = mmbench_options(row)
        loader = _base64_loader(row["image"], f"MMBench question {index}")
        hint = row.get("hint")
        rounds = len(choices) if options.all_rounds else 1
        items = []
        for round_id in range(rounds):
            shown = rotate(choices, round_id)
            question = row["question"] if is_missing(hint) else hint + "\n" + row["question"]
            for letter, choice in zip(MMBENCH_LETTERS, shown):
                question += "\n" + letter + ". " + choice
            prompt = question
            if options.single_pred_prompt:
                question += "\n" + (SINGLE_LETTER_HINT_CN if options.lang == "cn" else SINGLE_LETTER_HINT)
            extra = {"round_id": round_id, "options": shown,
                     "option_char": list(rotate(list(MMBENCH_LETTERS[: len(choices)]), round_id))}
            items.append(EvalItem(self._key(index, round_id), index, question, prompt, loader, extra))
        return items

    @staticmethod
    def _key(index, round_id: int) -> str:
        return json.dumps([str(index), int(round_id)])

    def answer_key(self, answer):
        return self._key(answer["question_id"], answer.get("round_id", 0))


def parse_list_field(value, what: str) -> list:
    """MMMU stores lists as their Python repr ("['a', 'b']"); accept that or a real list."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return value
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"{what} is not a list: {value!r}") from err
    if not isinstance(parsed, list):
        raise ValueError(f"{what} is not a list: {value!r}")
    return parsed


class MMMUFormat(QuestionFormat):
    name = "mmmu"

    def load(self, path) -> list:
        records = read_jsonl(path)
        for n, record in enumerate(records, 1):
            require_fields(record, ("question_id", "text"), f"{path} question #{n}")
        return records

    def expand(self, record, options):
        qid = record["question_id"]
        choices = parse_list_field(record.get("options"), f"options of MMMU question {qid}")
        question = record["text"]
        if record.get("question_type", "multiple-choice") == "multiple-choice" and choices:
            for letter, choice in zip("ABCDEFGHI", choices):
                question += f"\n{letter}. {choice}"
            question += "\n" + SINGLE_LETTER_HINT
        else:
            question += "\n" + SHORT_ANSWER_HINT
        images = record.get("image")
        images = images if isinstance(images, list) else ([images] if images else [])
        # [VisionZip-LLaVA] LLaVA-1.5/NeXT take one image per prompt: a multi-image MMMU question is asked
        # about its first image (what single-image baselines do on MMMU); the others are ignored.
        loader = _image_file_loader(options.image_folder, images[0], f"MMMU question {qid}") if images else None
        return [EvalItem(str(qid), qid, question, question, loader)]

    def answer_key(self, answer):
        return str(answer["question_id"])


FORMATS: dict[str, QuestionFormat] = {f.name: f for f in (VQAFormat(), ScienceQAFormat(), MMBenchFormat(), MMMUFormat())}


def get_format(name: str) -> QuestionFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown question format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


def chunk_bounds(total: int, num_chunks: int, chunk_idx: int) -> tuple[int, int]:
    """[start, end) of shard ``chunk_idx`` of ``num_chunks`` near-equal contiguous shards."""
    if num_chunks < 1:
        raise ValueError(f"--num-chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx must be in [0, {num_chunks - 1}], got {chunk_idx}")
    # [VisionZip-LLaVA] LLaVA cuts ceil(n / k)-sized chunks, which leaves the last shards empty (and its
    # indexing fails) when n is small; here shard sizes differ by at most one. The merged set is the same.
    return total * chunk_idx // num_chunks, total * (chunk_idx + 1) // num_chunks


def read_items(fmt: QuestionFormat, question_file, options: ReaderOptions, num_chunks: int = 1,
               chunk_idx: int = 0) -> list[EvalItem]:
    """The items of one shard of a question file, checked for duplicate keys over the whole file."""
    records = fmt.load(question_file)
    start, end = chunk_bounds(len(records), num_chunks, chunk_idx)
    per_record = [fmt.expand(record, options) for record in records]  # cheap: images load lazily
    seen: set[str] = set()
    duplicates = [item.key for items in per_record for item in items if item.key in seen or seen.add(item.key)]
    if duplicates:
        raise ValueError(f"{question_file} repeats question(s) {duplicates[:5]}: answers could not be told apart")
    return [item for items in per_record[start:end] for item in items]
