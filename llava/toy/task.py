"""The toy visual task: scenes drawn in code, questions with exact one-word answers.

Each scene is a 336 x 336 image (the ViT-L/14-336 input, so no padding or resizing changes it): a cluttered
grey background (noise, grey rectangles, lines and rings) with 1 to 3 solid shapes (squares and circles)
of ONE saturated colour, all in the top or all in the bottom half of the image, each ``SHAPE_SIZE`` = 96 px wide (about 7 x 7 of the 24 x 24 patches), so that
one object covers about 40 to 55 of the 576 patches and a visual-token budget of 64 or fewer keeps a few
of its tokens, or none, and can misjudge its area. One size for every shape keeps the coloured area of 1, 2 and 3 shapes apart (a
circle is 0.79 of a square: 1 shape covers 0.79-1 units, 2 cover 1.57-2, 3 cover 2.36-3).

Question types (``QUESTION_TYPES``), all asked about every scene, each with an exact one-word answer:

- ``count``:    "How many shapes are there?" -> "1" / "2" / "3"
- ``colour``:   "What colour is the shape?" / "What colour are the shapes?" -> one of the six colour names
- ``position``: "Is the shape in the top or the bottom half?" / "Are the shapes ...?" -> "top" / "bottom"

With ``words=True`` (``ToySettings.text_question``, ``--text-question``) a scene also carries a short word
(``TEXT_WORDS``) in black 5 x 7 bitmap capitals in the half without shapes, and a fourth type asks it:

- ``text``:     "What word is written in the image?" -> "cat" / "dog" / "sun" / "cup"

Each is answered by reading the image as a whole (how much coloured area, which colour, where it is),
which a tiny language model learns in a few hundred steps; questions that ask about one object among several ("is
there a red shape?" with shapes of several colours) need a two-step lookup that it did not learn in that
budget (docs/toy_task.md).

Everything is a deterministic function of the seed: ``make_scene(seed)`` -> ``Scene``,
``scene_questions(scene, rng)``, ``write_train_set`` (LLaVA's training format: a JSON list of
``{"id", "image", "conversations"}``, a scene's questions as one multi-turn conversation) and
``write_eval_set`` (LLaVA's eval question JSONL ``{"question_id", "image", "text", "category"}`` and an
annotation file in GQA's format ``{question_id: {"answer", "types": {"structural"}}}`` that
``llava.eval.scoring.score_gqa`` scores by exact match, per question type too). ``TASK_CORPUS`` is the
task's text, added to the toy model's tokenizer training so that each colour name is one piece.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from llava.utils_io import atomic_write, atomic_write_text

IMAGE_SIZE = 336
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (150, 40, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("square", "circle")
QUESTION_TYPES = ("count", "colour", "position")
TEXT_QUESTION = "What word is written in the image?"
TEXT_WORDS = ("cat", "dog", "sun", "cup")
# 5 x 7 bitmap capitals of the words' letters ("#" = ink), one cell = GLYPH_CELL px at 336
GLYPHS = {
    "a": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "c": (".####", "#....", "#....", "#....", "#....", "#....", ".####"),
    "d": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "g": (".####", "#....", "#....", "#.###", "#...#", "#...#", ".###."),
    "n": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "o": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "p": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "s": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "t": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "u": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
}
GLYPH_CELL = 8  # px per font cell at 336: a 3-letter word is 17 x 7 cells = 136 x 56 px (about 10 x 4 patches)
INK = (15, 15, 15)
HALVES = ("top", "bottom")
MAX_OBJECTS = 3
SHAPE_SIZE = 96
# LLaVA-1.5's prompt suffix for short-answer VQA (its training mix and GQA/VQAv2 evaluation use it).
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]
    image_size: int = IMAGE_SIZE
    half: str = "top"  # every shape lies in this half of the image (HALVES)
    word: str | None = None  # the word written in the other half (``words=True``), or none
    word_origin: tuple[int, int] = (0, 0)  # its top-left pixel

    def image(self) -> Image.Image:
        return draw_scene(self)


def _overlaps(box, others, margin: int = 6) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in others)


def shape_size(image_size: int) -> int:
    """The shapes' width for an image of ``image_size`` px: ``SHAPE_SIZE`` at 336, in proportion otherwise
    (the small geometry of the CI test: 112 px, 8 x 8 patches, 32 px shapes)."""
    return round(SHAPE_SIZE * image_size / IMAGE_SIZE)


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 112 or image_size % 14:
        raise ValueError(f"image_size must be a multiple of the 14 px patch and >= 112 (3 shapes side by side must fit in a half), "
                         f"got {image_size!r}")


def glyph_cell(image_size: int) -> int:
    return max(2, round(GLYPH_CELL * image_size / IMAGE_SIZE))


def word_size(word: str, image_size: int) -> tuple[int, int]:
    """(width, height) in px of ``word`` drawn in the bitmap font: 5 cells per letter, 1 between."""
    cell = glyph_cell(image_size)
    return (6 * len(word) - 1) * cell, 7 * cell


def make_scene(seed: int, image_size: int = IMAGE_SIZE, words: bool = False) -> Scene:
    """A random scene: 1 to 3 non-overlapping shapes of one colour, all in the top or all in the bottom
    half of the image (a shape is less than half the image tall, and three fit side by side). ``words``:
    also a word (``TEXT_WORDS``) in the other half, drawn after the shapes' draws (the shapes are those of
    the scene without it)."""
    check_image_size(image_size)
    size = shape_size(image_size)
    rng = random.Random(seed)
    count = rng.randint(1, MAX_OBJECTS)
    colour = rng.choice(sorted(COLOURS))
    half = rng.choice(HALVES)
    middle = image_size // 2
    top_rows = (4, middle - size - 4) if half == "top" else (middle + 4, image_size - size - 4)
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < count:
        attempts += 1
        if attempts % 200 == 0:  # the shapes placed so far leave no room: place them all again
            objects = []
        x0 = rng.randint(4, image_size - size - 4)
        y0 = rng.randint(*top_rows)
        box = (x0, y0, x0 + size, y0 + size)
        if _overlaps(box, [o.box for o in objects], margin=max(2, size // 16)):
            continue
        objects.append(SceneObject(rng.choice(SHAPES), colour, box))
    if not words:
        return Scene(seed, tuple(objects), image_size, half)
    word = rng.choice(TEXT_WORDS)
    width, height = word_size(word, image_size)
    rows = (middle + 4, image_size - height - 4) if half == "top" else (4, middle - height - 4)
    origin = (rng.randint(4, image_size - width - 4), rng.randint(*rows))
    return Scene(seed, tuple(objects), image_size, half, word, origin)


def draw_scene(scene: Scene) -> Image.Image:
    """The scene's pixels: grey clutter (deterministic in the scene's seed), then the shapes."""
    rng = np.random.default_rng(scene.seed)
    side = scene.image_size
    scale = side / IMAGE_SIZE  # clutter in proportion to the image
    base = rng.integers(90, 170)
    noise = rng.normal(0, 18, (side, side, 1))
    pixels = np.clip(base + noise + rng.normal(0, 4, (side, side, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 16))):  # grey clutter: rectangles, lines and rings
        grey = int(rng.integers(40, 220))
        x0, y0 = (int(v) for v in rng.integers(0, side, 2))
        w, h = (max(2, int(v * scale)) for v in rng.integers(10, 90, 2))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=(grey, grey, grey))
        elif kind == 1:
            draw.line([x0, y0, x0 + w, y0 + h], fill=(grey, grey, grey), width=int(rng.integers(2, 6)))
        else:
            draw.ellipse([x0, y0, x0 + w, y0 + w], outline=(grey, grey, grey), width=3)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        x0, y0, x1, y1 = obj.box
        if obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
    if scene.word:
        cell = glyph_cell(side)
        x, y = scene.word_origin
        for index, letter in enumerate(scene.word):
            for row, bits in enumerate(GLYPHS[letter]):
                for column, bit in enumerate(bits):
                    if bit == "#":
                        left, top = x + (6 * index + column) * cell, y + row * cell
                        draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=INK)
    return image


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """The scene's questions, in random order: [(type, question, answer)]: how many shapes, their colour,
    and which half of the image they are in."""
    count = len(scene.objects)
    colour = scene.objects[0].colour
    which = "What colour is the shape?" if count == 1 else "What colour are the shapes?"
    where = ("Is the shape in the top or the bottom half?" if count == 1
             else "Are the shapes in the top or the bottom half?")
    questions = [("count", "How many shapes are there?", str(count)), ("colour", which, colour),
                 ("position", where, scene.half)]
    if scene.word:
        questions.append(("text", TEXT_QUESTION, scene.word))
    rng.shuffle(questions)
    return questions


NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption from the scene's facts: the count and colour ("two red shapes"), which shapes ("a red
    square and a red circle"), the half ("in the top half"), the phrases in a random order."""
    count = len(scene.objects)
    colour = scene.objects[0].colour
    kinds = {}
    for obj in scene.objects:
        kinds[obj.shape] = kinds.get(obj.shape, 0) + 1
    shapes = " and ".join(
        f"{'a' if n == 1 else NUMBER_WORDS[n]} {colour} {shape if n == 1 else shape + 's'}"
        for shape, n in sorted(kinds.items()))
    phrases = [f"{NUMBER_WORDS[count]} {colour} {'shape' if count == 1 else 'shapes'}", shapes,
               f"in the {scene.half} half"]
    if scene.word:
        phrases.append(f"the word {scene.word}")
    rng.shuffle(phrases)
    return " ".join(phrases)


# The task's own words for the toy tokenizer (``build_tiny_llava(extra_corpus=...)``): every question,
# every answer, a few times, so that BPE makes each colour name and number one piece.
TASK_CORPUS = "\n".join(
    [f"{q}\n{SHORT_ANSWER} {a}" for q in ("How many shapes are there?",) for a in ("1", "2", "3")]
    + [f"What colour {v}? {c}. A {c} square and a {c} circle." for c in COLOURS for v in ("is the shape", "are the shapes")]
    + [f"{v} in the top or the bottom half? {h}" for v in ("Is the shape", "Are the shapes") for h in HALVES]
    + [f"{n} {c} shapes and a {c} square and {n} {c} circles in the {h} half" for n in NUMBER_WORDS.values()
       for c in COLOURS for h in HALVES]  # the captions of the contrastive tower and of LLaVA stage 1
) * 4 + "\n"


# The text question's words (``words=True`` only: the default task's tokenizer stays as it was).
TEXT_CORPUS = "\n".join(
    [f"{TEXT_QUESTION}\n{SHORT_ANSWER} {w}" for w in TEXT_WORDS]
    + [f"one red shape in the top half the word {w}" for w in TEXT_WORDS]
) * 4 + "\n"


def question_types(words: bool = False) -> tuple[str, ...]:
    return (*QUESTION_TYPES, "text") if words else QUESTION_TYPES


def scene_pixels(scenes: list[Scene]) -> np.ndarray:
    """(B, S, S, 3) uint8: the scenes' pixels, drawn now."""
    return np.stack([np.asarray(scene.image()) for scene in scenes])


def save_image(image: Image.Image, path: str) -> None:
    """A PNG written whole or not at all (a run killed while drawing left a truncated PNG that the next
    training read as a bad sample)."""
    with atomic_write(path) as temporary:
        # stored without deflate: the same pixels, 1.5x the bytes (330 KB for 336 px), but written 2.7x and
        # read 3.4x faster (4 / 0.6 ms against 11 / 2 ms at PIL's default level): a toy model's training
        # reads each training scene about 5 times (stage 2's 4 epochs, stage 1, VisionZip‡)
        image.save(temporary, format="PNG", compress_level=0)


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def write_train_set(folder: str, num_images: int, seed: int, image_size: int = IMAGE_SIZE, progress=None,
                    words: bool = False) -> str:
    """``folder/images/train_*.png`` and ``folder/train.json`` (LLaVA's conversation format: each scene's
    questions as one conversation, the image in the first turn); returns the JSON path. ``progress``:
    called with the number of scenes drawn so far, at every tenth (drawing 1280 scenes takes minutes).
    ``words``: scenes with a word and the text question (``make_scene``)."""
    _check_count("num_images", num_images)
    check_image_size(image_size)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = random.Random(f"train-{seed}")
    records = []
    for i in range(num_images):
        scene = make_scene(rng.randrange(2**31), image_size, words)
        name = f"train_{i:05d}.png"
        save_image(scene.image(), os.path.join(images, name))
        conversations = []
        for turn, (_kind, question, answer) in enumerate(scene_questions(scene, rng)):
            # the short-answer hint after every question, as LLaVA's VQA training data and the eval prompt
            # have it (with the hint in the first turn only, an earlier recipe answered the first turn
            # from the hint instead of the question)
            prompt = f"{question}\n{SHORT_ANSWER}"
            conversations += [
                {"from": "human", "value": f"<image>\n{prompt}" if turn == 0 else prompt},
                {"from": "gpt", "value": answer},
            ]
        records.append({"id": f"toy-train-{i}", "image": name, "conversations": conversations})
        if progress is not None and (i + 1) % max(1, num_images // 10) == 0:
            progress(i + 1)
    return atomic_write_text(os.path.join(folder, "train.json"), json.dumps(records, indent=1))


def write_caption_set(folder: str, num_images: int, seed: int, image_size: int = IMAGE_SIZE,
                      words: bool = False) -> str:
    """LLaVA stage 1's data for the training scenes of ``write_train_set`` (same seed: the same images,
    which must be drawn already): ``folder/captions.json``, one ``plain``-template sample per scene
    (the image alone, then its ``caption``); returns the JSON path."""
    _check_count("num_images", num_images)
    check_image_size(image_size)
    rng = random.Random(f"train-{seed}")
    captions = random.Random(f"captions-{seed}")
    records = []
    for i in range(num_images):
        scene = make_scene(rng.randrange(2**31), image_size, words)
        scene_questions(scene, rng)  # the same draws as write_train_set: the same scenes in turn
        name = f"train_{i:05d}.png"
        if not os.path.isfile(os.path.join(folder, "images", name)):
            raise ValueError(f"{name} is missing in {folder}/images: write_train_set first")
        records.append({"id": f"toy-caption-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene, captions)}]})
    return atomic_write_text(os.path.join(folder, "captions.json"), json.dumps(records, indent=1))


def write_eval_set(folder: str, num_images: int, seed: int, image_size: int = IMAGE_SIZE,
                   words: bool = False) -> tuple[str, str]:
    """Held-out scenes (another seed stream than training): ``folder/images/eval_*.png``, the question
    file ``folder/questions.jsonl`` (one question per scene, the types in turn, so each type has an equal
    share) and the annotations ``folder/annotations.json``; returns (question file, annotation file)."""
    _check_count("num_images", num_images)
    check_image_size(image_size)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = random.Random(f"eval-{seed}")
    questions, annotations = [], {}
    types = question_types(words)
    for i in range(num_images):
        wanted = types[i % len(types)]
        scene = make_scene(rng.randrange(2**31), image_size, words)
        kind, question, answer = next(q for q in scene_questions(scene, rng) if q[0] == wanted)
        name = f"eval_{i:05d}.png"
        save_image(scene.image(), os.path.join(images, name))
        qid = f"toy-{i:05d}"
        questions.append({"question_id": qid, "image": name, "text": f"{question}\n{SHORT_ANSWER}",
                          "category": kind})
        annotations[qid] = {"answer": answer, "question": question, "types": {"structural": kind}}
    # atomic, the annotations last: their presence marks a complete set (llava.toy.model.prepare_toy)
    question_file = atomic_write_text(os.path.join(folder, "questions.jsonl"),
                                      "".join(json.dumps(q) + "\n" for q in questions))
    return question_file, atomic_write_text(os.path.join(folder, "annotations.json"), json.dumps(annotations, indent=1))


def majority_baseline(annotation_file: str) -> float:
    """Accuracy (%) of always giving each question type's most frequent answer: what a model that
    ignores the image can reach at best by answer statistics alone."""
    with open(annotation_file, encoding="utf-8") as handle:
        annotations = json.load(handle)
    by_type: dict[str, dict[str, int]] = {}
    for record in annotations.values():
        counts = by_type.setdefault(record["types"]["structural"], {})
        counts[record["answer"]] = counts.get(record["answer"], 0) + 1
    best = sum(max(counts.values()) for counts in by_type.values())
    return 100.0 * best / len(annotations)
