"""Ask a LLaVA checkpoint one question about one or more images.

    python -m llava.eval.run_llava --model-path P --image-file F --query Q [--visionzip 54,10]
        [--vispruner 64] [--conv-mode vicuna_v1] [--device cpu]

``--visionzip D,C`` / ``--vispruner T[,ratio]`` compress the visual tokens (per image, or per anyres crop),
overriding what the checkpoint's config says; ``--no-compression`` turns a saved setting off.
"""
from __future__ import annotations

import argparse
import re
import sys

import torch

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_PLACEHOLDER,
)
from llava.conversation import get_conv_template
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from visionzip import CompressionConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True, help="path or URL; several separated by --sep")
    parser.add_argument("--query", required=True)
    parser.add_argument("--conv-mode", default="vicuna_v1", help="conversation template (default vicuna_v1)")
    parser.add_argument("--sep", default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--visionzip", metavar="D,C", help="VisionZip: D dominant + C contextual tokens, e.g. 54,10")
    group.add_argument("--vispruner", metavar="T[,R]", help="VisPruner: T tokens, important ratio R (0.5)")
    group.add_argument("--no-compression", action="store_true", help="ignore a compression saved in the checkpoint")
    parser.add_argument(
        "--anyres-layout", choices=("official", "spatial"), default="official",
        help="LLaVA-NeXT layout of compressed crops (see docs/llava.md)",
    )
    return parser


def compression_from_args(args) -> CompressionConfig | None:
    """The compression the command line asks for; None keeps the checkpoint's own setting."""
    if args.visionzip:
        return CompressionConfig.parse(f"visionzip:{args.visionzip}", anyres_layout=args.anyres_layout)
    if args.vispruner:
        return CompressionConfig.parse(f"vispruner:{args.vispruner}", anyres_layout=args.anyres_layout)
    if args.no_compression:
        return CompressionConfig()
    return None


def build_query(query: str, use_im_start_end: bool, num_images: int) -> str:
    """Put the image tokens where the user wrote ``<image-placeholder>``, else in front of the query."""
    image_token = DEFAULT_IMAGE_TOKEN
    if use_im_start_end:
        image_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    if IMAGE_PLACEHOLDER in query:
        placed = query.count(IMAGE_PLACEHOLDER)
        if placed != num_images:
            raise ValueError(f"the query has {placed} {IMAGE_PLACEHOLDER} but {num_images} images were given")
        return re.sub(re.escape(IMAGE_PLACEHOLDER), image_token, query)
    return (image_token + "\n") * num_images + query


def eval_model(args) -> str:
    compression = compression_from_args(args)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, None, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
        device=args.device, compression=compression,
    )
    if image_processor is None:
        raise ValueError(f"{args.model_path} is a language model without a vision tower")
    images = [load_image(path) for path in args.image_file.split(args.sep)]
    query = build_query(args.query, getattr(model.config, "mm_use_im_start_end", False), len(images))
    conv = get_conv_template(args.conv_mode)
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()

    device = model.get_input_embeddings().weight.device
    pixels = process_images(images, image_processor, model.config)
    pixels = [p.to(device, dtype=model.dtype) for p in pixels] if isinstance(pixels, list) else pixels.to(device, dtype=model.dtype)
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0).to(device)
    sample = args.temperature > 0
    output_ids = model.generate(
        input_ids,
        images=pixels,
        image_sizes=[image.size for image in images],
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_p=args.top_p if sample else None,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(eval_model(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
