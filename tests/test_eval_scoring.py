"""Local evaluators on small hand-made annotation and answer files; expected scores worked out by hand."""
from __future__ import annotations

import json
import random

import pytest

from llava.eval import scoring
from llava.eval.data_io import write_json, write_jsonl, write_tsv
from llava.eval.normalize import extract_choice, normalize_vqa_answer, parse_yes_no, vqa_accuracy


def answers(*pairs, prompts=None):
    """Answer records as the generation engine writes them: (question_id, text) pairs."""
    return [{"question_id": qid, "prompt": (prompts or {}).get(qid, "q"), "text": text, "answer_id": "x",
             "model_id": "m", "metadata": {}} for qid, text in pairs]


# --------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The Dog.", "dog"),  # article and final period dropped, lower-cased
        ("Two", "2"),  # number words become digits
        ("coca-cola", "coca cola"),  # a hyphen inside a word becomes a space
        ("The Coca-Cola", "coca cola"),
        ("hi - there", "hi there"),  # punctuation touching a space is removed
        ("1,000", "1000"),  # commas are dropped
        ("3.5", "3.5"),  # a period before a digit stays
        ("dont", "don't"),  # apostrophe-less contractions are repaired
        ("couldnt've", "couldn't've"),
        ("mcdonald's", "mcdonald 's"),  # "'s" is split off
        ("  yes\n", "yes"),
        ("a man (left)", "man left"),
        ("its", "its"),  # an ordinary word is not taken for a contraction
    ],
)
def test_vqa_normalisation(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_is_the_leave_one_out_average():
    # 1 human agreeing: 9 of the 10 subsets keep that human (1/3 each), one drops it (0) -> 9/30
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # 2 humans: 2 subsets with 1 left (1/3), 8 with 2 (2/3) -> 18/30
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    # 3 humans: 3 subsets with 2 left (2/3), 7 with 3 (1) -> 27/30
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("bird", ["cat"] * 10) == 0.0


def test_yes_no_and_choice_parsing():
    assert parse_yes_no("Yes, there is a dog.") == "yes"
    assert parse_yes_no("There is not a dog in the image.") == "no"
    assert parse_yes_no("No") == "no"
    assert parse_yes_no("Yes. There is no cat.") == "yes"  # only the first sentence counts
    assert extract_choice("B") == "B"
    assert extract_choice("(C) a cat", num_options=4) == "C"
    assert extract_choice("D.", num_options=4) == "D"
    assert extract_choice("The answer is B.") == "B"
    assert extract_choice("E", num_options=4) is None  # beyond the options
    assert extract_choice("blue", ["red", "blue"]) == "B"  # by option text
    assert extract_choice("I am not sure", ["red", "blue"]) is None


# --------------------------------------------------------------------------------------------- TextVQA


def test_textvqa(tmp_path):
    data = [
        # normalised: "2" x3 ("2", "2", "Two"), "2 dogs", "3" x6  -> pred "two." = "2": 3 humans -> 0.9
        {"question_id": 11, "image_id": "img_a", "question": "How many?",
         "answers": ["2", "2", "Two", "two dogs"] + ["3"] * 6},
        # "The Coca-Cola" and "coca cola" both normalise to "coca cola": 2 humans -> 0.6
        {"question_id": 12, "image_id": "img_a", "question": "what brand?",
         "answers": ["The Coca-Cola", "coca cola"] + ["pepsi"] * 8},
        # "dont" -> "don't" on both sides: 4 humans -> 1.0
        {"question_id": 13, "image_id": "img_c", "question": "what does the sign say?",
         "answers": ["dont"] * 4 + ["no"] * 6},
        {"question_id": 14, "image_id": "img_d", "question": "is it open?", "answers": ["yes"] * 10},  # "No" -> 0
    ]
    write_json(tmp_path / "ann.json", {"data": data})
    hint = "\nReference OCR token: Coca, Cola\nAnswer the question using a single word or phrase."
    # LLaVA's question file: question_id is the image id, the question is the prompt's first line
    questions = [{"question_id": a["image_id"], "image": a["image_id"] + ".jpg", "text": a["question"] + hint}
                 for a in data]
    write_jsonl(tmp_path / "q.jsonl", questions)
    replies = {11: "two.", 12: "Coca-Cola", 13: "don't", 14: "No"}

    def llava_answers(order):
        return [{"question_id": questions[i]["question_id"], "prompt": questions[i]["text"],
                 "text": replies[data[i]["question_id"]]} for i in order]

    # answers in another order than the annotations, two of them on the same image
    write_jsonl(tmp_path / "ans.jsonl", llava_answers([3, 1, 0, 2]))
    result = scoring.score_textvqa(tmp_path / "ann.json", tmp_path / "ans.jsonl", tmp_path / "q.jsonl")
    assert result["score"] == pytest.approx(100 * (0.9 + 0.6 + 1.0 + 0.0) / 4)
    assert result["num_questions"] == 4
    # answers that carry TextVQA's own question ids are matched by them
    write_jsonl(tmp_path / "by_id.jsonl", answers(*replies.items()))
    assert scoring.score_textvqa(tmp_path / "ann.json", tmp_path / "by_id.jsonl")["score"] == pytest.approx(62.5)

    # a question file restricts the scored questions
    write_jsonl(tmp_path / "q1.jsonl", questions[:1])
    write_jsonl(tmp_path / "ans1.jsonl", llava_answers([0]))
    assert scoring.score_textvqa(tmp_path / "ann.json", tmp_path / "ans1.jsonl", tmp_path / "q1.jsonl")["score"] == \
        pytest.approx(90.0)

    write_jsonl(tmp_path / "missing.jsonl", llava_answers([0, 1]))
    with pytest.raises(ValueError, match=r"no answer for 2 TextVQA question\(s\), e.g. '13', '14'"):
        scoring.score_textvqa(tmp_path / "ann.json", tmp_path / "missing.jsonl", tmp_path / "q.jsonl")
    write_jsonl(tmp_path / "unknown.jsonl", llava_answers([0]) + answers((99, "x")))
    with pytest.raises(ValueError, match="question 99 .* is not in the TextVQA annotations"):
        scoring.score_textvqa(tmp_path / "ann.json", tmp_path / "unknown.jsonl")
    write_jsonl(tmp_path / "dup.jsonl", llava_answers([0, 0]))
    with pytest.raises(ValueError, match="duplicate"):
        scoring.score_textvqa(tmp_path / "ann.json", tmp_path / "dup.jsonl")
    assert scoring.textvqa_question("OCR tokens: a b Question: What is it? Short answer:") == "what is it?"


# ------------------------------------------------------------------------------------------------ POPE


def _pope_files(tmp_path):
    hint = "\nAnswer the question using a single word or phrase."
    questions = []
    labels = {"adversarial": [], "random": []}
    spec = {  # (question id, image, object, label, answer)
        "adversarial": [(1, "a.jpg", "dog", "yes", "Yes, there is."), (2, "a.jpg", "cat", "no", "No."),
                        (3, "b.jpg", "cup", "yes", "There is not a cup"), (4, "b.jpg", "car", "no", "yes")],
        "random": [(5, "c.jpg", "dog", "yes", "Yes"), (6, "d.jpg", "man", "yes", "yes."),
                   (7, "d.jpg", "kite", "no", "Yes, a kite.")],
    }
    replies = []
    for category, rows in spec.items():
        for n, (qid, image, obj, label, reply) in enumerate(rows):
            text = f"Is there a {obj} in the image?"
            questions.append({"question_id": qid, "image": image, "text": text + hint, "category": category})
            # label files number their own questions and are in another order than the question file
            labels[category].append({"question_id": 100 - n, "image": image, "text": text, "label": label})
            replies.append((qid, reply))
    (tmp_path / "coco").mkdir()
    for category, rows in labels.items():
        write_jsonl(tmp_path / "coco" / f"coco_pope_{category}.json", list(reversed(rows)))
    write_jsonl(tmp_path / "q.jsonl", questions)
    return replies


def test_pope_metrics_per_split_and_order_independence(tmp_path):
    replies = _pope_files(tmp_path)
    random.Random(3).shuffle(replies)
    write_jsonl(tmp_path / "ans.jsonl", answers(*replies))
    result = scoring.score_pope(tmp_path / "coco", tmp_path / "q.jsonl", tmp_path / "ans.jsonl")
    adv, rnd = result["metrics"]["splits"]["adversarial"], result["metrics"]["splits"]["random"]
    # adversarial: predictions yes, no, no ("not"), yes vs labels yes, no, yes, no -> TP=FP=TN=FN=1
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (1, 1, 1, 1)
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert adv[name] == pytest.approx(50.0)
    # random: all "yes" vs yes, yes, no -> TP=2, FP=1: acc 2/3, precision 2/3, recall 1, F1 0.8, yes 100%
    assert rnd["accuracy"] == pytest.approx(200 / 3)
    assert rnd["precision"] == pytest.approx(200 / 3)
    assert rnd["recall"] == pytest.approx(100.0)
    assert rnd["f1"] == pytest.approx(80.0)
    assert rnd["yes_ratio"] == pytest.approx(100.0)
    assert result["score"] == pytest.approx((50.0 + 80.0) / 2)
    assert result["metric"] == "f1"

    # any other order of the answers gives the same scores
    write_jsonl(tmp_path / "ans_sorted.jsonl", answers(*sorted(replies)))
    again = scoring.score_pope(tmp_path / "coco", tmp_path / "q.jsonl", tmp_path / "ans_sorted.jsonl")
    assert again["metrics"]["splits"] == result["metrics"]["splits"]


def test_pope_missing_answer_and_label(tmp_path):
    replies = _pope_files(tmp_path)
    write_jsonl(tmp_path / "ans.jsonl", answers(*replies[:-1]))
    with pytest.raises(ValueError, match="no answer for 1 POPE question"):
        scoring.score_pope(tmp_path / "coco", tmp_path / "q.jsonl", tmp_path / "ans.jsonl")
    write_jsonl(tmp_path / "coco" / "coco_pope_random.json",
                [{"question_id": 1, "image": "c.jpg", "text": "Is there a dog in the image?", "label": "yes"}])
    write_jsonl(tmp_path / "ans.jsonl", answers(*replies))
    with pytest.raises(ValueError, match="has no label for question 6"):
        scoring.score_pope(tmp_path / "coco", tmp_path / "q.jsonl", tmp_path / "ans.jsonl")


# ------------------------------------------------------------------------------------------------- MME


def test_mme_pairs_and_scores(tmp_path):
    gt = tmp_path / "MME_Benchmark_release_version"
    # perception subtask, flat layout; cognition subtask, images/ + questions_answers_YN/ layout
    (gt / "existence").mkdir(parents=True)
    (gt / "code_reasoning" / "questions_answers_YN").mkdir(parents=True)
    pairs = {
        ("existence", "0001"): [("Is there a dog? Please answer yes or no.", "Yes"),
                                ("Is there a cat?  Please answer yes or no.", "No")],  # two spaces, as in MME
        ("existence", "0002"): [("Is there a car? Please answer yes or no.", "Yes"),
                                ("Is there a bus? Please answer yes or no.", "No")],
        ("code_reasoning", "0001"): [("Is the output 3? Please answer yes or no.", "Yes"),
                                     ("Is the output 4? Please answer yes or no.", "No")],
        ("code_reasoning", "0002"): [("Does it loop? Please answer yes or no.", "Yes"),
                                     ("Does it crash? Please answer yes or no.", "No")],
    }
    replies = {  # existence: image 1 both right, image 2 one right; code: one right per image
        ("existence", "0001"): ["Yes", "no, it is not"], ("existence", "0002"): ["No", "No"],
        ("code_reasoning", "0001"): ["yes", "Yes"], ("code_reasoning", "0002"): ["maybe", "no"],
    }
    questions, records = [], []
    for (category, stem), qa in pairs.items():
        folder = gt / category / ("questions_answers_YN" if category == "code_reasoning" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa), encoding="utf-8")
        image = f"{category}/{'images/' if category == 'code_reasoning' else ''}{stem}.png"
        for (q, _), reply in zip(qa, replies[(category, stem)]):
            text = " ".join(q.split())  # LLaVA's question file has single spaces
            questions.append({"question_id": image, "image": image, "text": text, "category": category})
            records.append({"question_id": image, "prompt": text, "text": reply})
    write_jsonl(tmp_path / "q.jsonl", questions)
    write_jsonl(tmp_path / "ans.jsonl", list(reversed(records)))
    result = scoring.score_mme(gt, tmp_path / "q.jsonl", tmp_path / "ans.jsonl")
    sub = result["metrics"]["subtasks"]
    # existence: 3/4 questions right (75), 1/2 images with both right (50) -> 125
    assert (sub["existence"]["acc"], sub["existence"]["acc_plus"], sub["existence"]["score"]) == \
        pytest.approx((75.0, 50.0, 125.0))
    # code_reasoning: 2/4 right ("maybe" is neither yes nor no), no image with both right -> 50
    assert (sub["code_reasoning"]["acc"], sub["code_reasoning"]["acc_plus"]) == pytest.approx((50.0, 0.0))
    assert result["metrics"]["perception"] == pytest.approx(125.0)
    assert result["metrics"]["cognition"] == pytest.approx(50.0)
    assert result["score"] == pytest.approx(175.0)
    assert "count" in result["metrics"]["missing_subtasks"]

    records[1]["question_id"] = "existence/0009.png"  # an answer to a question the file does not have
    write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match="not in the MME question-file"):
        scoring.score_mme(gt, tmp_path / "q.jsonl", tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------------------- ScienceQA


def test_scienceqa_overall_and_img(tmp_path):
    problems = {
        "1": {"choices": ["a", "b"], "answer": 0, "image": "image.png", "split": "test"},
        "2": {"choices": ["a", "b", "c"], "answer": 1, "image": None, "split": "test"},
        "3": {"choices": ["a", "b", "c", "d"], "answer": 3, "image": "image.png", "split": "test"},
        "4": {"choices": ["a", "b", "c", "d"], "answer": 3, "image": "image.png", "split": "test"},
        "5": {"choices": ["a", "b"], "answer": 0, "image": None, "split": "val"},
    }
    write_json(tmp_path / "problems.json", problems)
    write_json(tmp_path / "pid_splits.json", {"test": ["1", "2", "3", "4"], "val": ["5"]})
    # 1 right (image), 2 right ("B. ..."), 3 wrong ("The answer is C."), 4 unreadable (wrong)
    write_jsonl(tmp_path / "ans.jsonl", answers(("4", "I think it is d"), ("1", "A"), ("3", "The answer is C."),
                                                ("2", "B. b")))
    result = scoring.score_scienceqa(tmp_path, tmp_path / "ans.jsonl")
    assert result["metrics"]["accuracy"] == pytest.approx(50.0)
    assert result["score"] == pytest.approx(100 / 3)  # IMG: 1 of the 3 image questions
    assert result["metrics"]["img_questions"] == 3
    assert result["metrics"]["unparsed"] == 1
    with pytest.raises(ValueError, match="no split 'dev'"):
        scoring.score_scienceqa(tmp_path, tmp_path / "ans.jsonl", split="dev")


# ------------------------------------------------------------------------------------------ GQA / SEED


def test_gqa(tmp_path):
    write_json(tmp_path / "gqa.json", {"201": {"answer": "yes"}, "202": {"answer": "left"}, "203": {"answer": "red"},
                                       "204": {"answer": "no"}})
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": q, "image": "x.jpg", "text": "?"} for q in ("201", "202", "203")])
    write_jsonl(tmp_path / "ans.jsonl", answers(("203", "blue"), ("201", "Yes."), ("202", " Left")))
    result = scoring.score_gqa(tmp_path / "gqa.json", tmp_path / "ans.jsonl", tmp_path / "q.jsonl")
    assert result["score"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="'204'"):  # without the question file, all annotations count
        scoring.score_gqa(tmp_path / "gqa.json", tmp_path / "ans.jsonl")


def test_seed(tmp_path):
    questions = [
        {"question_id": "1", "answer": "B", "question_type_id": 1, "data_type": "image"},
        {"question_id": "2", "answer": "C", "question_type_id": 1, "data_type": "image"},
        {"question_id": "3", "answer": "D", "question_type_id": 2, "data_type": "image"},
        {"question_id": "4", "answer": "D", "question_type_id": 10, "data_type": "video"},
    ]
    write_json(tmp_path / "seed.json", {"questions": questions, "question_type": {"Scene Understanding": 1,
                                                                                  "Instance Identity": 2}})
    write_jsonl(tmp_path / "ans.jsonl", answers(("1", "B"), ("2", "(C) a cat"), ("3", "A"), ("4", "D.")))
    result = scoring.score_seed(tmp_path / "seed.json", tmp_path / "ans.jsonl")
    m = result["metrics"]
    assert result["score"] == pytest.approx(75.0)
    assert m["image_accuracy"] == pytest.approx(200 / 3)
    assert m["video_accuracy"] == pytest.approx(100.0)
    assert m["accuracy_Scene_Understanding"] == pytest.approx(100.0)
    assert m["accuracy_Instance_Identity"] == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------- MMBench

FIELDS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"]


def _row(index, options, answer, category="color"):
    padded = options + ["nan"] * (4 - len(options))
    return {"index": str(index), "question": "q?", "hint": "nan", "A": padded[0], "B": padded[1], "C": padded[2],
            "D": padded[3], "answer": answer, "category": category, "image": "", "l2-category": category}


def test_mmbench_circular_copies_in_the_tsv(tmp_path):
    rows = [
        _row(0, ["red", "blue", "green"], "B"),
        _row(1_000_000, ["blue", "green", "red"], "A"),  # circular copy of question 0
        _row(2_000_000, ["green", "red", "blue"], "C"),
        _row(1, ["yes", "no"], "A", category="existence"),
        _row(1_000_001, ["no", "yes"], "B", category="existence"),
    ]
    write_tsv(tmp_path / "dev.tsv", rows, FIELDS)
    # question 0: two copies right, the third wrong -> fails; question 1: both right (one by option text)
    replies = answers((0, "B"), (1_000_000, "A."), (2_000_000, "A"), (1, "A"), (1_000_001, "yes"))
    write_jsonl(tmp_path / "ans.jsonl", replies)
    result = scoring.score_mmbench(tmp_path / "dev.tsv", tmp_path / "ans.jsonl")
    m = result["metrics"]
    assert result["score"] == pytest.approx(50.0)
    assert m["questions"] == 2 and m["variants"] == 5
    assert m["single_pass_accuracy"] == pytest.approx(100.0)  # the two originals alone are right
    assert m["variant_accuracy"] == pytest.approx(80.0)
    assert m["categories"] == {"color": 0.0, "existence": 100.0}


def test_mmbench_all_rounds(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [_row(7, ["cat", "dog", "cow"], "C")], FIELDS)

    def rounds(*texts):
        return [{"question_id": 7, "round_id": r, "prompt": "q", "text": t} for r, t in enumerate(texts)]

    # round r shows the options rotated left r times: the right letter is C, then B, then A
    write_jsonl(tmp_path / "ok.jsonl", rounds("C", "B", "A"))
    assert scoring.score_mmbench(tmp_path / "dev.tsv", tmp_path / "ok.jsonl")["score"] == pytest.approx(100.0)
    write_jsonl(tmp_path / "bad.jsonl", rounds("C", "B", "B"))
    result = scoring.score_mmbench(tmp_path / "dev.tsv", tmp_path / "bad.jsonl")
    assert result["score"] == 0.0
    assert result["metrics"]["variant_accuracy"] == pytest.approx(200 / 3)
    write_jsonl(tmp_path / "short.jsonl", rounds("C", "B"))
    with pytest.raises(ValueError, match=r"no answer for 1 MMBench \(question, round\)"):
        scoring.score_mmbench(tmp_path / "dev.tsv", tmp_path / "short.jsonl")


def test_mmbench_test_split_has_no_answers(tmp_path):
    row = _row(0, ["a", "b"], "")
    write_tsv(tmp_path / "test.tsv", [row], FIELDS)
    write_jsonl(tmp_path / "ans.jsonl", answers((0, "A")))
    with pytest.raises(ValueError, match="scored by the MMBench server"):
        scoring.score_mmbench(tmp_path / "test.tsv", tmp_path / "ans.jsonl")


# ----------------------------------------------------------------------------------- MMMU, LLaVA-Bench


def test_mmmu(tmp_path):
    questions = [
        {"question_id": "validation_Art_1", "text": "?", "options": ["x", "y", "z"], "answer": "B",
         "question_type": "multiple-choice", "subject": "Art"},
        {"question_id": "validation_Art_2", "text": "?", "options": "['x', 'y']", "answer": "A",
         "question_type": "multiple-choice", "subject": "Art"},
        {"question_id": "validation_Math_1", "text": "?", "options": [], "answer": "12.5",
         "question_type": "open", "subject": "Math"},
        {"question_id": "validation_Math_2", "text": "?", "options": [], "answer": ["Paris", "paris, france"],
         "question_type": "open", "subject": "Math"},
    ]
    write_jsonl(tmp_path / "q.jsonl", questions)
    write_jsonl(tmp_path / "ans.jsonl", answers(("validation_Art_1", "y"), ("validation_Art_2", "B"),
                                                ("validation_Math_1", "It is 12.50 cm."),
                                                ("validation_Math_2", "London")))
    result = scoring.score_mmmu(tmp_path / "q.jsonl", tmp_path / "ans.jsonl")
    m = result["metrics"]
    assert result["score"] == pytest.approx(50.0)
    assert m["multiple_choice_accuracy"] == pytest.approx(50.0)
    assert m["open_accuracy"] == pytest.approx(50.0)
    assert m["accuracy_Art"] == pytest.approx(50.0)


def test_llavabench_reviews(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", [
        {"question_id": 0, "category": "conv", "tuple": [8, 6]},
        {"question_id": 1, "category": "detail", "tuple": [10, 5]},
    ])
    result = scoring.score_llavabench_reviews(tmp_path / "reviews.jsonl")
    assert result["score"] == pytest.approx(100 * 11 / 18)
    assert result["metrics"]["relative_score_conv"] == pytest.approx(75.0)
    assert result["metrics"]["relative_score_detail"] == pytest.approx(50.0)


def test_unreadable_files_name_the_line(tmp_path):
    (tmp_path / "ans.jsonl").write_text(json.dumps({"question_id": 1, "text": "a"}) + "\n{broken\n")
    write_json(tmp_path / "ann.json", {"data": []})
    with pytest.raises(ValueError, match=r"ans.jsonl:2 is not a JSON line"):
        scoring.score_textvqa(tmp_path / "ann.json", tmp_path / "ans.jsonl")
