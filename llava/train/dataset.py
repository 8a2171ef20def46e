"""The LLaVA conversation data (``llava_v1_5_mix665k.json`` format), read lazily, and its collator.

A record is ``{"id": ..., "image": "coco/train2017/x.jpg" (optional), "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``. Records are checked when the dataset
is built (structure, ``<image>`` placeholders, image files), so that a bad file stops the run before the
first step with a message naming each bad sample; tokenization and pixels are computed per item.

``check_data_file`` runs the same checks before the model loads (``llava.train.train`` calls it first),
and can also decode every image (``check_image_decode``: "yes", "no", or "auto" = yes for datasets of at
most ``DECODE_CHECK_LIMIT`` images). An image that fails to decode later (any cause: truncated file, over
PIL's decompression-bomb limit, an unsupported mode) follows the bad-sample policy like any unlearnable
sample: skipped and counted, or the run stops naming it.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import ImageLoadError, load_image, processor_crop_size
from llava.processor import LlavaProcessor, image_token_text

from .fast_pixels import ElementwisePixels
from .preprocess import (
    SampleError,
    TokenizedConversation,
    UnlearnableSample,
    conversation_turns,
    place_image_token,
    tokenize_conversation,
)

logger = logging.getLogger(__name__)

# How many bad records one error message lists (the count is always complete).
LISTED_PROBLEMS = 10
# Consecutive unlearnable samples after which skipping stops: the cause is then not the data but the setup.
MAX_CONSECUTIVE_SKIPS = 64
# Conversations whose token ids a dataset remembers (the most recently used): about 70 bytes per token,
# some 20 MB for 1024 conversations of LLaVA-1.5's typical 300 tokens.
TOKENIZATION_MEMO = 1024
# check_image_decode="auto" decodes every image before training for datasets of at most this many images.
DECODE_CHECK_LIMIT = 2000
DECODE_CHECK_CHOICES = ("auto", "yes", "no")


class DataFileError(ValueError):
    """The data file cannot be read, or some of its records are unusable (all named in the message)."""


def sample_name(index: int, record) -> str:
    sample_id = record.get("id") if isinstance(record, dict) else None
    return f"sample {index} (id {sample_id!r})" if sample_id is not None else f"sample {index}"


def load_records(path: str) -> list[dict]:
    """Records of a JSON list file, or of a JSONL file (one record per line; ``.jsonl``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith(".jsonl"):
        records = []
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFileError(
                        f"{path}:{line_number}: corrupt JSON line (record {len(records)}): {err.msg} "
                        f"at column {err.colno}"
                    ) from err
    else:
        with open(path, encoding="utf-8") as handle:
            try:
                records = json.load(handle)
            except json.JSONDecodeError as err:
                raise DataFileError(
                    f"{path}: corrupt JSON at line {err.lineno} column {err.colno}: {err.msg}"
                ) from err
        if not isinstance(records, list):
            raise DataFileError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    if not records:
        raise DataFileError(f"{path}: no records")
    bad = [sample_name(i, r) for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise DataFileError(f"{path}: {len(bad)} records are not JSON objects: {', '.join(bad[:LISTED_PROBLEMS])}")
    return records


def raise_collected(path: str, problems: list[str], what: str) -> None:
    if problems:
        listed = "\n  ".join(problems[:LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - LISTED_PROBLEMS} more" if len(problems) > LISTED_PROBLEMS else ""
        raise DataFileError(f"{path}: {len(problems)} {what}:\n  {listed}{more}")


def image_path_of(record: dict, image_folder: str | None) -> str:
    return os.path.join(image_folder, record["image"]) if image_folder else record["image"]


def should_decode(check_image_decode: str | bool, num_images: int) -> bool:
    if isinstance(check_image_decode, bool):
        return check_image_decode
    if check_image_decode not in DECODE_CHECK_CHOICES:
        raise ValueError(f"check_image_decode must be one of {DECODE_CHECK_CHOICES}, got {check_image_decode!r}")
    return check_image_decode == "yes" or (check_image_decode == "auto" and num_images <= DECODE_CHECK_LIMIT)


def validate_records(
    path: str,
    records: list[dict],
    *,
    image_folder: str | None,
    mm_use_im_start_end: bool = False,
    multimodal: bool = True,
    check_image_files: bool = True,
    check_image_decode: str | bool = "no",
) -> None:
    """Structure, ``<image>`` placeholders, image files (exist; decode when asked): a ``DataFileError``
    listing every bad record."""
    problems, missing, undecodable = [], [], []
    image_records = []
    for index, record in enumerate(records):
        name = sample_name(index, record)
        try:
            turns = conversation_turns(record.get("conversations"), name)
            place_image_token(turns, "image" in record, name, image_token_text(mm_use_im_start_end))
            if "image" in record:
                if not multimodal:
                    raise SampleError(name, "has an image but the model has no vision tower")
                if not isinstance(record["image"], str) or not record["image"]:
                    raise SampleError(name, f"'image' must be a file path, got {record['image']!r}")
        except SampleError as err:
            problems.append(str(err))
            continue
        if "image" in record:
            image_records.append((name, image_path_of(record, image_folder)))
    raise_collected(path, problems, "unusable records")
    if check_image_files or should_decode(check_image_decode, len(image_records)):
        for name, image_path in image_records:
            if not os.path.isfile(image_path):
                missing.append(f"{name}: image file not found: {image_path}")
    raise_collected(path, missing, f"missing image files (image_folder={image_folder!r})")
    if should_decode(check_image_decode, len(image_records)):
        for name, image_path in image_records:
            try:
                load_image(image_path)
            except ImageLoadError as err:
                undecodable.append(f"{name}: {err}")
        raise_collected(path, undecodable, "images that do not decode (--check_image_decode)")


def check_data_file(
    path: str,
    *,
    image_folder: str | None = None,
    check_image_files: bool = True,
    check_image_decode: str | bool = "auto",
) -> list[dict]:
    """Pre-flight, before any model loads: read the data file and check its records (see
    ``validate_records``). Returns the records."""
    records = load_records(path)
    validate_records(
        path, records, image_folder=image_folder, check_image_files=check_image_files,
        check_image_decode=check_image_decode,
    )
    return records


def word_count(record: dict) -> int:
    return sum(len(turn["value"].split()) for turn in record["conversations"])


class LazySupervisedDataset(Dataset):
    """LLaVA conversation samples: ``input_ids``, ``labels`` and (multimodal) image pixels.

    processor: the ``LlavaProcessor`` that owns the prompt template, the image placeholder's text and
        the pixels (``LlavaProcessor.for_training``: image aspect ratio and grid pinpoints as the model
        trains with them); its ``image_processor`` is ``None`` for a text-only model.
    visual_tokens_per_image: how many sequence positions one image takes once spliced in (compressed
        count when compression is on); used for length grouping and to tell whether any reply survives
        the model's truncation to ``model_max_length``.
    bad_sample_policy: "skip" replaces an unlearnable sample by the next one and reports it in the
        batch (``skipped_samples``); "error" raises.
    """

    def __init__(
        self,
        data_path: str,
        processor: LlavaProcessor,
        *,
        image_folder: str | None = None,
        model_max_length: int = 2048,
        visual_tokens_per_image: int = 576,
        bad_sample_policy: str = "skip",
        check_tokenization: bool = True,
        check_image_files: bool = True,
        check_image_decode: str | bool = "no",
        records: list[dict] | None = None,
    ):
        if not isinstance(processor, LlavaProcessor):
            raise TypeError(f"processor must be a llava.processor.LlavaProcessor, got {type(processor).__name__}")
        self.data_path = data_path
        self.processor = processor
        self.image_folder = image_folder
        self.model_max_length = model_max_length
        self.visual_tokens_per_image = visual_tokens_per_image
        if bad_sample_policy not in ("skip", "error"):
            raise ValueError(f"bad_sample_policy must be 'skip' or 'error', got {bad_sample_policy!r}")
        self.bad_sample_policy = bad_sample_policy
        self.check_tokenization = check_tokenization
        self._tokenized: OrderedDict[tuple, TokenizedConversation] = OrderedDict()
        self.records = load_records(data_path) if records is None else records
        validate_records(
            data_path, self.records, image_folder=image_folder,
            mm_use_im_start_end=bool(getattr(processor.model_config, "mm_use_im_start_end", False)),
            multimodal=self.is_multimodal, check_image_files=check_image_files,
            check_image_decode=check_image_decode,
        )
        self.modality_lengths = [
            word_count(r) + visual_tokens_per_image if "image" in r else -word_count(r) for r in self.records
        ]
        # [VisionZip-LLaVA] images already of the processor's output size take a lookup table that gives the
        # processor's pixels bit for bit (llava.train.fast_pixels); "anyres" always crops, so never does
        aspect = getattr(processor.model_config, "image_aspect_ratio", None)
        self.fast_pixels = (
            ElementwisePixels.probe(processor.image_processor) if self.is_multimodal and aspect != "anyres" else None
        )

    def image_path(self, record: dict) -> str:
        return image_path_of(record, self.image_folder)

    # ---- per item ----

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        return [abs(length) for length in self.modality_lengths]

    @property
    def is_multimodal(self) -> bool:
        return self.processor.image_processor is not None

    def count_modalities(self) -> tuple[int, int]:
        images = sum(1 for length in self.modality_lengths if length > 0)
        return images, len(self.records) - images

    def tokenize(self, index: int) -> TokenizedConversation:
        record = self.records[index]
        name = sample_name(index, record)
        turns = place_image_token(
            conversation_turns(record["conversations"], name), "image" in record, name, self.processor.image_token
        )
        # [VisionZip-LLaVA] a conversation met again (a later epoch, a repeated question) takes its ids from
        # a bounded memo instead of the tokenizer: the same ids (same tokenizer, template and checks);
        # failures are not remembered, so a bad sample raises each time with its own name
        key = (self.check_tokenization, tuple(turns))
        known = self._tokenized.get(key)
        if known is None:
            known = tokenize_conversation(
                turns, self.processor.template, self.processor.tokenizer, name,
                check_tokenization=self.check_tokenization,
            )
            self._tokenized[key] = known
            if len(self._tokenized) > TOKENIZATION_MEMO:
                self._tokenized.popitem(last=False)
        else:
            self._tokenized.move_to_end(key)
        return TokenizedConversation(list(known.input_ids), list(known.labels), known.prompt)

    def build_example(self, index: int) -> dict:
        record = self.records[index]
        name = sample_name(index, record)
        tokenized = self.tokenize(index)
        input_ids = tokenized.input_ids[: self.model_max_length]
        labels = tokenized.labels[: self.model_max_length]
        if not self.has_learnable_label(input_ids, labels):
            raise UnlearnableSample(
                name,
                f"no reply token within model_max_length {self.model_max_length} (the prompt has "
                f"{len(tokenized.input_ids)} text ids"
                + (f" and the image {self.visual_tokens_per_image} positions)" if "image" in record else ")"),
                "no_supervised_tokens",
            )
        example = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        if "image" in record:
            example["image"], example["image_size"] = self.load_pixels(record, name)
        elif self.is_multimodal:
            # text-only sample of a multimodal batch: a blank image keeps batches stackable (as LLaVA);
            # the model splices nothing for it since its text has no image placeholder.
            side = processor_crop_size(self.processor.image_processor)
            example["image"], example["image_size"] = torch.zeros(3, side, side), (side, side)
        return example

    def has_learnable_label(self, input_ids: list[int], labels: list[int]) -> bool:
        """Whether some label survives the model's truncation once the image takes its positions."""
        shift = 0
        for position, (token, label) in enumerate(zip(input_ids, labels)):
            if token == IMAGE_TOKEN_INDEX:
                shift += self.visual_tokens_per_image - 1
            elif label != IGNORE_INDEX and position + shift < self.model_max_length:
                return True
        return False

    def load_pixels(self, record: dict, name: str):
        path = self.image_path(record)
        try:
            # every decoding failure is an ImageLoadError (bombs, odd modes, and geometries whose padding or
            # resize would not fit in memory: llava.mm_utils.check_image_geometry), so is a bad sample
            image = load_image(path)
            fast = self.fast_pixels(image) if self.fast_pixels is not None else None
            if fast is not None:
                pixels = [fast.to(self.processor.device, dtype=self.processor.dtype)]
            else:
                pixels = self.processor.image_pixels([image])
        except ImageLoadError as err:
            raise UnlearnableSample(name, f"{path}: {err}" if path not in str(err) else str(err),
                                    "image_unreadable") from err
        return pixels[0], image.size

    def __getitem__(self, index: int) -> dict:
        # [VisionZip-LLaVA] the original returns such a sample with every label masked (and a printed
        # "tokenization mismatch"); here it is replaced by the next sample and reported in the batch.
        skipped: list[str] = []
        for attempt in range(min(MAX_CONSECUTIVE_SKIPS, len(self))):
            current = (index + attempt) % len(self)
            try:
                example = self.build_example(current)
            except UnlearnableSample as problem:
                if self.bad_sample_policy == "error":
                    raise
                logger.warning("skipping %s", problem)
                skipped.append(str(problem))
                continue
            example["skipped_samples"] = skipped
            return example
        raise RuntimeError(
            f"{len(skipped)} consecutive samples from index {index} of {self.data_path} cannot be learnt; "
            f"first: {skipped[0]}"
        )


@dataclass
class SupervisedCollator:
    """Right-pads ``input_ids`` (``pad_token_id``) and ``labels`` (``IGNORE_INDEX``) to the longest
    sample, cut at ``model_max_length``; stacks images when they share a shape (else a list)."""

    pad_token_id: int
    model_max_length: int

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"][: self.model_max_length] for e in examples]
        labels = [e["labels"][: self.model_max_length] for e in examples]
        width = max(len(x) for x in ids)
        batch_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        # [VisionZip-LLaVA] the mask comes from the true lengths; the original's input_ids.ne(pad_token_id)
        # also masks genuine <unk> tokens, since LLaVA pads with <unk>.
        attention_mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for row, (x, y) in enumerate(zip(ids, labels)):
            batch_ids[row, : len(x)] = x
            batch_labels[row, : len(y)] = y
            attention_mask[row, : len(x)] = True
        batch = {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention_mask}
        images = [e["image"] for e in examples if "image" in e]
        if images:
            if len(images) != len(examples):
                raise ValueError("a batch mixes samples with and without pixels; use one dataset per model")
            same_shape = all(image.shape == images[0].shape for image in images)
            batch["images"] = torch.stack(images) if same_shape else images
            batch["image_sizes"] = [tuple(e["image_size"]) for e in examples]
        skipped = [name for e in examples for name in e.get("skipped_samples", ())]
        if skipped:
            batch["skipped_samples"] = skipped
        return batch
