"""Ask a LLaVA checkpoint one question about one or more images.

    python -m llava.eval.run_llava --model-path P --image-file F --query Q [--compression visionzip:64]
        [--conv-mode TEMPLATE] [--device cpu]   # TEMPLATE: default_conv_mode of the checkpoint

``--compression SPEC`` compresses the visual tokens with any registered method (per image, or per anyres
crop), overriding what the checkpoint's config says; ``--visionzip D,C`` is an alias of
``--compression visionzip:D,C``; ``--no-compression`` turns a saved setting off.
"""
from __future__ import annotations

import argparse
import sys

import torch

from llava.compression_args import add_compression_arguments, compression_from_args
from llava.eval.model_processor import processor_for
from llava.mm_utils import load_image
from llava.model.builder import load_pretrained_model
from llava.model.compiled import add_compile_argument, generate_function
from llava.preflight import (
    check_device,
    check_generation_options,
    check_prompt_fits,
    model_max_positions,
    prompt_positions,
    split_image_files,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True, help="path or URL; several separated by --sep")
    parser.add_argument("--query", required=True)
    parser.add_argument("--conv-mode", default=None,
                        help="conversation template (default: the checkpoint's, mistral_instruct for llava_mistral, else vicuna_v1)")
    parser.add_argument("--sep", default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    add_compression_arguments(parser)
    add_compile_argument(parser)
    return parser


def eval_model(args) -> str:
    # pre-flight (llava.preflight): device, decoding options and images before the model loads
    args.device = check_device(args.device)
    check_generation_options(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
    images = [load_image(path) for path in split_image_files(args.image_file, args.sep)]
    compression = compression_from_args(args)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, None, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
        device=args.device, compression=compression,
    )
    if image_processor is None:
        raise ValueError(f"{args.model_path} is a language model without a vision tower")
    # a natively implemented family (llava.model.builder.NATIVE_FAMILIES) builds its own prompts and pixels
    # (model.build_processor; its own default format), a LLaVA model gets LlavaProcessor: llava.eval.model_processor
    processor, _ = processor_for(model, tokenizer, image_processor, args.conv_mode)
    inputs = processor([args.query], [images])
    # nothing may be cut silently: the question and "ASSISTANT:" must fit, and the reply stops at the limit
    positions = prompt_positions(model, list(inputs.input_ids), inputs.images, inputs.image_sizes)[0]
    args.max_new_tokens = check_prompt_fits(positions, args.max_new_tokens, model_max_positions(model.config))
    sample = args.temperature > 0
    if args.compile:  # LLaVA's compiled path: a family that builds its own inputs is refused by name
        from llava.eval.model_processor import refuse_llava_only_option

        refuse_llava_only_option(model, "--compile", "runs LLaVA's compiled path (llava.model.compiled)")
    generate = generate_function(model, args.compile)
    output_ids = generate(
        **inputs.generate_kwargs(),
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_p=args.top_p if sample else None,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        use_cache=True,
        pad_token_id=processor.pad_token_id,
    )
    return tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(eval_model(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
