"""Answer normalisation shared by the scorers: VQA-style answers, yes/no answers, option letters.

``normalize_vqa_answer`` follows the official VQA / TextVQA evaluation (EvalAI's answer processor):
lower-case; drop commas and question marks and split off ``'s``; punctuation is removed where it touches
a space (or anywhere when the answer has a digit-comma-digit) and turned into a space elsewhere; periods not
followed by a digit are removed; number words become digits; articles are dropped; apostrophe-less
contractions get their apostrophe back.
"""
from __future__ import annotations

import re

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern reads "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) look-ahead that always
# holds, so in effect a period is removed unless a digit follows it ("3.5" keeps its period).
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings of English contractions -> the spelling with apostrophes."""
    forms = [
        "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
        "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he'll", "he's", "how'd", "how'll",
        "how's", "i'd", "i'd've", "i'll", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "it's", "let's",
        "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock",
        "oughtn't", "shan't", "she'd", "she'd've", "she'll", "she's", "should've", "shouldn't",
        "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd",
        "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll",
        "something's", "that'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd",
        "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd", "we'd've", "we'll", "we're",
        "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
        "where've", "who'd", "who'd've", "who'll", "who're", "who's", "who've", "why'll", "why're", "why's",
        "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
        "you'd've", "you'll", "you're", "you've",
    ]
    table = {}
    for form in forms:
        # every spelling that lost some of its apostrophes ("couldnt've", "couldn'tve", "couldntve")
        pieces = form.split("'")
        for mask in range(2 ** (len(pieces) - 1) - 1):
            spelling = pieces[0]
            for i, piece in enumerate(pieces[1:]):
                spelling += ("'" if mask >> i & 1 else "") + piece
            table[spelling] = form
    # Ordinary words that only look like a contraction lost its apostrophe stay as they are.
    for word in ("ill", "id", "its", "wed", "well", "were", "lets", "twas", "hell", "shell"):
        table.pop(word, None)
    return table


CONTRACTIONS = _contractions()


def require_text(text, what: str = "answer") -> str:
    """``text`` if it is a string; a ValueError naming what it is otherwise (a ``null`` answer, say)."""
    if not isinstance(text, str):
        raise ValueError(f"the {what} must be a string, got {type(text).__name__} {text!r}")
    return text


def _strip_punctuation(text: str) -> str:
    out = text
    strip_everywhere = DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # the test looks at the answer as it came in, the replacement acts on the running result
        if strip_everywhere or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation (see the module docstring)."""
    text = require_text(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def vqa_accuracy(prediction: str, ground_truths: list[str]) -> float:
    """Soft VQA accuracy of one prediction: for each of the n human answers left out in turn,
    min(#other humans that gave the prediction / 3, 1); averaged over the n subsets (n = 10 in VQA)."""
    if not ground_truths:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    truths = [normalize_vqa_answer(require_text(gt, "ground-truth answer")) for gt in ground_truths]
    matches = sum(truth == pred for truth in truths)
    total = 0.0
    for truth in truths:
        others = matches - (truth == pred)
        total += min(1.0, others / 3.0)
    return total / len(truths)


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE reading of a free answer: first sentence, commas dropped; "no" if it contains the word
    "No", "no" or "not", else "yes"."""
    require_text(text)
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def parse_mme_yes_no(text: str) -> str:
    """MME's reading: the lower-cased answer if it is exactly yes/no, else yes/no if one appears in its
    first four characters, else "other" (always wrong)."""
    pred = require_text(text).strip().lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?=$|[\s.:,)\]])")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)


def extract_choice(text: str, options: list[str] | None = None, num_options: int | None = None) -> str | None:
    """The option letter a free-form answer picks, or None.

    Tried in order: a leading letter ("B", "B.", "(B)", "B) text"), "the answer is B", then the text of
    exactly one option. Letters beyond the number of options are not accepted.
    """
    if num_options is None:
        num_options = len(options) if options is not None else len(OPTION_LETTERS)
    allowed = OPTION_LETTERS[:num_options]
    answer = require_text(text).strip()
    if not answer:
        return None
    match = _LEADING_LETTER.match(answer)
    if match and match.group(1) in allowed:
        return match.group(1)
    found = {m.upper() for m in _ANSWER_IS.findall(answer)}
    if len(found) == 1 and next(iter(found)) in allowed:
        return next(iter(found))
    if options:
        simplified = answer.lower().rstrip(".").strip()
        hits = [i for i, option in enumerate(options) if str(option).lower().rstrip(".").strip() == simplified]
        if len(hits) == 1:
            return allowed[hits[0]]
    return None
