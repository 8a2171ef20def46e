"""Accuracy of the toy model for a compression spec, through the real eval engine and scorer.

``ToyEvaluator(toy)`` loads the trained toy checkpoint once with ``llava.eval.generate.LlavaAnswerer``;
``evaluate(spec)`` sets the spec on the model (``set_visual_compression``, which checks the budget
against the tower: a ValueError names the value and the limit), answers the held-out questions with
``llava.eval.generate.run_generation`` (greedy, batched, resumable: answers already in the answers file
with the same settings are reused) and scores them with ``llava.eval.scoring.score_gqa`` (exact match
after lower-casing and dropping a trailing period, per question type too).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from visionzip import CompressionConfig

from .model import ToyModel

MAX_NEW_TOKENS = 8  # every answer ("1", "yes", "right", "yellow", ...) plus end-of-sequence fits


@dataclass
class ToyScore:
    spec: str
    accuracy: float  # % of held-out questions answered exactly
    by_type: dict = field(default_factory=dict)  # question type -> accuracy %
    visual_tokens: int | None = None  # visual tokens per image the LLM receives (None: image-dependent)
    seconds: float = 0.0  # wall time of answering (0 when every answer was already on disk)
    answers_file: Path | None = None


def _pixels_once(processor):
    """``processor`` (the answerer's ``LlavaProcessor``) as one that turns each image into pixels once:
    the study answers the same held-out images for about 70 settings, and CLIP's image processing was
    about a third of a vision-side setting's answering time. Keyed on the image object, which the
    evaluator's items keep (each is decoded once)."""
    import torch

    from llava.processor import LlavaProcessor

    if type(processor) is not LlavaProcessor:
        raise ValueError(f"the toy model is a LLaVA checkpoint, answered through LlavaProcessor; got {type(processor).__name__}")

    class PixelsOnce(LlavaProcessor):
        def __init__(self):
            super().__init__(processor.tokenizer, processor.image_processor, processor.model_config,
                             processor.conv_mode, processor.padding_side, processor.device, processor.dtype)
            self.done: dict[int, tuple] = {}  # id(image) -> (image, its (1, 3, S, S) pixels)

        def image_pixels(self, images):
            images = list(images)
            for image in images:
                if id(image) not in self.done:
                    self.done[id(image)] = (image, super().image_pixels([image]))
            return torch.cat([self.done[id(image)][1] for image in images])

    if getattr(processor.model_config, "image_aspect_ratio", None) == "anyres":
        raise ValueError("the toy model has one view per image (image_aspect_ratio 'pad'), got 'anyres'")
    return PixelsOnce()


class ToyEvaluator:
    def __init__(self, toy: ToyModel, answers_dir: Path | str, batch_size: int = 16,
                 model_path: Path | str | None = None, model_base: Path | str | None = None):
        """``model_path``/``model_base``: another checkpoint than the toy model itself, e.g. a tuned
        projector (``model_path``) on the toy model (``model_base``)."""
        from llava.eval.formats import ReaderOptions, get_format, read_items
        from llava.eval.generate import LlavaAnswerer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.toy = toy
        self.answers_dir = Path(answers_dir)
        self.batch_size = batch_size
        self.format = get_format("vqa")
        # each image is decoded once and kept (a few MB for the held-out set): the study answers the same
        # questions for about 70 settings
        self.items = [dataclasses.replace(item, load_image=functools.lru_cache(maxsize=1)(item.load_image))
                      if item.has_image else item
                      for item in read_items(self.format, toy.question_file, ReaderOptions(str(toy.image_folder)))]
        self.model_path = str(model_path or toy.model_path)
        self.model_base = str(model_base) if model_base else None
        self.answerer = LlavaAnswerer(self.model_path, self.model_base, "vicuna_v1", CompressionConfig(), "cpu",
                                      "float32", max_new_tokens=MAX_NEW_TOKENS)
        self.answerer.processor = _pixels_once(self.answerer.processor)
        self.num_patches = self.answerer.model.get_vision_tower().num_patches

    @property
    def model(self):
        return self.answerer.model

    def set_compression(self, spec: str) -> CompressionConfig:
        """Parse ``spec`` and set it on the model; ValueError (with the reason) if the budget is unusable."""
        config = CompressionConfig.parse(spec)
        self.model.set_visual_compression(config)
        return config

    def evaluate(self, spec: str, label: str | None = None) -> ToyScore:
        from llava.eval.generate import run_generation
        from llava.eval.scoring import score_gqa

        config = self.set_compression(spec)
        # named by the spec as asked (``pdrop:64`` -> pdrop_64.jsonl), the canonical short form; the full
        # settings are in the answers' .settings.json
        name = (label or spec).strip().replace(":", "_").replace(",", "_").replace("=", "-").replace("/", "-")
        answers_file = self.answers_dir / f"{name}.jsonl"
        settings = {
            "model_path": self.model_path, "model_base": self.model_base, "conv_mode": "vicuna_v1",
            "compression": config.to_dict(), "format": "vqa", "question_file": str(self.toy.question_file),
            "image_folder": str(self.toy.image_folder), "single_pred_prompt": False, "all_rounds": False,
            "lang": "en", "temperature": 0.0, "top_p": None, "num_beams": 1, "max_new_tokens": MAX_NEW_TOKENS,
            "batch_size": self.batch_size, "num_chunks": 1, "chunk_idx": 0, "seed": 0, "device": "cpu",
            "dtype": "float32",
        }
        start = time.perf_counter()
        record = run_generation(self.items, self.format, answers_file, self.answerer, settings, self.batch_size,
                                model_id="toy-llava", progress=False)
        seconds = time.perf_counter() - start if record["resumed_from"] < len(self.items) else 0.0
        result = score_gqa(self.toy.annotation_file, answers_file, self.toy.question_file)
        by_type = {k[len("accuracy_"):]: v for k, v in result["metrics"].items() if k.startswith("accuracy_")}
        tokens = config.tokens_per_image if config.enabled else self.num_patches
        self.model.set_visual_compression(None)
        return ToyScore(config.spec(), result["score"], by_type, tokens, seconds, answers_file)
