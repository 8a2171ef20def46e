"""CPU bench of the Hugging Face families: one tiny model per family at one budget, vanilla vs compressed.

    python -m llava.bench.hf_families                              # all six families, visionzip, 5 repeats
    python -m llava.bench.hf_families --families llava qwen2_5_vl --repeats 1 --method vispruner

For each family (``FAMILIES``): the tiny random model of ``visionzip.hf.tiny`` (seeded: the vanilla and
the compressed model have the same weights), one sample, ``METHOD:budget`` per view (image, crop, tile or
frame; about a quarter of a view's tokens), inputs built the usual way (the family's processor, made
compression-aware for the compressed model; Video-LLaVA and OneVision have no torchvision-free processor,
so their placeholders are written by count). Reported: visual tokens the LLM sees (vanilla -> compressed),
prefill time (one forward: tower, compression, projector, LLM) and ``generate`` of ``--new-tokens`` tokens,
each the median of ``--repeats`` timed calls after ``--warmup`` untimed ones, vanilla and compressed taken
alternately (``visionzip.profiling.measure_interleaved``), with the range of the timed calls.

The models are tiny (hidden width 32, 2-3 layers): the table shows that each family's compressed path
runs and what it costs relative to vanilla at toy scale, not the real models' speed-ups, which the
geometry bench (``python -m llava.bench --geometry ...``) measures at real widths for our stack.
"""
from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import visionzip
from visionzip import CompressionConfig
from visionzip.hf import compression_aware_processor
from visionzip.hf import tiny as hf_tiny
from visionzip.profiling import measure_interleaved

PROMPT = "USER: {placeholder} describe it ASSISTANT:"


@dataclass
class Sample:
    """One input of a family: the model it was built for, the forward kwargs, the visual tokens the LLM
    sees (placeholders in ``input_ids``) and the views they come from (images, crops, tiles or frames)."""

    model: object
    inputs: dict
    visual_tokens: int
    views: int


@dataclass(frozen=True)
class Family:
    """A bench row: ``sample(spec)`` builds the tiny model (compressed with ``spec`` unless None) and its
    input; ``budget``: the per-view token budget of the row; ``what``: the sample in words."""

    key: str
    label: str
    hf_class: str
    budget: int
    what: str
    sample: Callable[[str | None], Sample]


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)


def _pixels(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _compress(model, spec: str | None):
    if spec is not None:
        visionzip.apply_compression(model, spec)
    return model


def _placeholders(model, inputs: dict, token_id_name: str) -> int:
    """Placeholder tokens of one kind in the (one-sample) ``input_ids``."""
    return int((inputs["input_ids"] == getattr(model.config, token_id_name)).sum())


def _with_processor(model, processor, spec, text: str, image: np.ndarray, views: str = "views") -> Sample:
    """The usual flow: the family's processor, compression-aware for a compressed model. ``views``: what
    the budget counts, "views" (images or anyres views), "tiles" (InternVL) or "images" (Qwen2.5-VL)."""
    _compress(model, spec)
    if spec is not None:
        processor = compression_aware_processor(processor, model)
    inputs = dict(processor(text=[text], images=[image], return_tensors="pt"))
    pixel_values = inputs["pixel_values"]
    if views == "images":  # Qwen2.5-VL: pixel_values are patch rows; the budget is per image
        count = int(inputs["image_grid_thw"].shape[0])
    elif views == "tiles":  # InternVL: (tiles of all images, thumbnails included, 3, S, S)
        count = int(pixel_values.shape[0])
    else:  # "views": (images, views, 3, S, S) for anyres processors, (images, 3, S, S) otherwise
        count = int(pixel_values.shape[0] * (pixel_values.shape[1] if pixel_values.dim() == 5 else 1))
    return Sample(model, inputs, _placeholders(model, inputs, "image_token_id"), count)


def _by_count(model, tokenizer, spec, placeholder: str, token_id_name: str, method: str, pixels: dict, views: int):
    """Families without a torchvision-free processor: the visual token count is what the (compressed or
    vanilla) model's own feature method returns for ``pixels``; the prompt gets that many placeholders."""
    _compress(model, spec)
    with torch.no_grad():
        encoded = getattr(model.model, method)(**pixels).pooler_output
    count = sum(int(features.numel() // features.shape[-1]) for features in encoded)
    inputs = dict(tokenizer([PROMPT.format(placeholder=placeholder * count)], return_tensors="pt"))
    inputs.update(pixels)
    return Sample(model, inputs, _placeholders(model, inputs, token_id_name), views)


def llava_sample(spec):
    model, processor = hf_tiny.tiny_llava()
    return _with_processor(model, processor, spec, PROMPT.format(placeholder="<image>"), _image(112, 112))


def llava_next_sample(spec):
    model, processor = hf_tiny.tiny_llava_next()
    # 112 x 224 (h x w): the 1 x 2 pinpoint, base view + 2 crops
    return _with_processor(model, processor, spec, PROMPT.format(placeholder="<image>"), _image(112, 224))


def onevision_sample(spec):
    model, tokenizer = hf_tiny.tiny_onevision()
    # base view + the 2 crops of a 1 x 2 grid (image_sizes are (height, width))
    pixels = {"pixel_values": _pixels((1, 3, 3, 112, 112)), "image_sizes": torch.tensor([[112, 224]])}
    return _by_count(model, tokenizer, spec, "<image>", "image_token_id", "get_image_features", pixels, 3)


def video_llava_sample(spec):
    model, tokenizer = hf_tiny.tiny_video_llava()
    # the papers' Video-LLaVA setting: 8 frames
    pixels = {"pixel_values_videos": _pixels((1, 8, 3, 112, 112))}
    return _by_count(model, tokenizer, spec, "<video>", "video_token_id", "get_video_features", pixels, 8)


def qwen2_5_vl_sample(spec):
    model, processor = hf_tiny.tiny_qwen2_5_vl()
    text = PROMPT.format(placeholder="<|vision_start|><|image_pad|><|vision_end|>")
    # 224 x 224: a 16 x 16 patch grid, 64 merged tokens
    return _with_processor(model, processor, spec, text, _image(224, 224), "images")


def internvl_sample(spec):
    model, processor = hf_tiny.tiny_internvl()
    # 224 x 224: 2 x 2 tiles + the thumbnail, 16 tokens per 112-pixel tile
    return _with_processor(model, processor, spec, "USER: <IMG_CONTEXT> describe it", _image(224, 224), "tiles")


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("llava", "LLaVA-1.5 (llava-hf)", "LlavaForConditionalGeneration", 16,
               "1 image, 64 patches", llava_sample),
        Family("llava_next", "LLaVA-NeXT", "LlavaNextForConditionalGeneration", 16,
               "1 image, base + 1x2 crops of 64 patches", llava_next_sample),
        Family("onevision", "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", 16,
               "1 image, base + 1x2 crops of 64 patches (SigLIP)", onevision_sample),
        Family("video_llava", "Video-LLaVA", "VideoLlavaForConditionalGeneration", 17,
               "1 video, 8 frames of 64 patches + CLS", video_llava_sample),
        Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", 16,
               "1 image 224x224, 64 merged tokens", qwen2_5_vl_sample),
        Family("internvl", "InternVL", "InternVLForConditionalGeneration", 4,
               "1 image, 2x2 tiles + thumbnail of 16 units", internvl_sample),
    )
}


def run_family(family: Family, method: str, repeats: int, warmup: int, new_tokens: int) -> dict:
    """One row: counts and the interleaved timings of vanilla and ``METHOD:budget``. A method the family
    refuses gives a row with ``refused`` (the ValueError's message) and no timings. ``method`` may be a
    whole spec (``fastv:tokens=16,layer=1``: the in-LLM methods' paper layers need deeper LLMs than the tiny
    models' 2). In-LLM methods keep the model's placeholders; their compressed count is what the LLM's last
    layer sees (``settings.llm_token_schedule``)."""
    spec = method if ":" in method else f"{method}:{family.budget}"
    CompressionConfig.parse(spec)  # a malformed method is the caller's error, not a refusal
    vanilla = family.sample(None)
    row = {"family": family.key, "label": family.label, "hf_class": family.hf_class, "what": family.what,
           "spec": spec, "views": vanilla.views, "visual_tokens_vanilla": vanilla.visual_tokens}
    try:
        compressed = family.sample(spec)
    except ValueError as err:
        row["refused"] = str(err)
        return row
    settings = CompressionConfig.parse(spec).settings
    row["visual_tokens_compressed"] = compressed.visual_tokens
    row["tokens_per_view"] = settings.tokens_per_view()
    if settings.stage == "llm":
        from visionzip.hf.base import family_of

        hf_family = family_of(compressed.model)
        language_model = hf_family.inner(compressed.model).language_model
        view = hf_family.llm_view_tokens(compressed.model) if hf_family.llm_view_tokens is not None else None
        schedule = settings.llm_token_schedule(language_model.config.num_hidden_layers, vanilla.visual_tokens, view)
        row["in_llm"] = True
        row["visual_tokens_compressed"] = schedule[-1]

    def prefill(sample):
        return lambda: sample.model(**sample.inputs)

    def generate(sample):
        # min_new_tokens: random weights may pick EOS early; every call decodes the same number of steps
        return lambda: sample.model.generate(**sample.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False)

    with torch.inference_mode():
        prefills = measure_interleaved({"vanilla": prefill(vanilla), "compressed": prefill(compressed)},
                                       repeats=repeats, warmup=warmup)
        generates = measure_interleaved({"vanilla": generate(vanilla), "compressed": generate(compressed)},
                                        repeats=repeats, warmup=warmup)
    for name in ("vanilla", "compressed"):
        row[f"prefill_{name}_s"] = prefills[name].times
        row[f"generate_{name}_s"] = generates[name].times
    return row


def _ms(times: list[float]) -> str:
    median = float(np.median(times)) * 1e3
    if len(times) == 1:
        return f"{median:.1f}"
    return f"{median:.1f} ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"


def markdown_table(rows: list[dict], meta: dict) -> str:
    """The rows as a markdown table with a caption saying what was measured where."""
    lines = [
        f"Tiny random models of `visionzip.hf.tiny` (hidden width 32, 2-3 layers: toy scale, not the real "
        f"models' speed), {meta['device']}, {meta['threads']} threads, float32, median of {meta['repeats']} timed "
        f"calls after {meta['warmup']} warm-up (min-max), vanilla and compressed alternated; prefill = one "
        f"forward (tower + compression + projector + LLM); generate = {meta['new_tokens']} new tokens. "
        f"Visual tokens: placeholders the LLM sees.",
        "",
        "| family | sample | spec (per view) | visual tokens vanilla -> compressed | prefill vanilla ms "
        "| prefill compressed ms | prefill ratio | generate vanilla ms | generate compressed ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        head = f"| {row['label']} (`{row['hf_class']}`) | {row['what']} | `{row['spec']}` "
        if "refused" in row:
            lines.append(head + f"| {row['visual_tokens_vanilla']} -> refused: {row['refused']} | | | | | |")
            continue
        ratio = float(np.median(row["prefill_compressed_s"]) / np.median(row["prefill_vanilla_s"]))
        after = "in the LLM's last layer" if row.get("in_llm") else f"({row['views']} x {row['tokens_per_view']})"
        lines.append(
            head + f"| {row['visual_tokens_vanilla']} -> {row['visual_tokens_compressed']} {after} "
            f"| {_ms(row['prefill_vanilla_s'])} | {_ms(row['prefill_compressed_s'])} | {ratio:.2f} "
            f"| {_ms(row['generate_vanilla_s'])} | {_ms(row['generate_compressed_s'])} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.bench.hf_families", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--method", default="visionzip",
                        help="a method (each family's row runs METHOD:budget; default visionzip) or a whole spec "
                             "(in-LLM methods on the tiny models' 2 LLM layers: e.g. fastv:tokens=16,layer=1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--markdown", help="also write the table here")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("repeats", "new_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    rows = [run_family(FAMILIES[key], args.method, args.repeats, args.warmup, args.new_tokens) for key in args.families]
    meta = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
            "new_tokens": args.new_tokens, "torch": torch.__version__}
    text = markdown_table(rows, meta)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    return {"meta": meta, "rows": rows, "markdown": text}


if __name__ == "__main__":
    main()
