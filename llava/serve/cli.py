"""Chat about an image in the terminal, turn after turn, with the image kept in the KV cache.

    python -m llava.serve.cli --model-path P --image-file F [--compression visionzip:64]
        [--conv-mode TEMPLATE] [--device cpu] [--temperature 0.2] [--max-new-tokens 512]

Type a message after the user prompt; an empty line or end of input (Ctrl-D) ends the chat.
``--debug`` prints, after each reply, how many tokens the turn read into the cache.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from llava.compression_args import add_compression_arguments, compression_from_args
from llava.mm_utils import load_image
from llava.model.builder import default_conv_mode, load_pretrained_model
from llava.model.compiled import add_compile_argument, compiled_runner
from llava.preflight import check_device, check_generation_options, model_max_positions
from llava.serve.chat import ChatSession


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--conv-mode", default=None,
                        help="conversation template (default: the checkpoint's, mistral_instruct for llava_mistral, else vicuna_v1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    parser.add_argument("--debug", action="store_true")
    add_compression_arguments(parser)
    add_compile_argument(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    # pre-flight (llava.preflight): device, decoding options and the image before the model loads
    args.device = check_device(args.device)
    check_generation_options(args.temperature, None, 1, args.max_new_tokens)
    image = load_image(args.image_file)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, None, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
        device=args.device, compression=compression_from_args(args),
    )
    if image_processor is None:
        raise ValueError(f"{args.model_path} is a language model without a vision tower")
    compiled = compiled_runner(model, args.compile)  # None without --compile; refuses in-LLM methods
    # with --compile the whole conversation lives in one static cache: the model's positions, twice over
    # (slots for the bucket padding of each turn's prefill; the positions are still capped at the model's)
    session = ChatSession(model, tokenizer, image_processor, conv_mode=args.conv_mode or default_conv_mode(model),
                          compiled=compiled,
                          max_cache_len=2 * (model_max_positions(model.config) or 4096))
    session.set_image(image)
    user, assistant = session.conv.roles
    while True:
        try:
            text = input(f"{user}: ")
        except EOFError:
            print()
            break
        if not text.strip():
            break
        print(f"{assistant}: ", end="", flush=True)
        try:
            session.ask(
                text, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                stream=lambda piece: print(piece, end="", flush=True),
            )
        except ValueError as err:  # e.g. the conversation no longer fits the model: the turn is not taken
            print(f"\n[not answered] {err}", file=sys.stderr, flush=True)
            continue
        print()
        if args.debug:
            turn = session.turns[-1]
            stats = {
                "prefill_tokens": turn.prefill_tokens,
                "generated_tokens": turn.generated_tokens,
                "reused_cache": turn.reused_cache,
                "cached_tokens": session.cache.get_seq_length(),
                "image_encodes": session.image_encodes,
            }
            print(json.dumps(stats), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
