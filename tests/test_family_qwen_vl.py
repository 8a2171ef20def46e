"""Qwen-VL(-Chat) natively (llava.model.qwen_vl): the hub layout loads key for key, the forward equals the
re-enacted official one, VisPruner over the 256 resampler queries equals its definition, batches equal their
samples one by one, run_llava answers; methods that cannot act on Qwen-VL are refused by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.builder import load_pretrained_model
from llava.model.qwen_vl.model import QwenVLForCausalLM, ntk_alpha
from llava.model.qwen_vl.reference import official_logits, official_query_scores, official_vispruner_tokens
from llava.model.qwen_vl.tiny import build_tiny_qwen_vl
from llava.model.qwen_vl.tokenizer import SPECIAL_TOKENS, QwenTokenizer, byte_pair_merge, load_ranks
from visionzip import get_method, registered_methods

QUESTIONS = ["What is in the picture?", "Describe the image in detail, please."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_qwen_vl(str(tmp_path_factory.mktemp("qwen-vl") / "qwen-vl-chat-tiny"), seed=0)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    tokenizer, model, image_processor, context_len = load_pretrained_model(checkpoint, None, device="cpu")
    return tokenizer, model, image_processor, context_len


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (50, 64, 3), dtype=np.uint8)),
    ]


@pytest.fixture
def model_with(loaded):
    """Set a compression on the shared model for one test, then back to none."""
    model = loaded[1]

    def apply(spec):
        model.set_visual_compression(spec)
        return model

    yield apply
    model.set_visual_compression("none")


def official_ids(ids: list[int], tokenizer: QwenTokenizer, queries: int) -> torch.Tensor:
    """Our prompt ids in the official format: the image placeholder -> ``queries`` span ids."""
    out = []
    for index in ids:
        out.extend([tokenizer.img_pad_id] * queries if index == IMAGE_TOKEN_INDEX else [index])
    return torch.tensor([out])


# ----- the checkpoint and its loading ------------------------------------------------------------------
def test_tiny_checkpoint_has_the_hub_layout_and_loads_key_for_key(checkpoint, loaded):
    config = json.loads(open(f"{checkpoint}/config.json").read())
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    for key in ("kv_channels", "rotary_pct", "use_dynamic_ntk", "use_logn_attn", "seq_length", "no_bias"):
        assert key in config
    with safe_open(f"{checkpoint}/model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        queries = handle.get_tensor("transformer.visual.attn_pool.query")
    expected = {
        "transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias", "transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.w1.weight",
        "transformer.h.1.mlp.w2.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight",
        "transformer.visual.conv1.weight", "transformer.visual.positional_embedding", "transformer.visual.ln_pre.weight",
        "transformer.visual.transformer.resblocks.1.attn.in_proj.weight", "transformer.visual.transformer.resblocks.1.mlp.c_fc.bias",
        "transformer.visual.attn_pool.pos_embed", "transformer.visual.attn_pool.kv_proj.weight",
        "transformer.visual.attn_pool.attn.in_proj_weight", "transformer.visual.attn_pool.attn.out_proj.bias",
        "transformer.visual.attn_pool.ln_q.weight", "transformer.visual.ln_post.bias", "transformer.visual.proj",
    }
    assert expected <= keys
    assert not any(k.endswith("c_proj.bias") and ".attn." in k for k in keys)  # no_bias: c_attn has the only bias
    assert queries.shape[0] == 256  # the resampler's 256 learned queries
    tokenizer, model, image_processor, context_len = loaded
    assert isinstance(model, QwenVLForCausalLM) and context_len == config["max_position_embeddings"]
    assert set(model.state_dict()) == keys  # nothing missing, nothing left over
    with safe_open(f"{checkpoint}/model.safetensors", "pt") as handle:
        name = "transformer.h.1.attn.c_attn.weight"
        assert torch.equal(model.state_dict()[name], handle.get_tensor(name))
    assert tokenizer.img_start_id == config["visual"]["image_start_id"]
    assert image_processor.image_size == config["visual"]["image_size"]


def test_default_config_builds_the_real_qwen_vl_chat_geometry():
    """The hub config's values (QwenVLConfig defaults) give the remote code's shapes, on the meta device."""
    from llava.model.qwen_vl.config import QwenVLConfig

    with torch.device("meta"):
        model = QwenVLForCausalLM(QwenVLConfig())
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["transformer.visual.transformer.resblocks.47.mlp.c_fc.weight"] == (8192, 1664)  # int(1664 * 4.9231)
    assert shapes["transformer.visual.attn_pool.attn.in_proj_weight"] == (3 * 4096, 4096)  # 32 heads of 128
    assert shapes["transformer.visual.attn_pool.query"] == (256, 4096)
    assert shapes["transformer.visual.positional_embedding"] == (256, 1664)
    assert shapes["transformer.h.31.attn.c_attn.weight"] == (3 * 4096, 4096)
    assert shapes["transformer.h.31.mlp.w1.weight"] == (11008, 4096) and shapes["lm_head.weight"] == (151936, 4096)
    total = sum(t.numel() for t in model.parameters())
    assert 9.6e9 < total < 9.7e9  # 7.72B LLM + 1.94B vision side


def test_tokenizer_reads_the_tiktoken_file_and_its_special_tokens(checkpoint, loaded):
    tokenizer = loaded[0]
    ranks = load_ranks(f"{checkpoint}/qwen.tiktoken")
    assert len(tokenizer) == len(ranks) + len(SPECIAL_TOKENS)
    assert tokenizer.eod_id == len(ranks) and tokenizer.im_start_id == len(ranks) + 1
    assert tokenizer.img_end_id == tokenizer.img_start_id + 1 and tokenizer.img_pad_id == tokenizer.img_start_id + 2
    text = "<|im_start|>user\nWhat colour is the car? Été 42<|im_end|>"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.im_start_id and ids[-1] == tokenizer.im_end_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nWhat colour is the car? Été 42"
    # make_context's contents allow the image tags only: other special tokens typed in the text stay text
    plain = tokenizer.encode(text, allowed_special=("<img>",))
    assert tokenizer.im_start_id not in plain and tokenizer.decode(plain) == text
    # BPE: a merged token is one id; unknown byte strings fall back to bytes
    assert byte_pair_merge(b"the", ranks) == [ranks[b"the"]] if b"the" in ranks else True
    assert byte_pair_merge(b"\xff\xfe", ranks) == [255, 254]
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        QwenTokenizer.from_pretrained(str(checkpoint) + "-missing")


# ----- fidelity ----------------------------------------------------------------------------------------
def test_vanilla_logits_equal_the_official_forward(loaded, images):
    tokenizer, model, image_processor, _ = loaded
    processor = model.build_processor(tokenizer, image_processor)
    assert processor.conv_mode == "qwen_chatml" == model.default_conv_mode
    inputs = processor([QUESTIONS[0]], [images[0]])
    assert inputs.prompts[0] == processor.build_prompt(QUESTIONS[0]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1:<img><image></img>\n"
        "What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    )
    vqa = model.build_processor(tokenizer, image_processor, "qwen_vqa")
    assert vqa.build_prompt(QUESTIONS[0]) == "<img><image></img>What is in the picture? Answer:"
    with torch.no_grad():
        ours = model(**inputs.generate_kwargs(), use_cache=False).logits
        ids = official_ids(inputs.input_ids[0].tolist(), tokenizer, 256)
        official = official_logits(model.state_dict(), model.config, ids, inputs.images)
    # the prompt with its 256 visual tokens runs past the tiny seq_length: dynamic NTK and log-n are active
    assert ids.shape[1] > model.config.seq_length and ntk_alpha(ids.shape[1], model.config.seq_length) > 1
    assert ours.shape == official.shape
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-4)


def test_vispruner_keeps_64_of_the_256_queries_as_defined(loaded, images, model_with):
    tokenizer, model, image_processor, _ = loaded
    pixels = image_processor(images)
    sd = model.state_dict()
    with torch.no_grad():
        # scoring: the traced query importance and the query outputs equal the eager official maps' combination
        capture = model.query_adapter().run(pixels)
        importance, outputs = official_query_scores(sd, model.config.visual, pixels)
        torch.testing.assert_close(capture.attn_input[..., -1], importance, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(capture.hidden, outputs, rtol=1e-4, atol=1e-4)
        # selection: the official VisPruner selection over the queries (important + diverse), given those scores
        ours = model_with("vispruner:64").encode_images(pixels)
        scores = (capture.attn_input[..., -1], capture.hidden)
        expected = official_vispruner_tokens(sd, model.config.visual, pixels, 64, scores=scores)
        full = model.transformer.visual(pixels)
        # important tokens only (no near-tied duplicate removal): the whole path against the eager official one
        important = model_with("vispruner:tokens=64,important_ratio=1").encode_images(pixels)
        top = importance.topk(64, dim=1).indices.sort(dim=1).values
        important_official = model.transformer.visual.project(outputs.gather(1, top[..., None].expand(-1, -1, outputs.shape[-1])))
    assert ours.shape == (2, 64, model.config.hidden_size)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(important, important_official, rtol=0, atol=1e-4)
    assert float(importance.std(dim=1).min()) > 0.1 * float(importance.mean())  # the scores discriminate
    # the kept tokens are 64 of the 256 query embeddings, not the first 64 and not the same set per image
    kept = [torch.cdist(ours[i], full[i]).argmin(dim=1) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(ours[i], full[i][kept[i]], rtol=0, atol=1e-4)
        assert kept[i].unique().numel() == 64 and not torch.equal(kept[i], torch.arange(64))
    assert not torch.equal(kept[0], kept[1])


def test_compression_is_a_persisted_configured_stage(loaded, checkpoint, tmp_path, model_with):
    import visionzip

    model = visionzip.apply_compression(model_with("none"), "visionzip:64")  # the one Python entry
    assert model.config.visual_compression["method"] == "visionzip"
    assert model.config.visual_compression["dominant"] == 54 and model.config.visual_compression["contextual"] == 10
    assert model.visual_tokens_per_image() == 64
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "qwen" and saved["visual_compression"]["method"] == "visionzip"
    loaded[0].save_pretrained(str(tmp_path / "saved"))
    tokenizer, reloaded, _, _ = load_pretrained_model(str(tmp_path / "saved"), None, device="cpu")
    assert reloaded.get_visual_compression().spec() == "visionzip:dominant=54,contextual=10"
    assert reloaded.default_conv_mode == "qwen_chatml" and len(tokenizer) == len(loaded[0])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tome:64", r"tome acts inside the vision tower.*resampler"),
        ("downsample:64", r"downsample acts inside the vision tower"),
        ("fastv:tokens=64,layer=4", r"fastv"),  # FastV's K must leave a layer after it (4 layers)
        ("fastv:300", r"more than the 256 visual tokens"),
        ("prumerge:64", r"prumerge.*no CLS"),
        ("vispruner:300", r"num_tokens = 300 exceeds the 256"),
        ("visionzip:dominant=250,contextual=10", r"260 exceeds the 256"),
    ],
)
def test_methods_that_cannot_act_are_refused_by_name(loaded, spec, message):
    model = loaded[1]
    with pytest.raises(ValueError, match=message):
        model.set_visual_compression(spec)
    assert not model.get_visual_compression().enabled  # the previous setting stays


# ----- batches, positions, cache -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["none", "vispruner:64", "visionzip:64"])
def test_batch_of_two_equals_one_by_one(loaded, images, model_with, spec):
    tokenizer, _, image_processor, _ = loaded
    model = model_with(spec)
    processor = model.build_processor(tokenizer, image_processor)
    batch = processor(QUESTIONS, images)
    with torch.no_grad():
        batched = model(**batch.generate_kwargs(), use_cache=False).logits
        generated = model.generate(**batch.generate_kwargs(), max_new_tokens=4, do_sample=False, eos_token_id=None)
        for row in range(2):
            single = processor([QUESTIONS[row]], [images[row]])
            logits = model(**single.generate_kwargs(), use_cache=False).logits
            # the image span holds the compressed count; the text after it is renumbered (positions 0..)
            text = int(single.attention_mask.sum()) - 1
            assert logits.shape[1] == text + model.visual_tokens_per_image()
            torch.testing.assert_close(batched[row, -logits.shape[1]:], logits[0], rtol=0, atol=1e-4)
            alone = model.generate(**single.generate_kwargs(), max_new_tokens=4, do_sample=False, eos_token_id=None)
            assert torch.equal(generated[row], alone[0])


def test_cached_generation_equals_full_forwards(loaded, images):
    tokenizer, model, image_processor, _ = loaded
    inputs = model.build_processor(tokenizer, image_processor)([QUESTIONS[0]], [images[0]])
    with torch.no_grad():
        new = model.generate(**inputs.generate_kwargs(), max_new_tokens=4, do_sample=False, eos_token_id=None)[0]
        ids = torch.cat([inputs.input_ids, new[None, :-1]], dim=1)
        full = model(input_ids=ids, images=inputs.images, use_cache=False).logits[0]
    assert torch.equal(full[-4:].argmax(dim=-1), new)


# ----- in-LLM methods ---------------------------------------------------------------------------------------
IN_LLM = sorted(m for m in registered_methods() if get_method(m).stage == "llm")


def test_in_llm_methods_run_through_the_decoder_loop_batched_as_one_by_one(loaded, images, model_with):
    tokenizer, _, image_processor, _ = loaded
    assert {"fastv", "pdrop", "sparsevlm"} <= set(IN_LLM)
    for method in IN_LLM:
        model = model_with(f"{method}:64")
        assert model.visual_tokens_per_image() == 256  # the image enters the LLM whole; the drops come later
        processor = model.build_processor(tokenizer, image_processor)
        with torch.no_grad():
            batched = model.generate(**processor(QUESTIONS, images).generate_kwargs(), max_new_tokens=3,
                                     do_sample=False, eos_token_id=None)
            for row in range(2):
                alone = model.generate(**processor([QUESTIONS[row]], [images[row]]).generate_kwargs(),
                                       max_new_tokens=3, do_sample=False, eos_token_id=None)
                assert torch.equal(batched[row], alone[0]), method
            pruned = model(**processor([QUESTIONS[0]], [images[0]]).generate_kwargs(), use_cache=False).logits
        text = int(processor([QUESTIONS[0]], [images[0]]).attention_mask.sum()) - 1
        assert pruned.shape[1] < text + 256, method  # visual tokens left the sequence inside the LLM


def test_in_llm_pruning_that_keeps_every_token_equals_the_unpruned_model(loaded, images, model_with):
    tokenizer, model, image_processor, _ = loaded
    inputs = model.build_processor(tokenizer, image_processor)(QUESTIONS, images)
    with torch.no_grad():
        vanilla = model(**inputs.generate_kwargs(), use_cache=False).logits
        vanilla_tokens = model.generate(**inputs.generate_kwargs(), max_new_tokens=3, do_sample=False, eos_token_id=None)
        keep_all = model_with("fastv:tokens=256,layer=2")
        kept = keep_all(**inputs.generate_kwargs(), use_cache=False).logits
        kept_tokens = keep_all.generate(**inputs.generate_kwargs(), max_new_tokens=3, do_sample=False, eos_token_id=None)
    valid = inputs.attention_mask.bool()
    width = kept.shape[1]
    for row in range(2):
        n = int(valid[row].sum()) - 1 + 256
        torch.testing.assert_close(kept[row, -n:], vanilla[row, -n:], rtol=0, atol=1e-4)
    assert width <= vanilla.shape[1] and torch.equal(kept_tokens, vanilla_tokens)


# ----- run_llava -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["none", "vispruner:64"])
def test_run_llava_answers(checkpoint, loaded, images, tmp_path, capsys, model_with, spec):
    from llava.eval.run_llava import main

    path = tmp_path / "image.png"
    images[0].save(path)
    assert main([
        "--model-path", checkpoint, "--image-file", str(path), "--query", QUESTIONS[0], "--device", "cpu",
        "--temperature", "0", "--max_new_tokens", "6", "--compression", spec,
    ]) == 0
    answer = capsys.readouterr().out.strip()
    tokenizer, _, image_processor, _ = loaded
    model = model_with(spec)
    inputs = model.build_processor(tokenizer, image_processor)([QUESTIONS[0]], [Image.open(path)])
    with torch.no_grad():
        expected = model.generate(**inputs.generate_kwargs(), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    assert answer == tokenizer.batch_decode(expected, skip_special_tokens=True)[0].strip()
    assert expected.shape[1] >= 1


def test_run_llava_refuses_the_llava_only_compiled_path(checkpoint, images, tmp_path):
    from llava.eval.run_llava import main

    path = tmp_path / "image.png"
    images[0].save(path)
    with pytest.raises(ValueError, match="--compile runs LLaVA's compiled path.*QwenVLForCausalLM"):
        main(["--model-path", checkpoint, "--image-file", str(path), "--query", QUESTIONS[0], "--device", "cpu",
              "--compile"])


def test_half_precision_load_runs_every_vision_side_method(checkpoint, images):
    tokenizer, model, image_processor, _ = load_pretrained_model(
        checkpoint, None, device="cpu", torch_dtype=torch.bfloat16, compression="vispruner:64"
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inputs = model.build_processor(tokenizer, image_processor)([QUESTIONS[0]], [images[0]])
    assert inputs.images.dtype == torch.bfloat16
    for spec in ("vispruner:64", "visionzip:64", "pooling:64", "random:64"):
        model.set_visual_compression(spec)
        with torch.no_grad():
            features = model.encode_images(inputs.images)
            new = model.generate(**inputs.generate_kwargs(), max_new_tokens=2, do_sample=False, eos_token_id=None)
        assert features.shape == (1, 64, model.config.hidden_size) and bool(features.isfinite().all())
        assert new.shape == (1, 2)


def test_eval_script_runs_the_papers_budget(checkpoint, tmp_path):
    """``scripts/qwen_vl/eval/gqa.sh vispruner 128`` (VisPruner Table 4's setting) on the tiny checkpoint and a
    generated mini GQA: answers for every question, a score, the Qwen-VL prompt format recorded."""
    from llava.eval.data_io import read_json, read_jsonl
    from llava.eval.mini_benchmark import build_mini_benchmark

    mini = build_mini_benchmark(tmp_path / "eval", ["gqa"])
    results = tmp_path / "results"
    env = {
        **os.environ, "MODEL_PATH": checkpoint, "EVAL_DIR": str(mini), "RESULTS_DIR": str(results), "DEVICE": "cpu",
        "BATCH_SIZE": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "scripts/qwen_vl/eval/gqa.sh", "vispruner", "128"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    [run_dir] = list((mini / "gqa" / "answers").glob("*/qwen-vl-chat-tiny/vispruner/*"))
    answers = read_jsonl(run_dir / "merge.jsonl")
    assert len(answers) == len(read_jsonl(mini / "gqa" / "llava_gqa_testdev_balanced.jsonl"))
    settings = read_json(run_dir / "merge.settings.json")
    assert settings["conv_mode"] == "qwen_vqa" and settings["visual_tokens_per_view"] == 128
    assert settings["compression"]["method"] == "vispruner" and settings["compression"]["tokens"] == 128
    [scored] = list(results.glob("qwen-vl-chat-tiny/vispruner/*/gqa.json"))
    assert 0.0 <= read_json(scored)["score"] <= 100.0
