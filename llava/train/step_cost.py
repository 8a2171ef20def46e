"""Training cost with compressed visual tokens: step time and peak memory of projector tuning and full
fine-tuning at 576 (no compression) vs VisionZip 192 / 128 / 64 tokens per image, on CPU.

    python scripts/train_step_cost.py                      # scaled-down LLaVA (LLM hidden 512, 6 layers)
    python scripts/train_step_cost.py --hidden 256 --layers 4 --steps 2 --batch 2   # quicker

The model is built by ``llava.model.tiny.build_tiny_llava`` with a wider, deeper language model so that,
as in LLaVA-7B, the LLM dominates the cost; the CLIP tower keeps ViT-L/14-336's geometry (577 tokens).
Each configuration runs in a fresh process (so that peak memory is its own): the model and a batch of
image samples are prepared by the training entry point's own functions, then ``--steps`` optimizer
steps (forward, backward, AdamW) are timed after one warm-up step. Memory is the process's resident set,
sampled every 2 ms: the peak during the steps, and that peak minus the resident set before the first step
(weights, data and interpreter excluded: activations, gradients, optimizer state). Step time is
reported as wall time and as this process's CPU time; on a shared machine the CPU time is the steadier
measure of the work done, and the speed-up column uses it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BUDGETS = (None, 192, 128, 64)  # None = no compression (576 tokens)
MODES = ("projector", "full")


class PeakMemory:
    """Samples this process's resident set size in a background thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.running = False
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def worker(
    model_dir: str, data_dir: str, mode: str, budget: int | None, steps: int, batch_size: int, threads: int
) -> dict:
    """One configuration, in this process: returns its measurements."""
    import psutil
    import torch

    torch.set_num_threads(threads)

    from llava.processor import LlavaProcessor

    from .dataset import LazySupervisedDataset, SupervisedCollator
    from .train import build_model_and_tokenizer, parse_arguments, visual_tokens_per_image

    argv = [
        "--model_name_or_path", model_dir,
        "--data_path", os.path.join(data_dir, "data.json"),
        "--output_dir", os.path.join(data_dir, "unused"),
        "--image_aspect_ratio", "pad",
        "--use_cpu", "True",
        "--report_to", "none",
        "--model_max_length", "2048",
    ]
    if budget is not None:
        argv += ["--compression", f"visionzip:{budget}"]
    if mode == "projector":
        argv += ["--tune_mm_mlp_adapter", "True"]
    model_args, data_args, compression_args, training_args = parse_arguments(argv)
    torch.manual_seed(0)
    model, tokenizer, processor, compression = build_model_and_tokenizer(
        model_args, training_args, compression_args, data_args
    )
    tokens = visual_tokens_per_image(model, compression)
    dataset = LazySupervisedDataset(
        data_args.data_path, LlavaProcessor.for_training(tokenizer, processor, "v1", image_aspect_ratio="pad"),
        image_folder=os.path.join(data_dir, "images"), visual_tokens_per_image=tokens,
    )
    batch = SupervisedCollator(tokenizer.pad_token_id, 2048)([dataset[i] for i in range(batch_size)])
    sequence = int(batch["input_ids"].shape[1]) - 1 + tokens
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model.train()

    def step() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu_start

    before = psutil.Process().memory_info().rss
    with PeakMemory() as memory:
        step()  # warm-up: allocates gradients and optimizer state
        times = [step() for _ in range(steps)]
    return {
        "mode": mode,
        "visual_tokens": tokens,
        "sequence": sequence,
        "step_s": statistics.median(t for t, _cpu in times),
        # CPU seconds of this process per step (all threads): the compute, much less sensitive than wall
        # time to other work on a shared machine
        "cpu_s": statistics.median(cpu for _t, cpu in times),
        "peak_rss_mib": memory.peak / 2**20,
        "training_mib": (memory.peak - before) / 2**20,
        "trainable": sum(p.numel() for p in trainable),
        "total": sum(p.numel() for p in model.parameters()),
    }


def build_inputs(folder: str, hidden: int, layers: int, batch_size: int, answer_words: int) -> tuple[str, str]:
    from llava.model.tiny import build_tiny_llava

    from .synthetic import write_synthetic_dataset

    model_dir = build_tiny_llava(os.path.join(folder, f"llava-bench-h{hidden}-l{layers}"), hidden=hidden, layers=layers)
    data_dir = os.path.join(folder, "data")
    write_synthetic_dataset(data_dir, num_image=batch_size, num_text=0, multi_turn=True, answer_words=answer_words)
    return model_dir, data_dir


def format_table(rows: list[dict]) -> str:
    lines = [
        "| mode | visual tokens | LLM sequence | step time (s) | CPU time (s) | CPU speed-up | peak RSS (MiB) "
        "| training memory (MiB) | memory vs 576 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        reference = next((r for r in rows if r["mode"] == mode and r["visual_tokens"] == 576), None)
        for row in (r for r in rows if r["mode"] == mode):
            speedup = reference["cpu_s"] / row["cpu_s"] if reference else float("nan")
            memory = row["training_mib"] / reference["training_mib"] if reference else float("nan")
            lines.append(
                f"| {mode} | {row['visual_tokens']} | {row['sequence']} | {row['step_s']:.2f} | {row['cpu_s']:.2f} | "
                f"{speedup:.2f}x | "
                f"{row['peak_rss_mib']:.0f} | {row['training_mib']:.0f} | {memory:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="LLM hidden size of the scaled-down model")
    parser.add_argument("--layers", type=int, default=6, help="LLM layers of the scaled-down model")
    parser.add_argument("--batch", type=int, default=4, help="image samples per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--answer-words", type=int, default=40, help="extra words per answer (text length)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: CPU time is pure compute, no OpenMP spinning on a busy machine)",
    )
    parser.add_argument("--workdir", default=None, help="where the model and data go (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one configuration, in a fresh process
        spec = json.loads(args.worker)
        result = worker(
            spec["model_dir"], spec["data_dir"], spec["mode"], spec["budget"], args.steps, args.batch, args.threads
        )
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    workdir = args.workdir or tempfile.mkdtemp(prefix="llava-bench-")
    model_dir, data_dir = build_inputs(workdir, args.hidden, args.layers, args.batch, args.answer_words)
    print(
        f"scaled-down LLaVA: LLM hidden {args.hidden}, {args.layers} layers; CLIP ViT-L/14-336 geometry (tiny width); "
        f"batch {args.batch} image samples; {args.steps} timed steps; torch {torch.__version__}, "
        f"{args.threads} thread(s), CPU",
        flush=True,
    )
    rows = []
    for mode in MODES:
        for budget in BUDGETS:
            spec = json.dumps({"model_dir": model_dir, "data_dir": data_dir, "mode": mode, "budget": budget})
            command = [sys.executable, "-m", "llava.train.step_cost", "--worker", spec, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
                raise RuntimeError(f"benchmark worker failed: mode {mode}, budget {budget}")
            row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            print(f"  {mode:9s} {row['visual_tokens']:4d} tokens: {row['step_s']:.3f} s/step "
                  f"({row['cpu_s']:.3f} CPU s), "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
