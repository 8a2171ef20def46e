"""Qwen2.5-VL served by the vLLM plugin (``visionzip.vllm.qwen2_5_vl``) on vLLM's own engine (``vllm.LLM``, CPU
backend, .venv-vllm), held to this project's transformers path (``apply_compression`` on transformers'
``Qwen2_5_VLForConditionalGeneration`` + ``compression_aware_processor``, in .venv) on the same tiny random
checkpoint, spec, prompt ids and images. One vLLM process and one engine for all of it (an engine start is the
expensive part): a batch of four requests (two different images x two prompts) answered with prompt tokens =
text + the budget per image and the transformers path's greedy tokens; both position routes of the model equal
to the transformers path's positions; unservable requests refused by name while the engine keeps serving; bad
specs refused at startup with a ValueError naming them.

Positions: the kept tokens keep their original M-RoPE positions and the text after an image keeps its
original position (the image advances M-RoPE by its full grid). The test asserts that for one of the images
the kept set misses the last row and column of its grid's longer side, so a rule that puts the text right
after the last kept token (vLLM's own rule for pruned video) or after the kept count gives other positions.
The random tiny LLM's greedy tokens hardly depend on positions, so the generated tokens' log-probabilities
are compared too: with the text after each image advanced by the kept count instead of the grid, or the kept
tokens all at the image's origin (both tried on purpose), they differ by 1.1e-3 and 1.9e-4 (the greedy tokens
stayed equal); with the right rule by 2.4e-7."""
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
ARCHITECTURE = "VisionZipQwen2_5_VLForConditionalGeneration"
SPEC, BUDGET = "visionzip:dominant=5,contextual=2", 7
PROMPTS = (
    "USER: <|vision_start|><|image_pad|><|vision_end|> describe it ASSISTANT:",
    "USER: what is in <|vision_start|><|image_pad|><|vision_end|> ASSISTANT:",
)
# request i: PROMPTS[PROMPT_OF[i]] with image IMAGE_OF[i]: both images with both prompts, in one batch
PROMPT_OF, IMAGE_OF = [0, 1, 0, 1], [0, 1, 1, 0]
MAX_TOKENS = 8
# tokens vLLM schedules per step (chunked prefill): the first request's 7 image tokens start at prompt position 3,
# so its image is split across two steps, each with its own tokens' positions
STEP_TOKENS = 8
# refused when the engine starts: an in-LLM method, an in-tower method, a budget beyond the largest image the
# processor makes (224 x 224 pixels at most: 8 x 8 = 64 merged tokens)
REFUSED = {
    "fastv:8": "stage 'llm'",
    "tome:8": "stage 'tower'",
    "visionzip:999": "give a budget up to 64",
}

VLLM_SCRIPT = r"""
import json, sys, time
from PIL import Image
from vllm import LLM, SamplingParams


def engine(job, spec):
    return LLM(model=job["model"], hf_overrides={"architectures": [job["architecture"]], "visual_compression": spec},
               enforce_eager=True, dtype="float32", max_model_len=1024, max_num_seqs=8, seed=0,
               limit_mm_per_prompt={"image": 1}, max_num_batched_tokens=job["step_tokens"])


def position_routes(check, model):
    # Both routes that place the kept tokens (module docstring of visionzip.vllm.qwen2_5_vl) on one prompt, in
    # the engine's model: the request-time positions, then (1) embed_input_ids + step_positions, the route the
    # CPU runner runs, the whole prompt in one step, and (2) recompute_mrope_positions, vLLM's pruning route,
    # which the CPU runner never calls, with the image split across two prefill chunks.
    import torch
    from types import SimpleNamespace
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media

    ids, grid, keep = check["input_ids"], check["grid"], check["keep"]
    mask = torch.tensor(ids) == model.config.image_token_id
    rows = mask.nonzero()[:, 0].tolist()
    feature = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=rows[0], length=len(rows)),
                              data={"image_grid_thw": SimpleNamespace(data=torch.tensor(grid))})
    start, delta = model.get_mrope_input_positions(ids, [feature])
    channels = compute_mrope_for_media(torch.tensor(grid), model.visual.spatial_merge_size)[torch.tensor(keep)]
    embedding = torch.cat([torch.zeros(len(keep), model.config.text_config.hidden_size), channels.float()], dim=1)
    model.embed_input_ids(torch.tensor(ids), [embedding], is_multimodal=mask)
    routed = model.step_positions(start)
    split = 3  # kept tokens in the first chunk
    _, chunked, _ = model.recompute_mrope_positions(ids, [embedding[:split]], start, 0)
    _, chunked, chunked_delta = model.recompute_mrope_positions(ids, [embedding[split:]], chunked, rows[split])
    return {"delta": delta, "embed_forward": routed.tolist(), "recompute": chunked.tolist(),
            "recompute_delta": chunked_delta, "request_time": start.tolist()}


def main():
    job = json.loads(open(sys.argv[1]).read())
    images = [Image.open(path).convert("RGB") for path in job["images"]]
    greedy = SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=1)
    start = time.time()
    llm = engine(job, job["spec"])
    out = {"engine_start_s": time.time() - start}
    requests = [{"prompt_token_ids": ids, "multi_modal_data": {"image": images[i]}}
                for ids, i in zip(job["prompt_ids"], job["image_of"])]
    answers = llm.generate(requests, greedy)
    out["prompt_tokens"] = [len(a.prompt_token_ids) for a in answers]
    out["tokens"] = [list(a.outputs[0].token_ids) for a in answers]
    out["logprobs"] = [[step[token].logprob for step, token in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
                       for a in answers]
    # refused requests: a too-small image (twice: the second must meet the same check, not a processor-cache
    # miss), a prompt ending with the image placeholder (with the first request's image, which is then served)
    small = {"prompt_token_ids": job["prompt_ids"][0], "multi_modal_data": {"image": Image.open(job["small"])}}
    trailing = {"prompt_token_ids": job["prompt_ids"][0][: job["prompt_ids"][0].index(job["image_token_id"]) + 1],
                "multi_modal_data": requests[0]["multi_modal_data"]}
    out["refused_requests"] = []
    for request in (small, small, trailing):
        try:
            llm.generate([request], greedy)
            out["refused_requests"].append("accepted")
        except Exception as error:
            out["refused_requests"].append(type(error).__name__ + ": " + str(error))
    out["after_refusals"] = list(llm.generate(requests[:1], greedy)[0].outputs[0].token_ids)
    out["routes"] = llm.apply_model(lambda model: position_routes(job["positions"], model))[0]
    # GPU only, checked as configuration: vLLM's encoder CUDA graphs would run the tower without the compression
    out["encoder_cudagraph_modalities"] = llm.apply_model(lambda model: model.get_encoder_cudagraph_config().modalities)[0]
    del llm
    out["refused"] = {}
    for spec in job["refused"]:
        try:
            engine(job, spec)
            out["refused"][spec] = {"value_error": False, "message": "accepted"}
        except Exception as error:  # vLLM's config validation wraps it in pydantic's ValidationError, a ValueError
            out["refused"][spec] = {"value_error": isinstance(error, ValueError), "message": str(error)}
    out["total_s"] = time.time() - start
    print("VLLM_RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
"""


def tiny_processor():
    """The tiny Qwen2.5-VL processor (word-level tokenizer, Qwen2-VL image processor up to 224 x 224)."""
    from visionzip.hf.tiny import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL folder both environments load: the HF tests' tiny tower (3 blocks, the last
    attending fully, 56-pixel windows, 2 x 2 merge) and a 2-layer LLM with 32-dim heads (vLLM's CPU attention
    takes head sizes that are multiples of 32; M-RoPE sections 4 + 6 + 6 = 16 = head_dim / 2). The processor
    config names transformers' Qwen2_5_VLProcessor with a video processor entry, which vLLM's processor
    loading requires (the compressed model refuses videos)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from visionzip.hf.tiny import tiny_qwen2_5_vl

    base, processor = tiny_qwen2_5_vl()
    config = base.config.to_dict()
    config["text_config"].update(
        hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    )
    config["vision_config"].update(out_hidden_size=64)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config)).eval()
    folder = tmp_path_factory.mktemp("qwen2_5_vl") / "tiny-qwen2_5_vl"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    processor_file = folder / "processor_config.json"
    saved = json.loads(processor_file.read_text())
    images = saved["image_processor"]
    saved["processor_class"] = "Qwen2_5_VLProcessor"
    saved["video_processor"] = {
        "video_processor_type": "Qwen2VLVideoProcessor", "patch_size": images["patch_size"],
        "merge_size": images["merge_size"], "temporal_patch_size": images["temporal_patch_size"],
        "size": images["size"], "image_mean": images["image_mean"], "image_std": images["image_std"],
    }
    processor_file.write_text(json.dumps(saved, indent=1))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """112 x 168 (a 4 x 6 grid of merged tokens) and 140 x 112 (5 x 4): multiples of 28 within the processor's
    limits, so neither environment resizes them and their pixels agree; and a 28 x 28 image (one merged
    token), too small for the budget."""
    folder = tmp_path_factory.mktemp("qwen-images")
    rng = np.random.default_rng(3)
    paths = []
    for index, shape in enumerate([(112, 168, 3), (140, 112, 3), (28, 28, 3)]):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def transformers_answers(checkpoint, images) -> dict:
    """The transformers path per request: compressed prompt length, greedy tokens, and each image's kept
    raster indices and merged grid."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    import visionzip
    from visionzip.hf import compression_aware_processor, qwen2_5_vl

    processor = tiny_processor()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    visionzip.apply_compression(model, SPEC)
    aware = compression_aware_processor(processor, model)
    answers = {"prompt_ids": [processor.tokenizer(PROMPTS[p]).input_ids for p in PROMPT_OF], "runs": [], "kept": {},
               "image_token_id": model.config.image_token_id}
    for prompt, image_index in zip(PROMPT_OF, IMAGE_OF):
        inputs = aware(text=PROMPTS[prompt], images=Image.open(images[image_index]).convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        length = inputs["input_ids"].shape[1]
        tokens = out.sequences[0, length:]
        logprobs = [torch.log_softmax(score[0].float(), dim=-1)[token].item() for score, token in zip(out.scores, tokens)]
        answers["runs"].append({"prompt_tokens": length, "tokens": tokens.tolist(), "logprobs": logprobs})
        _, rows, cols = (int(v) // 2 for v in inputs["image_grid_thw"][0].tolist())
        answers["kept"][image_index] = (rows, cols, encoded.keep_indices[0].tolist())
    # the positions the transformers path gives request 0 (its own rule, hf.qwen2_5_vl.kept_positions)
    inputs = aware(text=PROMPTS[PROMPT_OF[0]], images=Image.open(images[IMAGE_OF[0]]).convert("RGB"), return_tensors="pt")
    keep = answers["kept"][IMAGE_OF[0]][2]
    positions, delta = qwen2_5_vl.kept_positions(model, inputs["input_ids"], None, None, inputs["image_grid_thw"],
                                                 [torch.tensor(keep)])
    answers["positions"] = {"input_ids": inputs["input_ids"][0].tolist(), "grid": inputs["image_grid_thw"][0].tolist(),
                            "keep": keep, "positions": positions[:, 0].tolist(), "delta": int(delta[0, 0]),
                            "image_rows": (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0].tolist()}
    return answers


@pytest.fixture(scope="module")
def vllm_answers(vllm_python, checkpoint, images, transformers_answers, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("qwen-vllm-run")
    job = {
        "model": str(checkpoint), "architecture": ARCHITECTURE, "spec": SPEC, "refused": list(REFUSED),
        "prompt_ids": transformers_answers["prompt_ids"], "images": [str(p) for p in images[:2]],
        "image_of": IMAGE_OF, "small": str(images[2]), "max_tokens": MAX_TOKENS, "step_tokens": STEP_TOKENS,
        "positions": {key: transformers_answers["positions"][key] for key in ("input_ids", "grid", "keep")},
        "image_token_id": transformers_answers["image_token_id"],
    }
    (folder / "job.json").write_text(json.dumps(job))
    (folder / "run.py").write_text(VLLM_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1")
    start = time.time()
    done = subprocess.run([str(vllm_python), str(folder / "run.py"), str(folder / "job.json")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=folder)
    lines = [line for line in done.stdout.splitlines() if line.startswith("VLLM_RESULT ")]
    assert done.returncode == 0 and len(lines) == 1, (done.stdout + done.stderr)[-6000:]
    result = json.loads(lines[0][len("VLLM_RESULT "):])
    print(f"vLLM run: {time.time() - start:.1f} s, engine start {result['engine_start_s']:.1f} s")
    return result


def test_prompt_tokens_are_text_plus_budget_per_image(vllm_answers, transformers_answers):
    """vLLM reserves the compressed count per image (the scheduler's and the KV cache's sequence, the API's
    usage.prompt_tokens), the same count as the transformers path's processor."""
    text = [len(ids) - 1 for ids in transformers_answers["prompt_ids"]]  # <|image_pad|> becomes the budget
    assert vllm_answers["prompt_tokens"] == [n + BUDGET for n in text]
    assert [run["prompt_tokens"] for run in transformers_answers["runs"]] == [n + BUDGET for n in text]


def test_greedy_tokens_equal_the_transformers_path(vllm_answers, transformers_answers):
    """Two different images (different grids) in one batch, each with both prompts: the same greedy tokens as
    transformers with apply_compression. One image's kept set misses the last row and the last column of its
    longer side, so the text after it is where only this project's position rule puts it."""
    def next_after_kept(rows, cols, kept):  # where "text right after the last kept token" would continue
        return max(max(index // cols, index % cols) for index in kept) + 1

    kept = transformers_answers["kept"]
    assert any(next_after_kept(*kept[i]) < max(kept[i][0], kept[i][1]) for i in kept), kept
    assert all(len(run["tokens"]) == MAX_TOKENS for run in transformers_answers["runs"])
    assert vllm_answers["tokens"] == [run["tokens"] for run in transformers_answers["runs"]]
    # and the same log-probabilities, which (unlike this random LLM's greedy tokens) tell wrong positions
    # apart (module docstring)
    differences = [abs(a - b) for ours, theirs in zip(vllm_answers["logprobs"], transformers_answers["runs"])
                   for a, b in zip(ours, theirs["logprobs"])]
    assert len(differences) == len(IMAGE_OF) * MAX_TOKENS and max(differences) < 1e-5, max(differences)
    assert len({tuple(tokens) for tokens in vllm_answers["tokens"]}) > 1  # the requests are told apart


def test_both_position_routes_give_the_transformers_path_positions(vllm_answers, transformers_answers):
    """The positions of request 0's prompt (the kept tokens of its image at their original M-RoPE positions,
    the text after it where the full grid puts it) by both of the model's routes, in the engine's model: the
    one the CPU runner runs (embed_input_ids + forward) and vLLM's pruning interface (recompute_mrope_positions,
    the image split across two prefill chunks, as GPU runners call it with --video-pruning-rate): equal to
    the transformers path's, with its decoding offset; before encoding, the image rows are the image's origin."""
    expected = transformers_answers["positions"]
    routes = vllm_answers["routes"]
    assert routes["embed_forward"] == expected["positions"]
    assert routes["recompute"] == expected["positions"]
    assert routes["delta"] == routes["recompute_delta"] == expected["delta"]
    origin = expected["positions"][0][expected["image_rows"][0]]  # the t position of all the image's tokens
    assert all(routes["request_time"][axis][row] == origin for axis in range(3) for row in expected["image_rows"])
    assert routes["request_time"] != expected["positions"]  # the kept tokens' offsets came with the embeddings
    assert vllm_answers["encoder_cudagraph_modalities"] == []  # (GPU) no CUDA-graph tower path that skips them


def test_unservable_requests_are_refused_by_name_and_the_engine_keeps_serving(vllm_answers, transformers_answers):
    """An image too small for the budget (twice), a prompt that ends with its image placeholder: a ValueError
    each, naming the reason, before vLLM's processor caches the image; then the same image is served."""
    small, small_again, trailing = vllm_answers["refused_requests"]
    for refusal in (small, small_again):
        assert refusal.startswith("ValueError: ") and "visual_compression='visionzip" in refusal, refusal
        assert "1 x 1 = 1 merged tokens" in refusal and "exceeds" in refusal, refusal
    assert trailing.startswith("ValueError: ") and "must not end with an image placeholder" in trailing, trailing
    assert vllm_answers["after_refusals"] == transformers_answers["runs"][0]["tokens"]


def test_bad_specs_refused_at_startup(vllm_answers):
    for spec, message in REFUSED.items():
        refusal = vllm_answers["refused"][spec]
        assert refusal["value_error"] and f"visual_compression='{spec.split(':')[0]}" in refusal["message"], (spec, refusal)
        assert message in refusal["message"], (spec, refusal)


def test_serve_wrapper_picks_the_qwen_architecture(checkpoint):
    """``python -m llava.serve.vllm`` reads the checkpoint's architecture: a Qwen2.5-VL folder gets the plugin's
    Qwen2.5-VL class (runs in this environment: the wrapper's command, not vLLM)."""
    from llava.serve.vllm import serve_command

    command, _ = serve_command(["--model", str(checkpoint), "--compression", "visionzip:64"])
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides == {"architectures": [ARCHITECTURE], "visual_compression": "visionzip:dominant=54,contextual=10"}
