"""A seconds-long projector-tuning run (VisionZip‡ in miniature) on a local LLaVA checkpoint.

    python -m llava.train.quick --model-dir <llava checkpoint> --output-dir /tmp/projector-demo --steps 4

It writes a small synthetic dataset beside the output, trains only ``mm_projector`` on VisionZip's
compressed tokens through the real entry point (``llava.train.train.train``), and returns the losses.
"""
from __future__ import annotations

import argparse
import os
import sys

from .synthetic import write_synthetic_dataset
from .train import parse_arguments, train


def tune_projector_demo(
    model_dir: str,
    output_dir: str,
    steps: int = 4,
    visual_tokens: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    overwrite: bool = True,
) -> list[float]:
    """Projector-only training with VisionZip at ``visual_tokens`` per image for ``steps`` steps on CPU.

    ``output_dir/data`` receives the synthetic dataset and ``output_dir/run`` the run (``mm_projector.bin``,
    ``config.json``, ``training_complete.json``). ``overwrite``: the demo's run folder is its own scratch
    space, replaced on each call unless False. Returns the logged loss of every step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    data_path = write_synthetic_dataset(os.path.join(output_dir, "data"), num_image=4, num_text=0, seed=seed)
    argv = [
        "--model_name_or_path", model_dir,
        "--data_path", data_path,
        "--image_folder", os.path.join(output_dir, "data", "images"),
        "--tune_mm_mlp_adapter", "True",
        "--compression", f"visionzip:{visual_tokens}",
        "--image_aspect_ratio", "pad",
        "--output_dir", os.path.join(output_dir, "run"),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", "2",
        "--learning_rate", str(learning_rate),
        "--lr_scheduler_type", "constant",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu", "True",
        "--seed", str(seed),
        "--disable_tqdm", "True",
        "--model_max_length", "2048",
        "--overwrite_output_dir", str(overwrite),
    ]
    result = train(*parse_arguments(argv))
    return result.losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a LLaVA checkpoint folder")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--visual-tokens", type=int, default=64, help="VisionZip budget: 64, 128 or 192")
    args = parser.parse_args(argv)
    losses = tune_projector_demo(args.model_dir, args.output_dir, steps=args.steps, visual_tokens=args.visual_tokens)
    print("projector tuning losses: " + " ".join(f"{loss:.3f}" for loss in losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
