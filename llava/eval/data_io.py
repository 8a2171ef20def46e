"""Reading and writing the benchmark files: jsonl / json / tsv, answers keyed by question id.

Every reader raises a ``ValueError`` naming the file and the line when the content is not what the
benchmark format says, so that a bad download or a half-written answers file fails loudly.

Input schemas: a jsonl line must hold one JSON object; an answers record (``read_answers``) must have a
``question_id`` (string or integer) and a ``text`` string, and an answers file that looks like a question
file (records with ``image`` but none of the fields generation writes) is refused; a question list must be
non-empty and without repeated ids (``require_questions``). Scores are never computed over zero or
repeated questions.
"""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path


def read_json(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open(encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err


def write_json(path, data, indent: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write("\n")
    tmp.replace(path)  # atomic: a reader never sees half a settings/results file
    return path


def read_jsonl(path) -> list[dict]:
    """All records of a jsonl file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no} is not a JSON line: {err}") from err
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_no} holds a JSON {type(record).__name__}, expected one JSON object per line "
                    "(jsonl); a file written as one JSON array must be converted to one record per line"
                )
            records.append(record)
    return records


# Fields llava.eval.generate (and the original LLaVA model_vqa scripts) write into every answer record.
GENERATION_FIELDS = ("prompt", "answer_id", "model_id")


def check_answer_record(record: dict, where: str) -> None:
    """An answer: ``question_id`` a string or an integer, ``text`` a string."""
    require_fields(record, ("question_id", "text"), where)
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise ValueError(f"{where}: question_id must be a string or an integer, got {qid!r}")
    if not isinstance(record["text"], str):
        raise ValueError(f"{where}: 'text' must be the answer string, got {record['text']!r}")


def read_answers(path, fields: Iterable[str] = ()) -> list[dict]:
    """The records of an answers file, each checked (``check_answer_record`` and ``fields``); refuses an
    empty file and a question file passed as the answers."""
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"answers file {path} is empty: nothing to score")
    for line_no, record in enumerate(records, 1):
        where = f"{path} answer #{line_no}"
        check_answer_record(record, where)
        require_fields(record, fields, where)
    if all("image" in r for r in records) and not any(f in r for r in records for f in GENERATION_FIELDS):
        raise ValueError(
            f"{path} looks like a question file, not answers: its records have 'image' but none of "
            f"{list(GENERATION_FIELDS)}, which generation writes; pass the answers jsonl of llava.eval.generate"
        )
    return records


def require_questions(keys: list, what: str, path) -> list:
    """A non-empty list of question keys without repeats (a repeated question would count twice)."""
    if not keys:
        raise ValueError(f"{path} has no {what} questions: nothing to score")
    seen, repeated = set(), []
    for key in keys:
        if key in seen:
            repeated.append(key)
        seen.add(key)
    if repeated:
        shown = ", ".join(repr(k) for k in repeated[:5])
        raise ValueError(f"{path} repeats {len(repeated)} {what} question id(s), e.g. {shown}: each must appear once")
    return keys


def write_jsonl(path, records: Iterable[dict]) -> Path:
    """Write all records at once, atomically (a reader never sees half a file)."""
    from llava.utils_io import atomic_write

    path = Path(path)
    with atomic_write(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_tsv(path) -> list[dict]:
    """Rows of a tab-separated file with a header line (MMBench), as dicts of strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    # MMBench rows carry base64 images far beyond csv's default 128 KiB field limit.
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
        if reader.fieldnames is None:
            raise ValueError(f"{path} is empty: expected a header line")
    for line_no, row in enumerate(rows, 2):
        if None in row:
            raise ValueError(f"{path}:{line_no} has more fields than the header {reader.fieldnames}")
    return rows


def write_tsv(path, rows: list[dict], fieldnames: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, delimiter="\t", quoting=csv.QUOTE_NONE,
                                escapechar="\\", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def require_fields(record, fields: Iterable[str], where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got a {type(record).__name__}")
    missing = [field for field in fields if field not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; the record has {sorted(record)}")


def index_unique(records: Iterable[dict], key_of, what: str) -> dict:
    """``{key_of(record): record}``, refusing duplicate keys (a merged-twice answers file, say)."""
    index: dict = {}
    duplicates = []
    for record in records:
        key = key_of(record)
        if key in index:
            duplicates.append(key)
        index[key] = record
    if duplicates:
        shown = ", ".join(repr(k) for k in duplicates[:5])
        raise ValueError(f"{what}: {len(duplicates)} duplicate key(s), e.g. {shown}")
    return index


def answers_by_id(path, key_of=None) -> dict:
    """Answers of a generation output file keyed by ``question_id`` (or by ``key_of(record)``)."""
    records = read_answers(path)
    return index_unique(records, key_of or (lambda r: r["question_id"]), f"answers file {path}")


def check_coverage(expected_keys: Iterable, answered: dict, what: str, answers_path) -> None:
    """Every expected question must have an answer: name the missing ones instead of scoring a subset."""
    missing = [key for key in expected_keys if key not in answered]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        raise ValueError(
            f"{answers_path} has no answer for {len(missing)} {what} question(s), e.g. {shown}; "
            "finish the generation (it resumes where it stopped) or evaluate the matching question file"
        )


def check_known(answered_keys: Iterable, known: dict | set, what: str, answers_path) -> None:
    """Answers for questions the annotations do not know mean the wrong annotation file."""
    unknown = [key for key in answered_keys if key not in known]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5])
        raise ValueError(
            f"{answers_path} answers {len(unknown)} question(s) that are not in the {what} annotations, "
            f"e.g. {shown}: wrong annotation file or split?"
        )


def settings_path_for(answers_file) -> Path:
    """Where the generation settings of an answers file live: ``answers.jsonl`` -> ``answers.settings.json``."""
    answers_file = Path(answers_file)
    stem = answers_file.name[: -len(".jsonl")] if answers_file.name.endswith(".jsonl") else answers_file.name
    return answers_file.with_name(stem + ".settings.json")


def lock_path_for(answers_file) -> Path:
    """The lock a generation run holds on its answers file: ``answers.jsonl`` -> ``answers.jsonl.lock``."""
    answers_file = Path(answers_file)
    return answers_file.with_name(answers_file.name + ".lock")


def answers_lock(answers_file):
    """An exclusive ``llava.utils_io.FileLock`` on an answers file: a second generation of the same shard
    (launched twice by mistake) is refused instead of appending duplicate answers."""
    from llava.utils_io import FileLock

    return FileLock(lock_path_for(answers_file), what=f"answers file {answers_file}")
