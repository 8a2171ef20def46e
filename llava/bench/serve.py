"""Serving benchmark: vLLM vanilla vs vision-side compression, on the same machine in one run.

    python -m llava.bench.serve --geometry tiny                  # CPU smoke (.venv-vllm), about 2 min
    python -m llava.bench.serve --geometry llava-1.5-7b          # GPU: LLaVA-1.5-7B geometry, random weights

Run it in the vLLM environment (scripts/setup_vllm_env.sh; on a GPU machine: ``pip install vllm`` and
``pip install --no-deps -e .``). For every configuration (vanilla, then each method of ``--methods`` at each
budget of ``--budgets``) a fresh vLLM engine (``AsyncLLM``, its own process, so one configuration's memory never
weighs on the next) serves ``--num-requests`` image requests, at most ``--concurrency`` in flight, each with its
own random image (so no encoder or prefix cache serves one request from another's image) and ``--output-len``
generated tokens (``ignore_eos``). Reported per configuration:

- requests/s and output tokens/s over the measured window (first submission to last completion);
- median and p90 time to first token (TTFT, from submission);
- prompt tokens per request (text + the image's tokens: what the KV cache holds per request before decoding)
  and the peak KV-cache usage vLLM reports (``vllm:kv_cache_usage_perc``, sampled while the requests run);
- the speed-up over vanilla (requests/s ratio, median TTFT ratio).

The model is a llava-hf folder written from a named geometry (``llava.bench.geometry``: real layer counts and
widths; ``tiny``/``tiny-next`` the fixtures' shape) with this project's tiny word-level tokenizer, and vLLM
initialises the weights at random (``load_format="dummy"``): no checkpoint is downloaded or written. Timings
are of this machine; on a CPU they are a smoke test of the pipeline, not figures for a GPU server.
``--model PATH`` serves a real llava-hf checkpoint instead (its own weights and tokenizer).
``--write-model DIR`` only writes the geometry's folder (``vllm serve DIR --load-format dummy`` serves it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVED_METHODS = ("visionzip", "vispruner", "pooling", "random")
PROMPT = "USER: <image>\ndescribe the image ASSISTANT:"
# LLaVA-1.5's conversation format, for the OpenAI server's chat requests (the tiny tokenizer has no template)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %} {% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{{ message['content'][0]['text'] }}"
    "{% endif %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# ----- the model folder ------------------------------------------------------------------------------------
def write_model(geometry_name: str, folder: Path) -> Path:
    """A llava-hf LLaVA (or LLaVA-NeXT for anyres geometries) config, tokenizer and processor, no weights."""
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    from llava.bench.geometry import NEXT_GRID_PINPOINTS, get_geometry
    from visionzip.hf.tiny import tiny_tokenizer

    geometry = get_geometry(geometry_name)
    tokenizer = tiny_tokenizer()
    llm, tower = geometry.llm, geometry.tower
    text = LlamaConfig(
        vocab_size=max(llm.vocab, len(tokenizer)), hidden_size=llm.hidden, intermediate_size=llm.intermediate,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.num_kv_heads,
        max_position_embeddings=4096, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    common = dict(vision_config=tower.clip_config(), text_config=text, vision_feature_layer=-2,
                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu")
    size = tower.image_size
    crop = {"height": size, "width": size}
    if geometry.anyres:
        config = LlavaNextConfig(image_grid_pinpoints=NEXT_GRID_PINPOINTS, **common)
        config.architectures = ["LlavaNextForConditionalGeneration"]
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size=crop,
                                                    image_grid_pinpoints=NEXT_GRID_PINPOINTS),
            tokenizer=tokenizer, patch_size=tower.patch_size, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    else:
        config = LlavaConfig(**common)
        config.architectures = ["LlavaForConditionalGeneration"]
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size=crop),
            tokenizer=tokenizer, patch_size=tower.patch_size, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    config.dtype = "float16"
    processor.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ----- one configuration (run in its own process) --------------------------------------------------------
def _architecture(model: str) -> str:
    config = json.loads((Path(model) / "config.json").read_text())
    anyres = "LlavaNextForConditionalGeneration" in config.get("architectures", [])
    return "VisionZipLlavaNextForConditionalGeneration" if anyres else "VisionZipLlavaForConditionalGeneration"


def run_one(job: dict) -> dict:
    """Serve ``job``'s requests with one engine; the figures of one configuration."""
    import asyncio

    import numpy as np
    from PIL import Image
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.reader import Gauge, get_metrics_snapshot

    overrides = {}
    if job["spec"] != "none":
        overrides = {"architectures": [_architecture(job["model"])], "visual_compression": job["spec"]}
    args = AsyncEngineArgs(
        model=job["model"], hf_overrides=overrides, load_format=job["load_format"], dtype=job["dtype"],
        max_model_len=job["max_model_len"], max_num_seqs=job["concurrency"], enforce_eager=job["enforce_eager"],
        enable_prefix_caching=False, limit_mm_per_prompt={"image": 1}, seed=0,
    )
    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(args)
    startup_s = time.perf_counter() - started
    rng = np.random.default_rng(job["seed"])
    width, height = job["image_size"]
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
              for _ in range(job["num_requests"] + job["warmup"])]
    params = SamplingParams(temperature=0, max_tokens=job["output_len"], ignore_eos=True)

    async def request(index: int, gate: asyncio.Semaphore, record: list):
        async with gate:
            submitted = time.perf_counter()
            first = None
            final = None
            async for out in engine.generate({"prompt": PROMPT, "multi_modal_data": {"image": images[index]}},
                                             params, request_id=f"r{index}"):
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter()
                final = out
            record.append({"submitted": submitted, "ttft": first - submitted, "done": time.perf_counter(),
                           "prompt_tokens": len(final.prompt_token_ids),
                           "output_tokens": len(final.outputs[0].token_ids)})

    def kv_usage() -> float:
        values = [m.value for m in get_metrics_snapshot() if isinstance(m, Gauge) and m.name == "vllm:kv_cache_usage_perc"]
        return max(values) if values else float("nan")

    async def main() -> dict:
        warm: list = []
        await asyncio.gather(*(request(i, asyncio.Semaphore(job["concurrency"]), warm) for i in range(job["warmup"])))
        gate, record, peak = asyncio.Semaphore(job["concurrency"]), [], [0.0]
        done = asyncio.Event()

        async def sample():
            while not done.is_set():
                peak[0] = max(peak[0], kv_usage())
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(request(job["warmup"] + i, gate, record) for i in range(job["num_requests"])))
        done.set()
        await sampler
        window = max(r["done"] for r in record) - min(r["submitted"] for r in record)
        ttfts = sorted(r["ttft"] for r in record)
        return {
            "spec": job["spec"], "startup_s": startup_s, "window_s": window,
            "requests_per_s": len(record) / window,
            "output_tokens_per_s": sum(r["output_tokens"] for r in record) / window,
            "ttft_median_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
            "prompt_tokens": statistics.median(r["prompt_tokens"] for r in record),
            "kv_cache_peak_pct": 100 * peak[0],
        }

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


# ----- the run ---------------------------------------------------------------------------------------------
def configurations(methods: list[str], budgets: list[int]) -> list[str]:
    from visionzip.config import CompressionConfig

    specs = ["none"]
    for method in methods:
        for budget in budgets:
            spec = CompressionConfig.parse(f"{method}:{budget}")  # a bad method or budget: a ValueError now
            if spec.settings.stage == "llm":
                raise ValueError(f"{method}: acts inside the language model; the vLLM plugin serves vision-side methods")
            specs.append(f"{method}:{budget}")
    return specs


def table(results: list[dict], device: str, job: dict) -> str:
    base = results[0]
    lines = [
        f"vLLM serving, {job['label']} on {device}: {job['num_requests']} requests, concurrency {job['concurrency']}, "
        f"{job['output_len']} output tokens each, image {job['image_size'][0]}x{job['image_size'][1]}",
        f"{'config':<16}{'prompt tok':>11}{'req/s':>9}{'out tok/s':>11}{'TTFT med':>10}{'TTFT p90':>10}"
        f"{'KV peak':>9}{'x req/s':>9}{'x TTFT':>8}",
    ]
    for r in results:
        lines.append(
            f"{r['spec']:<16}{r['prompt_tokens']:>11.0f}{r['requests_per_s']:>9.2f}{r['output_tokens_per_s']:>11.1f}"
            f"{r['ttft_median_s'] * 1000:>8.0f}ms{r['ttft_p90_s'] * 1000:>8.0f}ms{r['kv_cache_peak_pct']:>8.1f}%"
            f"{r['requests_per_s'] / base['requests_per_s']:>9.2f}{base['ttft_median_s'] / r['ttft_median_s']:>8.2f}"
        )
    return "\n".join(lines)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    import platform

    name = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores (CPU)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="tiny", help="llava.bench.geometry name (random weights); default tiny")
    parser.add_argument("--model", default=None, help="a llava-hf checkpoint folder instead of --geometry")
    parser.add_argument("--methods", nargs="+", default=list(SERVED_METHODS), help="vision-side methods to compare")
    parser.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 192], help="tokens per image (per view)")
    parser.add_argument("--num-requests", type=int, default=None, help="default: 4 x concurrency (GPU), 16 (CPU)")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight; default 32 (GPU), 8 (CPU)")
    parser.add_argument("--output-len", type=int, default=None, help="tokens generated per request; 64 (GPU), 8 (CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="requests served before the measured ones")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default=None, help="default float16 (GPU), float32 (CPU)")
    parser.add_argument("--json", default=None, help="write the results here as well (atomically)")
    parser.add_argument("--write-model", default=None, metavar="DIR",
                        help="only write --geometry's model folder (config, tokenizer, processor; no weights) to DIR "
                        "and exit: serve it with --load-format dummy (docs/serving.md)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one configuration's job (JSON)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.one:
        print("SERVE_RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    if args.write_model:
        print(write_model(args.geometry, Path(args.write_model)))
        return
    for name in ("num_requests", "concurrency", "output_len", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be at least {0 if name == 'warmup' else 1}, got {value}")
    specs = configurations(args.methods, args.budgets)
    import torch

    gpu = torch.cuda.is_available()
    concurrency = args.concurrency or (32 if gpu else 8)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        if args.model:
            model, label, load_format = args.model, Path(args.model).name, "auto"
        else:
            from llava.bench.geometry import get_geometry

            geometry = get_geometry(args.geometry)  # an unknown name: a ValueError naming the choices
            model = str(write_model(geometry.name, Path(scratch) / geometry.name))
            label, load_format = f"{geometry.name} geometry (random weights)", "dummy"
        from llava.bench.geometry import get_geometry

        anyres = "Next" in _architecture(model)
        image_size = (672, 672) if anyres else (336, 336)
        if not args.model:
            image_size = tuple(get_geometry(args.geometry).image_size)
        job = {
            "model": model, "label": label, "load_format": load_format, "dtype": args.dtype or ("float16" if gpu else "float32"),
            "max_model_len": args.max_model_len, "concurrency": concurrency,
            "num_requests": args.num_requests or (4 * concurrency if gpu else 16),
            "output_len": args.output_len or (64 if gpu else 8), "warmup": args.warmup, "seed": 0,
            "image_size": list(image_size), "enforce_eager": not gpu,
        }
        env = dict(os.environ, VLLM_NO_USAGE_STATS="1")
        if not gpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        results = []
        for spec in specs:
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "llava.bench.serve", "--one", json.dumps(dict(job, spec=spec))],
                capture_output=True, text=True, env=env,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("SERVE_RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"{spec}: the engine failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-12000:]}")
            result = json.loads(lines[-1][len("SERVE_RESULT "):])
            results.append(result)
            print(f"[serve-bench] {spec}: {result['requests_per_s']:.2f} req/s, TTFT median "
                  f"{result['ttft_median_s'] * 1000:.0f} ms ({time.perf_counter() - started:.0f} s with startup)", flush=True)
    report = table(results, device_name(), job)
    print(report)
    if args.json:
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"device": device_name(), "job": job, "results": results}, indent=2))
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
