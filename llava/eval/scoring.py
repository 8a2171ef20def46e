"""Local evaluators: score an answers file against a benchmark's annotations, in its own file formats.

Each ``score_<benchmark>`` returns a dict ``{"benchmark", "score", "metric", "metrics", "num_questions"}``:
``score`` is the headline number the paper tables use (on a 0-100 scale, or MME's 0-2800 points),
``metrics`` holds everything else (per split / category / subtask). Answers are always matched to
annotations by question id (never by line order) and a question without an answer is an error.
Inputs are checked against their schema first (``llava.eval.data_io``: one JSON object per line, answers
with a string ``text``, no empty or repeated question lists), and no score is computed over zero questions.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from .data_io import (
    answers_by_id,
    check_coverage,
    check_known,
    index_unique,
    read_answers,
    read_json,
    read_jsonl,
    read_tsv,
    require_fields,
    require_questions,
)
from .normalize import (
    extract_choice,
    parse_mme_yes_no,
    parse_yes_no,
    vqa_accuracy,
)

SHORT_ANSWER_HINT = "Answer the question using a single word or phrase."


def _result(benchmark: str, metric: str, metrics: dict, num_questions: int) -> dict:
    if num_questions < 1:
        raise ValueError(f"{benchmark}: no questions were scored; a score over zero questions is not a score")
    return {
        "benchmark": benchmark,
        "metric": metric,
        "score": metrics[metric],
        "metrics": metrics,
        "num_questions": num_questions,
    }


def _pct(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def _str_id(record: dict) -> str:
    # ids are ints in some files and strings in others (GQA, SEED): compare them as text
    return str(record["question_id"])


def _expected_ids(question_file, annotation_ids, what: str) -> list[str]:
    """The questions to score: those of the question file when given (it may be a subset of the
    annotations), else every annotated question."""
    if question_file is None:
        return require_questions(list(annotation_ids), what, "the annotations")
    questions = read_jsonl(question_file)
    for n, q in enumerate(questions, 1):
        require_fields(q, ("question_id",), f"{question_file} question #{n}")
    ids = require_questions([_str_id(q) for q in questions], what, question_file)
    check_known(ids, set(annotation_ids), what, question_file)
    return ids


def _load_answers(result_file) -> dict:
    return answers_by_id(result_file, key_of=_str_id)


# ----------------------------------------------------------------------------------------------- TextVQA


_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:")


def textvqa_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt (which adds OCR tokens and a hint around it), lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        found = _OCR_QUESTION.findall(prompt)
        question = found[0] if found else lines[0]
    elif "Reference OCR token: " in prompt and len(lines) == 3 and prompt.startswith("Reference OCR token:"):
        question = lines[1]
    else:
        question = lines[0]
    return question.strip().lower()


def score_textvqa(annotation_file, result_file, question_file=None) -> dict:
    """VQA accuracy (official normalisation, min(#humans/3, 1) over the 10-choose-9 subsets).

    LLaVA's TextVQA question file uses the *image* id as ``question_id`` (an image has several questions):
    an answer is matched to its annotation by (image id, question text), or by TextVQA's own question id
    when that is what the answers carry."""
    annotations = read_json(annotation_file)
    if not isinstance(annotations, dict) or "data" not in annotations:
        raise ValueError(f"{annotation_file}: expected TextVQA annotations {{'data': [...]}}")
    by_id = index_unique(annotations["data"], _str_id, f"TextVQA annotations {annotation_file}")
    by_image_question = {(str(a["image_id"]), a["question"].strip().lower()): qid for qid, a in by_id.items()}

    def resolve(record: dict, text_field: str) -> str:
        key = (str(record["question_id"]), textvqa_question(record.get(text_field) or ""))
        if key in by_image_question:
            return by_image_question[key]
        if str(record["question_id"]) in by_id:
            return str(record["question_id"])
        raise ValueError(
            f"question {record['question_id']!r} ({key[1]!r}) is not in the TextVQA annotations "
            f"{annotation_file}: wrong annotation file or split?"
        )

    records = read_answers(result_file)
    answers = index_unique(records, lambda r: resolve(r, "prompt"), f"answers file {result_file}")
    if question_file is None:
        expected = require_questions(list(by_id), "TextVQA", annotation_file)
    else:
        expected = require_questions([resolve(q, "text") for q in read_jsonl(question_file)], "TextVQA", question_file)
    check_coverage(expected, answers, "TextVQA", result_file)
    scores = [vqa_accuracy(answers[qid]["text"], by_id[qid]["answers"]) for qid in expected]
    return _result("textvqa", "accuracy", {"accuracy": _pct(sum(scores), len(scores))}, len(scores))


# -------------------------------------------------------------------------------------------------- GQA


def normalize_gqa_prediction(text: str) -> str:
    # as LLaVA's GQA conversion: lower-case, trailing periods removed
    return text.strip().rstrip(".").lower()


def score_gqa(annotation_file, result_file, question_file=None) -> dict:
    """Exact-match accuracy against ``testdev_balanced_questions.json`` ({question id: {"answer", ...}})."""
    annotations = read_json(annotation_file)
    if not isinstance(annotations, dict):
        raise ValueError(f"{annotation_file}: expected GQA questions {{question_id: {{'answer': ...}}}}")
    annotations = {str(k): v for k, v in annotations.items()}
    if not annotations:
        raise ValueError(f"{annotation_file} holds no GQA questions: nothing to score")
    answers = _load_answers(result_file)
    check_known(answers, annotations, "GQA", result_file)
    expected = _expected_ids(question_file, annotations, "GQA")
    check_coverage(expected, answers, "GQA", result_file)
    correct = 0
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for qid in expected:
        gold = annotations[qid]
        require_fields(gold, ("answer",), f"{annotation_file} question {qid}")
        hit = int(normalize_gqa_prediction(answers[qid]["text"]) == str(gold["answer"]).strip().lower())
        correct += hit
        structural = (gold.get("types") or {}).get("structural")
        if structural:
            by_type[structural][0] += hit
            by_type[structural][1] += 1
    metrics = {"accuracy": _pct(correct, len(expected))}
    metrics.update({f"accuracy_{name}": _pct(c, n) for name, (c, n) in sorted(by_type.items())})
    return _result("gqa", "accuracy", metrics, len(expected))


# ------------------------------------------------------------------------------------------------- POPE

POPE_CATEGORIES = ("adversarial", "popular", "random")


def _question_stem(text: str) -> str:
    """The question itself: the first line of a LLaVA prompt, whitespace collapsed."""
    return " ".join(text.strip().split("\n")[0].split())


def binary_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 (positive = "yes") and the share of "yes" answers, in percent."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(predictions, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(predictions, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(predictions, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(predictions, labels))
    total = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _pct(tp + tn, total),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": _pct(tp + fp, total),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "total": total,
    }


def score_pope(annotation_dir, question_file, result_file) -> dict:
    """Per split (adversarial / popular / random) accuracy, precision, recall, F1 and yes-ratio;
    the headline is the F1 averaged over the splits present.

    Answers are joined to their question by question id; a question is joined to its label by
    (split, image, question text) in ``coco_pope_<split>.json``.
    """
    # [VisionZip-LLaVA] the original pairs answers with labels by line order within a split, which silently
    # mis-scores a shuffled or resumed (out-of-order) answers file; here every pair is joined by identity.
    annotation_dir = Path(annotation_dir)
    questions = read_jsonl(question_file)
    for n, q in enumerate(questions, 1):
        require_fields(q, ("question_id", "image", "text", "category"), f"{question_file} question #{n}")
    require_questions([_str_id(q) for q in questions], "POPE", question_file)
    questions_by_id = index_unique(questions, _str_id, f"POPE question file {question_file}")
    answers = _load_answers(result_file)
    check_known(answers, questions_by_id, "POPE question-file", result_file)
    check_coverage(questions_by_id, answers, "POPE", result_file)

    per_split: dict[str, dict] = {}
    categories = sorted({q["category"] for q in questions})
    unknown = [c for c in categories if c not in POPE_CATEGORIES]
    if unknown:
        raise ValueError(f"{question_file}: unknown POPE categories {unknown}; expected {list(POPE_CATEGORIES)}")
    for category in categories:
        label_file = annotation_dir / f"coco_pope_{category}.json"
        labels = index_unique(
            read_jsonl(label_file), lambda r: (r["image"], _question_stem(r["text"])), f"POPE labels {label_file}"
        )
        predictions, golds = [], []
        for qid, question in questions_by_id.items():
            if question["category"] != category:
                continue
            key = (question["image"], _question_stem(question["text"]))
            if key not in labels:
                raise ValueError(f"{label_file} has no label for question {qid} ({key[0]}: {key[1]!r})")
            label = str(labels[key]["label"]).strip().lower()
            golds.append("no" if label == "no" else "yes")
            predictions.append(parse_yes_no(answers[qid]["text"]))
        per_split[category] = binary_metrics(predictions, golds)

    metrics: dict = {}
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        metrics[name] = sum(s[name] for s in per_split.values()) / len(per_split)
        for category, split_metrics in per_split.items():
            metrics[f"{category}_{name}"] = split_metrics[name]
    metrics["splits"] = per_split
    return _result("pope", "f1", metrics, len(questions_by_id))


# -------------------------------------------------------------------------------------------------- MME

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _mme_question(text: str) -> str:
    # LLaVA may append its short-answer hint; MME's own files sometimes have two spaces before
    # "Please answer yes or no.": compare questions with the hint removed and whitespace collapsed.
    return " ".join(text.replace(SHORT_ANSWER_HINT, " ").split())


def read_mme_ground_truth(gt_dir) -> dict:
    """{(category, image stem, question): "Yes"/"No"} from ``MME_Benchmark_release_version``:
    each category folder holds ``<image>.txt`` files (directly or under ``questions_answers_YN/``)
    with one ``question<TAB>answer`` line per question."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"MME ground-truth folder {gt_dir} does not exist")
    truth = {}
    for category_dir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN"
        qa_dir = qa_dir if qa_dir.is_dir() else category_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for line_no, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    raise ValueError(f"{txt}:{line_no}: expected 'question<TAB>answer', got {line!r}")
                truth[(category_dir.name, txt.stem, _mme_question(parts[0]))] = parts[1].strip()
    if not truth:
        raise ValueError(f"{gt_dir} holds no MME question files (<category>/[questions_answers_YN/]*.txt)")
    return truth


def mme_key(record: dict) -> tuple[str, str]:
    """MME reuses the image path as question id for both questions of an image: key by id and text."""
    return str(record["question_id"]), record.get("prompt", record.get("text"))


def score_mme(gt_dir, question_file, result_file) -> dict:
    """Per subtask: acc (questions) + acc+ (images whose two questions are both right), score =
    acc + acc+ in percent points (max 200); perception = sum of the 10 perception subtasks, cognition
    of the 4 cognition ones; the headline is perception + cognition."""
    truth = read_mme_ground_truth(gt_dir)
    questions = read_jsonl(question_file)
    for n, q in enumerate(questions, 1):
        require_fields(q, ("question_id", "text"), f"{question_file} question #{n}")
    require_questions([mme_key(q) for q in questions], "MME", question_file)
    questions_by_key = index_unique(questions, mme_key, f"MME question file {question_file}")
    answer_records = read_answers(result_file, ("prompt",))
    answers = index_unique(answer_records, mme_key, f"answers file {result_file}")
    check_known(answers, questions_by_key, "MME question-file", result_file)
    check_coverage(questions_by_key, answers, "MME", result_file)

    # category -> image -> [correct?]
    outcome: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for key, question in questions_by_key.items():
        qid = str(question["question_id"])
        category = question.get("category") or qid.split("/")[0]
        image = Path(question.get("image") or qid).stem
        gt_key = (category, image, _mme_question(question["text"]))
        if gt_key not in truth:
            raise ValueError(f"MME ground truth in {gt_dir} has no question {gt_key[2]!r} for image {image!r} "
                             f"in category {category!r}")
        gold = truth[gt_key].lower()
        outcome[category][image].append(parse_mme_yes_no(answers[key]["text"]) == gold)

    unknown = sorted(set(outcome) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        raise ValueError(f"unknown MME categories {unknown}; known: {MME_PERCEPTION + MME_COGNITION}")
    metrics: dict = {}
    subtasks = {}
    for category, images in outcome.items():
        flat = [hit for hits in images.values() for hit in hits]
        acc = _pct(sum(flat), len(flat))
        acc_plus = _pct(sum(all(hits) for hits in images.values()), len(images))
        subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                              "questions": len(flat), "images": len(images)}
    metrics["perception"] = sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks)
    metrics["cognition"] = sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks)
    metrics["total"] = metrics["perception"] + metrics["cognition"]
    metrics["subtasks"] = subtasks
    metrics["missing_subtasks"] = [c for c in MME_PERCEPTION + MME_COGNITION if c not in subtasks]
    return _result("mme", "total", metrics, len(questions_by_key))


# ------------------------------------------------------------------------------------------- ScienceQA

SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_letter(text: str) -> str | None:
    """LLaVA's ScienceQA reading: the bare letter, "X. ...", or a single "The answer is X."."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def score_scienceqa(base_dir, result_file, split: str = "test") -> dict:
    """Accuracy over the split and on its questions with an image (SQA-IMG, the headline)."""
    base_dir = Path(base_dir)
    problems = read_json(base_dir / "problems.json")
    splits = read_json(base_dir / "pid_splits.json")
    if split not in splits:
        raise ValueError(f"{base_dir / 'pid_splits.json'} has no split {split!r}; it has {sorted(splits)}")
    ids = require_questions([str(i) for i in splits[split]], f"ScienceQA {split}-split", base_dir / "pid_splits.json")
    check_known(ids, problems, "ScienceQA problems.json", base_dir / "pid_splits.json")
    answers = _load_answers(result_file)
    check_known(answers, set(ids), f"ScienceQA {split}-split", result_file)
    check_coverage(ids, answers, f"ScienceQA {split}", result_file)
    correct = img_correct = img_total = unparsed = 0
    for pid in ids:
        problem = problems[pid]
        letter = parse_scienceqa_letter(answers[pid]["text"])
        # [VisionZip-LLaVA] an answer that names no option counts as wrong (as the original's effective
        # behaviour) and is counted, so that a prompt/format problem shows in the results.
        unparsed += letter is None
        valid = SQA_OPTIONS[: len(problem["choices"])]
        hit = letter in valid and valid.index(letter) == int(problem["answer"])
        correct += hit
        if problem.get("image"):
            img_total += 1
            img_correct += hit
    metrics = {
        "accuracy": _pct(correct, len(ids)),
        "img_accuracy": _pct(img_correct, img_total),
        "img_questions": img_total,
        "unparsed": unparsed,
    }
    return _result("sqa", "img_accuracy", metrics, len(ids))


# ------------------------------------------------------------------------------------------------- SEED


def score_seed(annotation_file, result_file, question_file=None) -> dict:
    """Accuracy on SEED-Bench (image questions, video questions, all; per question type)."""
    annotations = read_json(annotation_file)
    if not isinstance(annotations, dict) or "questions" not in annotations:
        raise ValueError(f"{annotation_file}: expected SEED-Bench.json with a 'questions' list")
    by_id = index_unique(annotations["questions"], _str_id, f"SEED annotations {annotation_file}")
    type_names = {int(v): k for k, v in (annotations.get("question_type") or {}).items()}
    answers = _load_answers(result_file)
    check_known(answers, by_id, "SEED", result_file)
    expected = _expected_ids(question_file, by_id, "SEED")
    check_coverage(expected, answers, "SEED", result_file)
    tallies: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for qid in expected:
        question = by_id[qid]
        # [VisionZip-LLaVA] the original compares the raw answer with the letter; "B." or "(B)" count here.
        hit = int(extract_choice(answers[qid]["text"], num_options=4) == str(question["answer"]).strip())
        groups = ["all", "video" if question.get("data_type") == "video" else "image"]
        if "question_type_id" in question:
            type_id = int(question["question_type_id"])
            groups.append("type_" + type_names.get(type_id, str(type_id)).replace(" ", "_"))
        for group in groups:
            tallies[group][0] += hit
            tallies[group][1] += 1
    metrics = {"accuracy": _pct(*tallies["all"])}
    for group in ("image", "video"):
        if group in tallies:
            metrics[f"{group}_accuracy"] = _pct(*tallies[group])
    metrics.update({f"accuracy_{g[5:]}": _pct(*t) for g, t in sorted(tallies.items()) if g.startswith("type_")})
    return _result("seed", "accuracy", metrics, len(expected))


# ---------------------------------------------------------------------------------------------- MMBench

MMBENCH_LETTERS = ("A", "B", "C", "D")
# The published MMBench tsv files hold the circular copies of a question at index + k * 1e6.
MMBENCH_CIRCULAR_STRIDE = 1_000_000


def is_missing(value) -> bool:
    return value is None or str(value).strip().lower() in ("", "nan", "none")


def mmbench_options(row: dict) -> list[str]:
    """The row's options A, B, C, D up to the first empty one."""
    options = []
    for letter in MMBENCH_LETTERS:
        if is_missing(row.get(letter)):
            break
        options.append(row[letter])
    return options


def rotate(options: list, shift: int) -> list:
    """Options as shown in circular round ``shift``: the list rotated left ``shift`` times."""
    shift %= max(len(options), 1)
    return options[shift:] + options[:shift]


def mmbench_key(record: dict) -> tuple[str, int]:
    return str(record["question_id"]), int(record.get("round_id", 0))


def score_mmbench(annotation_file, result_file) -> dict:
    """Circular evaluation: a question counts only if every variant is right, its rotations asked with
    ``--all-rounds`` and its circular copies in the tsv (index + k * 1e6) alike."""
    # [VisionZip-LLaVA] MMBench's server reads the option with ChatGPT when heuristics fail; locally an answer
    # that names no option (letter, "the answer is X", or an option's exact text) counts as wrong.
    rows = read_tsv(annotation_file)
    for n, row in enumerate(rows, 2):
        require_fields(row, ("index", "question", "A", "B"), f"{annotation_file}:{n}")
        if is_missing(row.get("answer")):
            raise ValueError(
                f"{annotation_file}:{n} has no answer: a test split is scored by the MMBench server "
                "(use `python -m llava.eval.convert mmbench-submission`)"
            )
    require_questions([str(r["index"]) for r in rows], "MMBench", annotation_file)
    rows_by_index = index_unique(rows, lambda r: str(r["index"]), f"MMBench tsv {annotation_file}")
    answer_records = read_answers(result_file)
    answers = index_unique(answer_records, mmbench_key, f"answers file {result_file}")
    check_known({key[0] for key in answers}, rows_by_index, "MMBench", result_file)
    all_rounds = any(round_id > 0 for _, round_id in answers)

    groups: dict[int, list[bool]] = defaultdict(list)
    group_category: dict[int, str] = {}
    single_hits = []
    unparsed = 0
    for index, row in rows_by_index.items():
        options = mmbench_options(row)
        answer = row["answer"].strip()
        if answer not in MMBENCH_LETTERS[: len(options)]:
            raise ValueError(f"{annotation_file}: question {index} has answer {answer!r} but options {options}")
        gold = MMBENCH_LETTERS.index(answer)
        rounds = range(len(options)) if all_rounds else range(1)
        check_coverage([(index, r) for r in rounds], answers, "MMBench (question, round)", result_file)
        main = int(float(index)) % MMBENCH_CIRCULAR_STRIDE
        for round_id in rounds:
            shown = rotate(options, round_id)
            letter = extract_choice(answers[(index, round_id)]["text"], shown)
            unparsed += letter is None
            hit = letter is not None and letter == MMBENCH_LETTERS[(gold - round_id) % len(options)]
            groups[main].append(hit)
            if round_id == 0 and int(float(index)) < MMBENCH_CIRCULAR_STRIDE:
                single_hits.append(hit)
        group_category[main] = row.get("l2-category") or row.get("category") or "unknown"

    circular = {main: all(hits) for main, hits in groups.items()}
    metrics: dict = {
        "circular_accuracy": _pct(sum(circular.values()), len(circular)),
        "single_pass_accuracy": _pct(sum(single_hits), len(single_hits)),
        "variant_accuracy": _pct(sum(sum(h) for h in groups.values()), sum(len(h) for h in groups.values())),
        "questions": len(circular),
        "variants": sum(len(h) for h in groups.values()),
        "unparsed": unparsed,
        "all_rounds": all_rounds,
    }
    by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for main, ok in circular.items():
        by_category[group_category[main]][0] += ok
        by_category[group_category[main]][1] += 1
    metrics["categories"] = {c: _pct(*t) for c, t in sorted(by_category.items())}
    return _result("mmbench", "circular_accuracy", metrics, len(circular))


# ------------------------------------------------------------------------------------------------- MMMU

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def _numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def open_answer_matches(prediction: str, gold) -> bool:
    """An open MMMU answer is right if it states one of the gold answers: the same number (to 2 decimals)
    when the gold is numeric, else the normalised gold text inside the normalised prediction."""
    golds = gold if isinstance(gold, list) else [gold]
    pred_text = " ".join(prediction.lower().strip().rstrip(".").split())
    pred_numbers = [round(x, 2) for x in _numbers(prediction)]
    for g in golds:
        g_text = " ".join(str(g).lower().strip().rstrip(".").split())
        g_numbers = _numbers(g_text)
        if g_numbers and _NUMBER.fullmatch(g_text.replace(" ", "")):
            if round(g_numbers[0], 2) in pred_numbers:
                return True
        elif g_text and g_text in pred_text:
            return True
    return False


def score_mmmu(question_file, result_file) -> dict:
    """Accuracy on MMMU (multiple-choice by option letter, open questions by answer matching)."""
    # [VisionZip-LLaVA] MMMU's own scorer guesses a random option when none can be read and has a longer
    # list of open-answer heuristics; here an unreadable answer is wrong and matching is the simple rule
    # of ``open_answer_matches``: deterministic, and the same for every compression setting compared.
    questions = read_jsonl(question_file)
    for n, q in enumerate(questions, 1):
        require_fields(q, ("question_id", "answer"), f"{question_file} question #{n}")
    require_questions([_str_id(q) for q in questions], "MMMU", question_file)
    by_id = index_unique(questions, _str_id, f"MMMU question file {question_file}")
    answers = _load_answers(result_file)
    check_known(answers, by_id, "MMMU question-file", result_file)
    check_coverage(by_id, answers, "MMMU", result_file)
    tallies: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for qid, question in by_id.items():
        prediction = answers[qid]["text"]
        options = question.get("options") or []
        if question.get("question_type", "multiple-choice") == "multiple-choice" and options:
            hit = extract_choice(prediction, options) == str(question["answer"]).strip()
            kind = "multiple_choice"
        else:
            hit = open_answer_matches(prediction, question["answer"])
            kind = "open"
        for group in ("all", kind, "subject_" + str(question.get("subject", "unknown"))):
            tallies[group][0] += int(hit)
            tallies[group][1] += 1
    metrics = {"accuracy": _pct(*tallies["all"])}
    for kind in ("multiple_choice", "open"):
        if kind in tallies:
            metrics[f"{kind}_accuracy"] = _pct(*tallies[kind])
    metrics.update({f"accuracy_{g[8:]}": _pct(*t) for g, t in sorted(tallies.items()) if g.startswith("subject_")})
    return _result("mmmu", "accuracy", metrics, len(by_id))


# ------------------------------------------------------------------------ LLaVA-Bench (judge's reviews)


def score_llavabench_reviews(review_file, question_file=None) -> dict:
    """Summarise an external judge's reviews of LLaVA-Bench answers: each review line carries
    ``tuple`` = [reference answer score, model answer score]; the score is the ratio of the mean model
    score to the mean reference score, in percent (overall and per category)."""
    reviews = read_jsonl(review_file)
    categories = {}
    if question_file is not None:
        categories = {_str_id(q): q.get("category", "all") for q in read_jsonl(question_file)}
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for n, review in enumerate(reviews, 1):
        require_fields(review, ("tuple",), f"{review_file} review #{n}")
        pair = review["tuple"]
        if not isinstance(pair, list) or len(pair) != 2 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in pair
        ):
            raise ValueError(f"{review_file} review #{n}: 'tuple' must be [reference score, model score], got {pair!r}")
        reference, model = (float(x) for x in pair)
        category = review.get("category") or categories.get(str(review.get("question_id")), "unknown")
        for group in ("all", category):
            sums[group][0] += reference
            sums[group][1] += model
            sums[group][2] += 1
    if not sums:
        raise ValueError(f"{review_file} has no reviews")
    metrics = {"relative_score": _pct(sums["all"][1], sums["all"][0])}
    metrics.update({f"relative_score_{g}": _pct(s[1], s[0]) for g, s in sorted(sums.items()) if g != "all"})
    return _result("llavabench", "relative_score", metrics, int(sums["all"][2]))
