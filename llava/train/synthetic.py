"""A small LLaVA-format dataset written on the fly (the demo, the tests and the benchmark train on it).

Images are coloured blocks on noise; each image sample asks about the picture and answers with its
colour, so a model can over-fit it in a few steps; text-only samples mix in as in LLaVA-665k.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 200), "yellow": (220, 210, 40)}


def write_synthetic_dataset(
    folder: str,
    num_image: int = 4,
    num_text: int = 2,
    seed: int = 0,
    image_size: tuple[int, int] = (64, 48),
    multi_turn: bool = True,
    answer_words: int = 0,
) -> str:
    """Write ``folder/images/*.png`` and ``folder/data.json``; return the JSON path.

    answer_words: extra words appended to each answer (longer sequences for benchmarking).
    """
    rng = np.random.default_rng(seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    names = list(COLOURS)
    filler = " ".join(["more"] * answer_words)
    records = []
    for i in range(num_image):
        colour = names[i % len(names)]
        width, height = image_size
        pixels = (rng.random((height, width, 3)) * 60).astype("uint8")
        pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = COLOURS[colour]
        file_name = f"img_{i}.png"
        Image.fromarray(pixels).save(os.path.join(images, file_name))
        answer = f"The block is {colour}." + (f" {filler}" if filler else "")
        conversations = [
            {"from": "human", "value": "<image>\nWhat colour is the block?"},
            {"from": "gpt", "value": answer},
        ]
        if multi_turn:
            conversations += [
                {"from": "human", "value": "Is it big?"},
                {"from": "gpt", "value": "It fills half the picture."},
            ]
        records.append({"id": f"image-{i}", "image": file_name, "conversations": conversations})
    for i in range(num_text):
        records.append(
            {
                "id": f"text-{i}",
                "conversations": [
                    {"from": "human", "value": f"Count to {i + 2}."},
                    {"from": "gpt", "value": " ".join(str(n) for n in range(1, i + 3)) + "."},
                ],
            }
        )
    path = os.path.join(folder, "data.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1)
    return path
