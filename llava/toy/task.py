"""The toy visual task: scenes drawn in code, questions with exact one-word answers.

Each scene is a 336 x 336 image (the ViT-L/14-336 input, so no padding or resizing changes it): a cluttered
grey background (noise, grey rectangles, lines and rings) with 1 to 3 solid shapes (squares and circles)
in distinct saturated colours, each 52 to 56 px wide (about 4 patches of 14 px), so that one object
covers about 16 to 25 of the 576 patches and a visual-token budget of 32 or 64 can miss it. The narrow
size range keeps the coloured area of 1, 2 and 3 shapes apart, so that a model that pools colour over
the image can count (see docs/toy_task.md).

Question types (``QUESTION_TYPES``), each with an exact short answer:

- ``count``:  "How many shapes are there?" -> "1" / "2" / "3"
- ``exist``:  "Is there a <colour> shape?" -> "yes" / "no" (balanced)
- ``colour``: "What colour is the shape?" (scenes with one shape) -> one of the six colour names

Everything is a deterministic function of the seed: ``make_scene(random.Random(seed))`` -> ``Scene``,
``scene_questions(scene, rng)``, ``write_train_set`` (LLaVA's training format: a JSON list of
``{"id", "image", "conversations"}``, all of a scene's questions as one multi-turn conversation) and
``write_eval_set`` (LLaVA's eval question JSONL ``{"question_id", "image", "text", "category"}`` and an
annotation file in GQA's format ``{question_id: {"answer", "types": {"structural"}}}`` that
``llava.eval.scoring.score_gqa`` scores by exact match, per question type too).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
QUESTION_TYPES = ("count", "exist", "colour")
MAX_OBJECTS = 3
SIZE_RANGE = (52, 56)
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

    def image(self) -> Image.Image:
        return draw_scene(self)


def _overlaps(box, others, margin: int = 6) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in others)


def make_scene(seed: int) -> Scene:
    """A random scene: 1 to 3 non-overlapping shapes in distinct colours."""
    rng = random.Random(seed)
    count = rng.randint(1, MAX_OBJECTS)
    colours = rng.sample(sorted(COLOURS), count)
    objects: list[SceneObject] = []
    while len(objects) < count:
        size = rng.randint(*SIZE_RANGE)
        x0 = rng.randint(4, IMAGE_SIZE - size - 4)
        y0 = rng.randint(4, IMAGE_SIZE - size - 4)
        box = (x0, y0, x0 + size, y0 + size)
        if _overlaps(box, [o.box for o in objects]):
            continue
        objects.append(SceneObject(rng.choice(SHAPES), colours[len(objects)], box))
    return Scene(seed, tuple(objects))


def draw_scene(scene: Scene) -> Image.Image:
    """The scene's pixels: grey clutter (deterministic in the scene's seed), then the shapes."""
    rng = np.random.default_rng(scene.seed)
    base = rng.integers(90, 170)
    noise = rng.normal(0, 18, (IMAGE_SIZE, IMAGE_SIZE, 1))
    pixels = np.clip(base + noise + rng.normal(0, 4, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 16))):  # grey clutter: rectangles, lines and rings
        grey = int(rng.integers(40, 220))
        x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE, 2))
        w, h = (int(v) for v in rng.integers(10, 90, 2))
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
    return image


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """The scene's questions, in random order: [(type, question, answer)]: the count, whether each of
    three colours is there (at least one present and one absent, so yes and no are balanced over the
    set) and, when there is one shape only, its colour."""
    present = [o.colour for o in scene.objects]
    absent = sorted(set(COLOURS) - set(present))
    asked = [rng.choice(present), rng.choice(absent)]
    asked.append(rng.choice(present) if rng.random() < 0.5 else rng.choice(absent))
    questions = [("count", "How many shapes are there?", str(len(scene.objects)))]
    questions += [("exist", f"Is there a {colour} shape?", "yes" if colour in present else "no")
                  for colour in dict.fromkeys(asked)]
    if len(scene.objects) == 1:
        questions.append(("colour", "What colour is the shape?", present[0]))
    rng.shuffle(questions)
    return questions


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def write_train_set(folder: str, num_images: int, seed: int) -> str:
    """``folder/images/train_*.png`` and ``folder/train.json`` (LLaVA's conversation format: each scene's
    three questions as one conversation, the image in the first turn); returns the JSON path."""
    _check_count("num_images", num_images)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = random.Random(f"train-{seed}")
    records = []
    for i in range(num_images):
        scene = make_scene(rng.randrange(2**31))
        name = f"train_{i:05d}.png"
        scene.image().save(os.path.join(images, name))
        conversations = []
        for turn, (_kind, question, answer) in enumerate(scene_questions(scene, rng)):
            # the short-answer hint after every question, as LLaVA's VQA training data and the eval prompt
            # have it (a hint in the first turn only taught a 2-layer LLM to answer the first turn from
            # the hint instead of the question: 0 % on colour questions)
            prompt = f"{question}\n{SHORT_ANSWER}"
            conversations += [
                {"from": "human", "value": f"<image>\n{prompt}" if turn == 0 else prompt},
                {"from": "gpt", "value": answer},
            ]
        records.append({"id": f"toy-train-{i}", "image": name, "conversations": conversations})
    path = os.path.join(folder, "train.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1)
    return path


def write_eval_set(folder: str, num_images: int, seed: int) -> tuple[str, str]:
    """Held-out scenes (another seed stream than training): ``folder/images/eval_*.png``, the question
    file ``folder/questions.jsonl`` (one question per scene, the types in turn, so each type has a third) and the annotations
    ``folder/annotations.json``; returns (question file, annotation file)."""
    _check_count("num_images", num_images)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = random.Random(f"eval-{seed}")
    questions, annotations = [], {}
    for i in range(num_images):
        wanted = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        while True:  # a scene that has a question of the wanted type
            scene = make_scene(rng.randrange(2**31))
            candidates = [q for q in scene_questions(scene, rng) if q[0] == wanted]
            if candidates:
                break
        kind, question, answer = candidates[0]
        name = f"eval_{i:05d}.png"
        scene.image().save(os.path.join(images, name))
        qid = f"toy-{i:05d}"
        questions.append({"question_id": qid, "image": name, "text": f"{question}\n{SHORT_ANSWER}",
                          "category": kind})
        annotations[qid] = {"answer": answer, "question": question, "types": {"structural": kind}}
    question_file = os.path.join(folder, "questions.jsonl")
    with open(question_file, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(q) + "\n" for q in questions)
    annotation_file = os.path.join(folder, "annotations.json")
    with open(annotation_file, "w", encoding="utf-8") as handle:
        json.dump(annotations, handle, indent=1)
    return question_file, annotation_file


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
