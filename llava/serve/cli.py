"""Chat about an image in the terminal, turn after turn, with the image kept in the KV cache.

    python -m llava.serve.cli --model-path P --image-file F [--compression visionzip:64]
        [--conv-mode TEMPLATE] [--device cpu] [--temperature 0.2] [--max-new-tokens 512]

Type a message after the user prompt; an empty line or end of input (Ctrl-D) ends the chat.
``--debug`` prints, after each reply, how many tokens the turn read into the cache.

A model that builds its own inputs (``model.build_processor``: the natively implemented families of
``llava.model.builder.NATIVE_FAMILIES``, e.g. CogVLM) chats through its own processor (``OneQuestionChat``):
its prompts hold one question, so each message is asked about the image on its own (the earlier turns are not
in the prompt, and the image is read again each turn); ``--conv-mode`` is the family's own format where it has
several (None: the checkpoint's).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from llava.compression_args import add_compression_arguments, compression_from_args
from llava.eval.model_processor import builds_own_inputs, processor_for, refuse_llava_only_option
from llava.mm_utils import load_image
from llava.model.builder import default_conv_mode, load_pretrained_model
from llava.model.compiled import add_compile_argument, compiled_runner
from llava.preflight import (
    check_device,
    check_generation_options,
    check_prompt_fits,
    model_max_positions,
    prompt_positions,
)
from llava.serve.chat import ChatSession, TurnStats


class OneQuestionChat:
    """The chat of a model that builds its own inputs (``model.build_processor``, ``llava.eval.model_processor``):
    each message is one question about the image, built by the model's processor and answered by its
    ``generate``, as run_llava asks it (the same prompt-length policy: ``llava.preflight``). The processor's
    prompts hold one question, so no earlier turn is in the prompt and no cache is kept between turns.
    ``image_encodes`` counts tower passes: two a turn (the length check counts the visual tokens, then
    ``generate`` encodes the image)."""

    roles = ("USER", "ASSISTANT")

    def __init__(self, model, tokenizer, image_processor, conv_mode: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.processor, self.conv_mode = processor_for(model, tokenizer, image_processor, conv_mode)
        self.image = None
        self.image_encodes = 0
        self.turns: list[TurnStats] = []

    def set_image(self, image) -> None:
        self.image = image

    def ask(self, text: str, max_new_tokens: int = 512, temperature: float = 0.0, stream=None) -> str:
        if self.image is None:
            raise ValueError("set_image() first: the chat is about an image")
        check_generation_options(temperature, None, 1, max_new_tokens)
        inputs = self.processor([text], [[self.image]])
        host_ids = inputs.input_ids.cpu()  # one prompt: no pads
        positions = prompt_positions(self.model, list(host_ids), inputs.images, inputs.image_sizes)[0]
        allowed = check_prompt_fits(positions, max_new_tokens, model_max_positions(self.model.config))
        sample = temperature > 0
        with torch.inference_mode():
            output_ids = self.model.generate(
                **inputs.generate_kwargs(), do_sample=sample, temperature=temperature if sample else None,
                top_p=None, num_beams=1, max_new_tokens=allowed, use_cache=True,
                pad_token_id=self.processor.pad_token_id,
            )
        self.image_encodes += 2
        width = host_ids.shape[1]
        if output_ids.shape[1] > width and torch.equal(output_ids[:, :width].cpu(), host_ids):
            output_ids = output_ids[:, width:]  # a generate that returns the prompt too
        reply_ids = [int(t) for t in output_ids[0] if int(t) != self.processor.pad_token_id]
        self.turns.append(TurnStats(positions, len(reply_ids), False))
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        if stream is not None:
            stream(reply)
        return reply


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
    if builds_own_inputs(model):
        if args.compile:
            refuse_llava_only_option(model, "--compile", "runs LLaVA's compiled path (llava.model.compiled)")
        session = OneQuestionChat(model, tokenizer, image_processor, args.conv_mode)
        user, assistant = session.roles
        print(f"[{type(model).__name__}: each message is asked about the image on its own (its prompts hold one "
              "question)]", file=sys.stderr, flush=True)
    else:
        compiled = compiled_runner(model, args.compile)  # None without --compile; refuses in-LLM methods
        # with --compile the whole conversation lives in one static cache: the model's positions, twice over
        # (slots for the bucket padding of each turn's prefill; the positions are still capped at the model's)
        session = ChatSession(model, tokenizer, image_processor, conv_mode=args.conv_mode or default_conv_mode(model),
                              compiled=compiled,
                              max_cache_len=2 * (model_max_positions(model.config) or 4096))
        user, assistant = session.conv.roles
    session.set_image(image)
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
                "cached_tokens": session.cache.get_seq_length() if isinstance(session, ChatSession) else 0,
                "image_encodes": session.image_encodes,
            }
            print(json.dumps(stats), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
