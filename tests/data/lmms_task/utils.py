"""The tiny task's functions: a coloured square drawn in code (no image files), prompts, exact match."""
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SIZE = 96


def doc_to_visual(doc):
    """One RGB image per sample: the doc's colour as a square in the doc's corner on a grey background;
    two sizes, so that a batch holds images of different aspect ratios."""
    width = SIZE if doc["id"] % 2 == 0 else SIZE + 32
    image = Image.new("RGB", (width, SIZE), (128, 128, 128))
    vertical, horizontal = doc["corner"].split()
    left = 0 if horizontal == "left" else width - SIZE // 2
    top = 0 if vertical == "top" else SIZE // 2
    ImageDraw.Draw(image).rectangle([left, top, left + SIZE // 2 - 1, top + SIZE // 2 - 1], fill=COLORS[doc["color"]])
    return [image]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']}\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"])}
