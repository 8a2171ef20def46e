"""The vLLM serving plugin (visionzip.vllm) on vLLM's own engine (``vllm.LLM`` and its OpenAI server, CPU
backend) in its own environment (.venv-vllm, made by scripts/setup_vllm_env.sh; ``bash scripts/test.sh`` sets
it up in the background and runs this module beside the main suite, docs/serving.md). Served: the official
tiny LLaVA-1.5 and LLaVA-NeXT, converted to llava-hf with ``llava.convert to-hf``, with vision-side
compression selected by ``hf_overrides``. Asserted: vLLM reserves the compressed count per image (prompt tokens
= text + budget per view, for every image of a batch, square or not); its greedy tokens equal this
environment's transformers path (``apply_compression`` on the HF class + ``compression_aware_processor``) for
the same checkpoint, spec, prompt ids and image; bad specs, in-LLM methods and methods that cannot run on
vLLM's tower are refused at startup with a ValueError naming them. All engines run in one vLLM process (its
imports, about 20 s, are paid once), a few decode tokens each."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = "VisionZipLlavaForConditionalGeneration"
NEXT_ARCHITECTURE = "VisionZipLlavaNextForConditionalGeneration"
# LLaVA-NeXT: one engine; the budget is per view (base view + each crop of the anyres grid)
NEXT_SPEC, NEXT_BUDGET = "visionzip:32", 32
NEXT_REFUSED = {
    "fastv:32": "stage 'llm'",
    '{"method": "visionzip", "dominant": 24, "contextual": 8, "anyres_layout": "spatial"}': "anyres_layout='spatial'",
}
# spec -> tokens per image, one engine each (after the first, an engine starts in about 5 s)
SPECS = {"visionzip:64": 64, "pooling:64": 64, "random:32": 32, "vispruner:32": 32, "prumerge+:32": 32, "tome:64": 64}
# VisPruner's chain of argsorts over near-equal duplication scores flips its selection on this random-weight
# checkpoint under 1e-6 pixel noise (5 of 5 draws, measured in .venv), so vLLM's kernels (a fused qkv_proj,
# its own attention) legitimately pick other tokens: its count is checked, its tokens are not. random draws
# view b of an encoder batch with seed + b (visionzip/methods/random_tokens.py), and vLLM batches the images of
# concurrent requests: the subset depends on the batch position, so only its count is checked too.
# prumerge+ scores the tower's last layer, past LLaVA's feature layer: vLLM's tower must be built to full depth.
# tome runs its own loop over vLLM's layers (the adapter's q/k/v/out_proj views of the fused qkv_proj)
TOKENS_EQUAL = ("visionzip:64", "pooling:64", "prumerge+:32", "tome:64")
# refused at startup: in-LLM method, unknown method, a budget beyond the tower, an image-dependent count
REFUSED = {
    "fastv:64": "stage 'llm'",
    "nosuch:64": "unknown compression method 'nosuch'",
    "visionzip:999": "exceeds the 577 tokens",
    "prumerge:mode=adaptive": "image-dependent number of tokens",
}
PROMPTS = ("USER: <image>\nWhat is in the image? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:")
MAX_TOKENS = 8

# Runs in .venv-vllm: one engine per (model, spec) answering one batch, then the refusals. Prints one JSON line.
VLLM_SCRIPT = r"""
import json, sys, time
import numpy as np
from PIL import Image
from vllm import LLM, SamplingParams


def engine(job, run):
    compression = run["spec"] if not run["spec"].startswith("{") else json.loads(run["spec"])
    return LLM(model=run["model"], hf_overrides={"architectures": [run["architecture"]], "visual_compression": compression},
               enforce_eager=True, dtype="float32", max_model_len=2048, max_num_seqs=8, seed=0,
               limit_mm_per_prompt={"image": 1})


def main():
    job = json.loads(open(sys.argv[1]).read())
    out = {"runs": {}, "refused": {}}
    images = [Image.open(path).convert("RGB") for path in job["images"]]
    for run in job["runs"]:
        start = time.time()
        llm = engine(job, run)
        started = time.time() - start
        requests = [{"prompt_token_ids": ids, "multi_modal_data": {"image": images[i]}}
                    for ids, i in zip(run["prompt_ids"], job["image_of_request"])]
        answers = llm.generate(requests, SamplingParams(temperature=0, max_tokens=job["max_tokens"]))
        out["runs"][run["name"]] = {"engine_start_s": started, "total_s": time.time() - start,
                                    "prompt_tokens": [len(a.prompt_token_ids) for a in answers],
                                    "tokens": [list(a.outputs[0].token_ids) for a in answers]}
        del llm
    for run in job["refused"]:
        try:
            engine(job, run)
            out["refused"][run["name"]] = "accepted"
        except Exception as error:
            out["refused"][run["name"]] = type(error).__name__ + ": " + str(error)
    print("VLLM_RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
"""


# ----- the engine (.venv-vllm) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_hf(official_checkpoints) -> Path:
    from llava.convert.core import to_hf

    dst = official_checkpoints / "llava-v1.5-tiny-hf"
    to_hf(str(official_checkpoints / "llava-v1.5-tiny"), str(dst))
    return dst


@pytest.fixture(scope="module")
def llava_next_hf(official_checkpoints) -> Path:
    from llava.convert.core import to_hf

    dst = official_checkpoints / "llava-v1.6-tiny-hf"
    to_hf(str(official_checkpoints / "llava-v1.6-tiny"), str(dst))
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three square images at the tower's size (both environments' processors leave them unresized, so the
    pixels agree exactly) and one wide image (placeholder count only: resizing backends differ)."""
    folder = tmp_path_factory.mktemp("vllm-images")
    rng = np.random.default_rng(0)
    paths = []
    for index, shape in enumerate([(336, 336, 3)] * 3 + [(200, 500, 3)]):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# request i: prompt PROMPTS[i % 2] with image IMAGE_OF_REQUEST[i]; the last request's image is the wide one
IMAGE_OF_REQUEST = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def transformers_answers(llava_hf, images) -> dict:
    """This environment's path per spec: the unexpanded prompt ids (one <image> token each), and for the
    square images the compressed prompt length and the greedy tokens."""
    from transformers import LlavaForConditionalGeneration

    answers = {"prompt_ids": _prompt_ids(llava_hf)}
    for spec in SPECS:
        answers[spec] = _transformers_runs(LlavaForConditionalGeneration, llava_hf, spec, images, IMAGE_OF_REQUEST[:3])
    return answers


def _prompt_ids(path) -> list[list[int]]:
    """Each request's prompt ids with one <image> token (vLLM expands it to the count it reserves)."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    return [tokenizer(PROMPTS[i % 2]).input_ids for i in range(len(IMAGE_OF_REQUEST))]


def _transformers_runs(model_class, path, spec, images, image_indices) -> list[dict]:
    """The transformers path for one spec: per request, the compressed prompt length and the greedy tokens."""
    from transformers import AutoProcessor

    import visionzip
    from visionzip.hf import compression_aware_processor

    processor = AutoProcessor.from_pretrained(path)
    model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    visionzip.apply_compression(model, spec)
    aware = compression_aware_processor(processor, model)
    runs = []
    for i, image_index in enumerate(image_indices):
        inputs = aware(text=PROMPTS[i % 2], images=Image.open(images[image_index]).convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        length = inputs["input_ids"].shape[1]
        runs.append({"prompt_tokens": length, "tokens": out[0, length:].tolist()})
    return runs


@pytest.fixture(scope="module")
def next_transformers_answers(llava_next_hf, images) -> dict:
    """LLaVA-NeXT's transformers path at NEXT_SPEC, for every request's image (the non-square one included:
    its placeholder count is compared; its pixels may differ between the environments' resizing)."""
    from transformers import LlavaNextForConditionalGeneration

    return {"prompt_ids": _prompt_ids(llava_next_hf),
            "runs": _transformers_runs(LlavaNextForConditionalGeneration, llava_next_hf, NEXT_SPEC, images, IMAGE_OF_REQUEST)}


@pytest.fixture(scope="module")
def vllm_answers(vllm_python, llava_hf, llava_next_hf, images, transformers_answers, next_transformers_answers,
                 tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("vllm-run")
    llava = {"model": str(llava_hf), "architecture": ARCHITECTURE, "prompt_ids": transformers_answers["prompt_ids"]}
    llava_next = {"model": str(llava_next_hf), "architecture": NEXT_ARCHITECTURE,
                  "prompt_ids": next_transformers_answers["prompt_ids"]}
    job = {
        "runs": [dict(llava, name=spec, spec=spec) for spec in SPECS]
        + [dict(llava_next, name="next " + NEXT_SPEC, spec=NEXT_SPEC)],
        "refused": [dict(llava, name=spec, spec=spec) for spec in REFUSED]
        + [dict(llava_next, name="next " + spec, spec=spec) for spec in NEXT_REFUSED],
        "images": [str(p) for p in images], "image_of_request": IMAGE_OF_REQUEST, "max_tokens": MAX_TOKENS,
    }
    (folder / "job.json").write_text(json.dumps(job))
    (folder / "run.py").write_text(VLLM_SCRIPT)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        # one process (the engine core in this one): startup errors surface as the plugin's own exceptions
        VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
    )
    start = time.time()
    done = subprocess.run(
        [str(vllm_python), str(folder / "run.py"), str(folder / "job.json")],
        capture_output=True, text=True, timeout=900, env=env, cwd=folder,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("VLLM_RESULT ")]
    assert done.returncode == 0 and len(lines) == 1, (done.stdout + done.stderr)[-6000:]
    result = json.loads(lines[0][len("VLLM_RESULT "):])
    result["wall_s"] = time.time() - start
    result["next_model"] = str(llava_next_hf)
    result["image_sizes"] = [Image.open(path).size[::-1] for path in images]  # (height, width)
    print(f"vLLM run: {result['wall_s']:.1f} s;", {s: round(r["engine_start_s"], 1) for s, r in result["runs"].items()})
    return result


def test_vllm_reserves_text_plus_budget_per_image(vllm_answers, transformers_answers):
    """usage.prompt_tokens (the prompt vLLM schedules and caches) = text tokens + the budget, per image of a
    batch with different images and prompts, a non-square one included."""
    text = [len(ids) - 1 for ids in transformers_answers["prompt_ids"]]  # the <image> token becomes the budget
    for spec, budget in SPECS.items():
        assert vllm_answers["runs"][spec]["prompt_tokens"] == [n + budget for n in text], spec
        assert [r["prompt_tokens"] for r in transformers_answers[spec]] == [n + budget for n in text[:3]], spec


def test_vllm_greedy_tokens_equal_transformers_path(vllm_answers, transformers_answers):
    for spec in TOKENS_EQUAL:
        vllm_tokens = vllm_answers["runs"][spec]["tokens"]
        assert all(len(tokens) > 0 for tokens in vllm_tokens), spec
        assert vllm_tokens[:3] == [r["tokens"] for r in transformers_answers[spec]], spec


def test_bad_specs_and_unservable_methods_refused_at_startup(vllm_answers):
    refused = dict(REFUSED, **{"next " + spec: message for spec, message in NEXT_REFUSED.items()})
    for name, message in refused.items():
        refusal = vllm_answers["refused"][name]
        assert refusal.startswith("ValueError: ") and message in refusal, (name, refusal)


def test_llava_next_reserves_budget_per_view(vllm_answers, next_transformers_answers):
    """LLaVA-NeXT: prompt tokens = text + (1 + crops) x budget, for each image of a batch (the grid from the
    image's size and the config's pinpoints), the same count as the transformers path's processor."""
    from transformers import AutoConfig
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    run = vllm_answers["runs"]["next " + NEXT_SPEC]
    config = AutoConfig.from_pretrained(vllm_answers["next_model"])
    text = [len(ids) - 1 for ids in next_transformers_answers["prompt_ids"]]
    expected = []
    for n, image_index in zip(text, IMAGE_OF_REQUEST):
        height, width = vllm_answers["image_sizes"][image_index]
        rows, cols = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, config.vision_config.image_size)
        expected.append(n + (1 + rows * cols) * NEXT_BUDGET)
    assert run["prompt_tokens"] == expected
    assert [r["prompt_tokens"] for r in next_transformers_answers["runs"]] == expected
    assert len(set(expected)) > 1  # the wide image has another grid than the square ones


def test_llava_next_greedy_tokens_equal_transformers_path(vllm_answers, next_transformers_answers):
    tokens = vllm_answers["runs"]["next " + NEXT_SPEC]["tokens"]
    assert all(len(t) > 0 for t in tokens)
    assert tokens[:3] == [r["tokens"] for r in next_transformers_answers["runs"][:3]]


# ----- the OpenAI-compatible server (llava.serve.vllm), a real HTTP client on localhost -------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _status(port: int, path: str, body: dict) -> int:
    """The HTTP status of a POST (an error status is returned, not raised)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_openai_server_answers_images_at_the_compressed_count(vllm_python, llava_hf, images, tmp_path):
    """``python -m llava.serve.vllm --compression visionzip:64`` starts vLLM's OpenAI server; a concurrent batch
    of chat requests with different images over HTTP is answered, each with usage.prompt_tokens = the same
    text without the image + 64 (+ the template's newline after <image>, one token). Malformed requests (bad
    image bytes, a non-image content type, a decompression-bomb image) get a 4xx and the server keeps serving."""
    import base64
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1")
    command = [str(vllm_python), "-m", "llava.serve.vllm", "--model", str(llava_hf), "--compression", "visionzip:64",
               "--port", str(port), "--host", "127.0.0.1", "--enforce-eager", "--dtype", "float32",
               "--max-model-len", "1024", "--max-num-seqs", "4"]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        start = time.time()
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-6000:]
            assert time.time() - start < 600, "the server did not come up in 600 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        print(f"server up in {time.time() - start:.1f} s")
        question = {"type": "text", "text": "What is in the image?"}

        def chat(content: list) -> dict:
            body = {"model": str(llava_hf), "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": content}]}
            return _post(port, "/v1/chat/completions", body)

        urls = ["data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() for path in images]
        with ThreadPoolExecutor(len(urls)) as pool:
            answers = list(pool.map(lambda url: chat([{"type": "image_url", "image_url": {"url": url}}, question]), urls))
        text_only = chat([question])["usage"]["prompt_tokens"]
        for answer in answers:
            assert answer["usage"]["prompt_tokens"] == text_only + 64 + 1, answer["usage"]
            assert answer["usage"]["completion_tokens"] > 0

        # malformed requests (issue 22): a client error each, and the server keeps serving
        huge = tmp_path / "huge.png"
        from PIL import Image as PILImage

        PILImage.new("1", (30000, 30000)).save(huge)  # 900 M pixels, a few hundred kB: a decompression bomb
        malformed = {
            "bad image bytes": "data:image/png;base64," + base64.b64encode(b"these bytes are not a picture").decode(),
            "wrong content type": "data:text/plain;base64," + base64.b64encode(b"hello").decode(),
            "huge image": "data:image/png;base64," + base64.b64encode(huge.read_bytes()).decode(),
        }
        for what, url in malformed.items():
            status = _status(port, "/v1/chat/completions", {
                "model": str(llava_hf), "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, question]}],
            })
            assert 400 <= status < 500, (what, status, (tmp_path / "server.log").read_text()[-3000:])
            assert server.poll() is None, (what, (tmp_path / "server.log").read_text()[-3000:])
        again = chat([{"type": "image_url", "image_url": {"url": urls[0]}}, question])
        assert again["usage"]["prompt_tokens"] == text_only + 64 + 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
