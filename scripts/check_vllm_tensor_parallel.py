"""Tensor parallelism check of the vLLM plugin: the same llava-hf checkpoint, spec and images served with
``--tensor-parallel-size`` 1 and N (vLLM's own engine, one process each), greedy tokens and their log-probs
compared. Under tensor parallelism each rank holds a share of the vision tower's heads; the plugin gathers
the scored layer's q and k across ranks (``visionzip/vllm/encoders.py``), so every rank keeps the same
tokens and the answers equal the single-rank ones.

    .venv-vllm/bin/python scripts/check_vllm_tensor_parallel.py PATH [--spec visionzip:64] [--tp 2]

On the CPU backend each rank needs its own cores: set ``VLLM_CPU_OMP_THREADS_BIND`` (e.g. ``0|1`` for two
ranks on two cores). Prints one line per run and exits 1 when tokens differ or log-probs differ by more than
``--atol``. What was run with it: docs/serving.md, "Tensor parallelism".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "VisionZipLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "VisionZipLlavaNextForConditionalGeneration",
}


def serve(path: str, spec: str, tp: int, images: int) -> dict:
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        architecture = json.load(handle)["architectures"][0]
    if architecture not in ARCHITECTURES:
        raise SystemExit(f"{path}: architecture {architecture!r}; this check serves {sorted(ARCHITECTURES)}")
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(images)]
    llm = LLM(model=path, hf_overrides={"architectures": [ARCHITECTURES[architecture]], "visual_compression": spec},
              enforce_eager=True, dtype="float32", max_model_len=2048, max_num_seqs=8, seed=0,
              tensor_parallel_size=tp, limit_mm_per_prompt={"image": 1})
    requests = [{"prompt": "USER: <image>\nWhat is in the image? ASSISTANT:", "multi_modal_data": {"image": p}}
                for p in pictures]
    answers = llm.generate(requests, SamplingParams(temperature=0, max_tokens=8, logprobs=0))
    return {"prompt_tokens": [len(a.prompt_token_ids) for a in answers],
            "tokens": [list(a.outputs[0].token_ids) for a in answers],
            "logprobs": [[float(step[token].logprob) for step, token in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
                         for a in answers]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a llava-hf checkpoint folder (llava.convert to-hf makes one)")
    parser.add_argument("--spec", default="visionzip:64")
    parser.add_argument("--tp", type=int, default=2, help="the tensor-parallel size compared with 1")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--atol", type=float, default=1e-4, help="largest log-prob difference accepted")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tp < 2:
        parser.error(f"--tp {args.tp}: compare with a tensor-parallel size of at least 2")
    if args.child is not None:
        print("RESULT " + json.dumps(serve(args.path, args.spec, args.child, args.images)), flush=True)
        return 0
    results = {}
    for tp in (1, args.tp):
        env = dict(os.environ, VLLM_NO_USAGE_STATS="1")
        if tp == 1:
            env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        done = subprocess.run([sys.executable, __file__, args.path, "--spec", args.spec, "--images", str(args.images),
                               "--child", str(tp)], capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print((done.stdout + done.stderr)[-4000:], file=sys.stderr)
            print(f"tensor-parallel-size {tp}: the engine failed (its output above)", file=sys.stderr)
            return 1
        results[tp] = json.loads(lines[0][len("RESULT "):])
        print(f"tensor-parallel-size {tp}: prompt tokens {results[tp]['prompt_tokens']}, tokens {results[tp]['tokens']}")
    one, many = results[1], results[args.tp]
    gap = max(abs(a - b) for x, y in zip(one["logprobs"], many["logprobs"]) for a, b in zip(x, y))
    same = one["tokens"] == many["tokens"] and one["prompt_tokens"] == many["prompt_tokens"]
    print(f"{args.spec}: tokens {'equal' if same else 'DIFFER'}, largest log-prob difference {gap:.2e} (atol {args.atol})")
    return 0 if same and gap <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
