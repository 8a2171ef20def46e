"""``python -m llava.convert to-hf SRC DST [--model-base BASE]`` / ``to-llava SRC DST [--projector-only]``."""
from __future__ import annotations

import argparse

from .core import to_hf, to_llava


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    hf = commands.add_parser("to-hf", help="original LLaVA checkpoint -> llava-hf folder")
    hf.add_argument("src")
    hf.add_argument("dst")
    hf.add_argument("--model-base", default=None, help="base checkpoint of a projector-only SRC")
    back = commands.add_parser("to-llava", help="llava-hf folder -> original LLaVA checkpoint")
    back.add_argument("src")
    back.add_argument("dst")
    back.add_argument("--projector-only", action="store_true", help="write mm_projector.safetensors + config only")
    args = parser.parse_args(argv)
    if args.command == "to-hf":
        print(to_hf(args.src, args.dst, model_base=args.model_base))
    else:
        print(to_llava(args.src, args.dst, projector_only=args.projector_only))


if __name__ == "__main__":
    main()
