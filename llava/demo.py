"""The README's main job on the embedded default (tiny models the project builds itself).

    bash scripts/demo.sh            # = python -m llava.demo

1. Compression: VisionZip and VisPruner on an image at the paper's budgets (576 -> 192 / 128 / 64) on the
   tiny LLaVA's vision tower (real ViT-L/14-336 geometry), with the measured time and memory of each, and
   a PNG marking the dominant and contextual tokens.
2. Training-free inference: the tiny LLaVA-1.5 and LLaVA-NeXT answer the same question vanilla and with
   VisionZip at each budget: visual tokens, sequence length, time to encode the image (tower, compression,
   projector), LLM prefill time (and its speed-up over vanilla), generate time, the answer. The tiny LLM
   is cheap next to the 24-layer tower; ``python -m llava.bench`` measures 7B-shaped models.
3. Efficient tuning (VisionZip‡ in miniature): a few projector-only steps with VisionZip 64 through the
   real training entry point, then the saved projector reloaded on its base model.

The models have random weights: answers are gibberish, shapes, code paths and timings are real.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from visionzip import VISIONZIP_BUDGETS, VISIONZIP_NEXT_BUDGETS, CompressionConfig
from visionzip.demo import compression_demo, default_cache_dir, demo_image
from visionzip.profiling import measure

QUESTION = "<image>\nWhat is in the picture? Describe it."


def build_models(cache: Path) -> dict[str, Path]:
    from llava.model.tiny import build_tiny_llava

    return {version: Path(build_tiny_llava(cache / f"tiny-llava-{version}", version=version, seed=0))
            for version in ("v1.5", "v1.6")}


def inference_section(model_dir: Path, version: str, image, repeats: int) -> None:
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(model_dir), None, None, device="cpu")
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt").unsqueeze(0)
    pixels = process_images([image], processor, model.config)
    sizes = [image.size]
    if version == "v1.5":
        budgets = [(None, "vanilla")] + [(f"{d},{c}", f"VisionZip {d}+{c}") for d, c in
                                         (VISIONZIP_BUDGETS[b] for b in sorted(VISIONZIP_BUDGETS, reverse=True))]
    else:
        budgets = [(None, "vanilla")] + [(f"{d},{c}", f"VisionZip {d}+{c}/crop") for d, c in
                                         (VISIONZIP_NEXT_BUDGETS[b] for b in sorted(VISIONZIP_NEXT_BUDGETS, reverse=True))]
    text_tokens = int((input_ids != -200).sum())
    print(f"{'setting':<24} {'visual':>7} {'sequence':>9} {'encode':>9} {'LLM prefill':>12} {'generate 8':>11}  answer")
    baseline = None
    for spec, label in budgets:
        model.set_visual_compression(CompressionConfig.parse(spec) if spec else None)
        with torch.no_grad():
            def splice():
                return model.prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, pixels, sizes)[4]

            embeds = splice()
            encode = measure(splice, repeats=repeats)  # tower + compression + projector + splice
            prefill = measure(partial(model, inputs_embeds=embeds), repeats=repeats)
            output = model.generate(input_ids, images=pixels, image_sizes=sizes, max_new_tokens=8, do_sample=False)
            generate = measure(lambda: model.generate(input_ids, images=pixels, image_sizes=sizes, max_new_tokens=8,
                                                      do_sample=False), repeats=max(1, repeats - 1), warmup=0)
        baseline = baseline or prefill.median
        answer = tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()
        print(f"{label:<24} {embeds.shape[1] - text_tokens:>7} {embeds.shape[1]:>9} {encode.median * 1e3:>7.1f}ms "
              f"{prefill.median * 1e3:>7.1f}ms {baseline / prefill.median:>3.1f}x {generate.median * 1e3:>9.1f}ms"
              f"  {answer[:32]!r}")
    model.set_visual_compression(None)


def tuning_section(model_dir: Path, output: Path, steps: int) -> None:
    from llava.model.builder import load_pretrained_model
    from llava.train.quick import tune_projector_demo

    losses = tune_projector_demo(str(model_dir), str(output), steps=steps, visual_tokens=64)
    print(f"projector-only tuning with VisionZip 64, {steps} steps: loss " + " -> ".join(f"{x:.3f}" for x in losses))
    run = output / "run"
    _, tuned, _, _ = load_pretrained_model(str(run), str(model_dir), None, device="cpu")
    saved = sorted(p.name for p in run.iterdir() if p.name.startswith(("mm_projector", "config")))
    print(f"saved {', '.join(saved)} in {run}; reloaded on its base with "
          f"compression {tuned.get_visual_compression().to_dict()}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="where the PNG and run outputs go")
    parser.add_argument("--cache-dir", default=None, help="where the tiny models are built (default .cache/)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    parser.add_argument("--tune-steps", type=int, default=4, help="projector-tuning steps (0 skips tuning)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars of the tiny models would bury the tables
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    output = Path(args.output_dir)
    image = demo_image()

    models = build_models(cache)
    print(f"tiny models: {', '.join(str(p) for p in models.values())}")

    print("\n== 1. Visual-token compression on the tiny LLaVA's vision tower (ViT-L/14-336 geometry) ==")
    from llava.model.builder import load_pretrained_model

    _, model, processor, _ = load_pretrained_model(str(models["v1.5"]), None, None, device="cpu")
    compression_demo(model.get_vision_tower().vision_tower, processor, image, output / "visionzip_tokens.png",
                     repeats=args.repeats)

    print("\n== 2. Training-free inference: LLaVA-1.5 (one 336px view) ==")
    inference_section(models["v1.5"], "v1.5", image, args.repeats)
    print("\n== 2b. Training-free inference: LLaVA-NeXT (anyres: base image + crops) ==")
    inference_section(models["v1.6"], "v1.6", image, args.repeats)

    if args.tune_steps > 0:
        print("\n== 3. Efficient tuning (VisionZip‡): projector only, VisionZip 64 ==")
        tuning_section(models["v1.5"], output / "projector-tuning", args.tune_steps)


if __name__ == "__main__":
    main()
