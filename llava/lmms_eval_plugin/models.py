"""The lmms-eval model classes (imported by lmms-eval through the ``lmms_eval.models`` entry point).

``VisionZipLlava`` (``--model visionzip_llava``) and ``VisionZipHF`` (``--model visionzip_hf``): simple
lmms-eval models (``is_simple``: lmms-eval hands over the task's prompt text and ``doc_to_visual``
images; the model applies its own prompt template). ``generate_until`` runs in batches of ``batch_size``
requests with the same generation settings; each batch logs, through lmms-eval's
``log_metrics`` (the results' ``throughput`` block), the compression budget per view and the visual tokens
the language model actually received.
"""
from __future__ import annotations

import functools
import time

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from tqdm import tqdm

from llava.preflight import check_prompts_fit

from .requests import (
    Generation,
    Prepared,
    answer_with_refusals,
    check_model_args,
    compression_record,
    flatten_visuals,
    generation_settings,
    group_batches,
    parse_batch_size,
    parse_compression,
    parse_device,
    parse_prompt_too_long,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> str:
    """auto -> cuda when available, else cpu; ``device=cuda`` without CUDA is refused (``parse_device``)."""
    return parse_device(device)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class _CompressedLMM(lmms):
    """What both models share: argument checks, batching, stop strings, the compression record."""

    MODEL = ""
    COMMON_ARGS = ("pretrained", "compression", "device", "dtype", "batch_size", "max_batch_size", "max_new_tokens",
                   "prompt_too_long")

    def __init__(self, batch_size=1, max_new_tokens: int = 128, max_batch_size=None, prompt_too_long="error"):
        super().__init__()
        del max_batch_size  # lmms-eval's adaptive batching: fixed batch_size here
        self.prompt_too_long = parse_prompt_too_long(prompt_too_long)
        self.batch_size_per_gpu = parse_batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        self.compression = None  # the CompressionConfig the model runs (set by subclasses)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ----- what subclasses provide -------------------------------------------------------------------
    def answer_batch(self, contexts: list[str], images: list[list], generation: Generation) -> tuple[list[str], dict]:
        """Answer one batch -> (texts, numeric metrics of the batch such as visual tokens per image)."""
        raise NotImplementedError

    # ----- lmms-eval's API ---------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        prepared = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
            prepared.append(Prepared(index, context, flatten_visuals(visuals), dict(gen_kwargs or {})))
        answers: list[str | None] = [None] * len(requests)
        batches = group_batches(prepared, self.batch_size)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.MODEL} responding")
        for batch in batches:
            generation = generation_settings(batch[0].gen_kwargs, self.max_new_tokens)
            start = time.perf_counter()
            texts, metrics = answer_with_refusals(
                functools.partial(self.answer_batch, generation=generation),
                [p.context for p in batch], [p.images for p in batch], self.prompt_too_long,
            )
            elapsed = time.perf_counter() - start
            new_tokens = metrics.pop("new_tokens")
            if metrics["refused_prompts"]:
                logger.warning(f"{self.MODEL}: {metrics['refused_prompts']} prompt(s) of this batch do not fit the "
                               "model's positions: answered empty (prompt_too_long=refuse)")
            for item, text in zip(batch, texts, strict=True):
                answers[item.index] = generation.cut(text)
            log_metrics(
                total_elapsed_time=elapsed,
                total_gen_tokens=new_tokens,
                avg_speed=new_tokens / elapsed if elapsed > 0 else 0.0,
                additional_metrics={
                    "batch_size": len(batch),
                    **compression_record(self.compression),
                    **metrics,
                },
            )
            bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{self.MODEL} answers generate_until tasks only (no loglikelihood)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{self.MODEL} answers generate_until tasks only (no multi-round)")


class VisionZipLlava(_CompressedLMM):
    """``--model visionzip_llava``: an original-format LLaVA checkpoint on this codebase's stack, or a natively
    implemented family's checkpoint (``llava.model.builder.NATIVE_FAMILIES``, e.g. CogVLM's hub layout), which
    ``load_pretrained_model`` loads too and which is prompted through the processor its model builds
    (``llava.eval.model_processor``: the family's own prompt format and pixels).

    model_args: pretrained (checkpoint folder), model_base (for LoRA / projector-only checkpoints),
    compression (a spec; absent = the checkpoint's own setting), conv_mode (default: the checkpoint's,
    ``llava.model.builder.default_conv_mode``: mistral_instruct for llava_mistral, else vicuna_v1; a native
    family's own format), device, dtype (auto = float16 on CUDA, float32 otherwise), attn_implementation,
    max_new_tokens (when the task sets none), batch_size (from lmms-eval's --batch_size), prompt_too_long
    (error | refuse: a prompt beyond the model's positions stops the run, or is answered empty and counted as
    ``refused_prompts``; never cut silently). device=cuda without CUDA is refused. The visual tokens the
    language model received (``visual_tokens_per_view``) are measured at a LLaVA model's projector; a native
    family logs its configured budget only.
    """

    MODEL = "visionzip_llava"

    def __init__(self, pretrained: str, compression=None, model_base=None, conv_mode: str | None = None,
                 device=None, dtype: str = "auto", attn_implementation=None, batch_size=1,
                 max_new_tokens: int = 128, max_batch_size=None, prompt_too_long="error", **unknown):
        check_model_args(self.MODEL, unknown, self.COMMON_ARGS + ("model_base", "conv_mode", "attn_implementation"))
        super().__init__(batch_size, max_new_tokens, max_batch_size, prompt_too_long)
        from llava.eval.generate import checkpoint_config
        from llava.eval.model_processor import builds_own_inputs, check_llava_conv_mode, processor_for
        from llava.model.builder import load_pretrained_model
        from visionzip import CompressionConfig

        if conv_mode is not None and checkpoint_config(str(pretrained), model_base):
            check_llava_conv_mode(conv_mode, "conv_mode")  # a LLaVA checkpoint: refused before loading
        config = parse_compression(compression)
        self.device = resolve_device(device)
        self.tokenizer, self.model, image_processor, _ = load_pretrained_model(
            str(pretrained), model_base, device=self.device, torch_dtype=resolve_dtype(dtype, self.device),
            attn_implementation=attn_implementation, compression=config,
        )
        self.model.eval()
        # what the model runs: config.visual_compression (where every family keeps it, saved with the model)
        self.compression = CompressionConfig.parse(getattr(self.model.config, "visual_compression", None))
        # conv_mode None: the checkpoint's (mistral_instruct for llava_mistral; a native family's own format)
        self.processor, _ = processor_for(self.model, self.tokenizer, image_processor, conv_mode, "conv_mode")
        # visual tokens per view as the projector hands them to the language model (after any
        # vision-side compression): a hook on this LLaVA model's projector instance only
        self._view_tokens: list[int] = []
        if not builds_own_inputs(self.model):
            projector = self.model.get_model().mm_projector
            projector.register_forward_hook(
                lambda module, args, output: self._view_tokens.append(int(output.shape[1])))
        logger.info(f"{self.MODEL}: {pretrained} with compression {self.compression.spec()}")

    def answer_batch(self, contexts, images, generation):
        inputs = self.processor(contexts, images if images[0] else None)
        width = inputs.input_ids.shape[1]
        self._view_tokens.clear()
        with torch.inference_mode():
            output_ids = self.model.generate(
                **inputs.generate_kwargs(), **generation.generate_kwargs(),
                pad_token_id=self.processor.pad_token_id, use_cache=True,
            )
        if output_ids.shape[1] > width and torch.equal(output_ids[:, :width].cpu(), inputs.input_ids.cpu()):
            output_ids = output_ids[:, width:]  # a generate that returns the prompt too
        texts = [t.strip() for t in self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]
        metrics = {"new_tokens": _new_tokens(output_ids, self.processor.pad_token_id, self.tokenizer.eos_token_id)}
        if self._view_tokens:
            metrics["visual_tokens_per_view"] = self._view_tokens[0]
        return texts, metrics


class VisionZipHF(_CompressedLMM):
    """``--model visionzip_hf``: a llava-hf checkpoint in its transformers class, compressed with
    ``visionzip.apply_compression`` and prompted through ``visionzip.hf.compression_aware_processor`` (the
    ``<image>`` placeholders expand to the kept count).

    model_args: pretrained (a llava-hf folder: model and processor), compression (a spec; absent = the
    checkpoint's own, from its config.json),
    device, dtype, max_new_tokens, batch_size, prompt_too_long (as visionzip_llava's). The prompt is the
    processor's chat template, or
    ``USER: <image>\\n{question} ASSISTANT:`` (LLaVA-1.5's) when it has none.
    """

    MODEL = "visionzip_hf"

    def __init__(self, pretrained: str, compression=None, device=None, dtype: str = "auto", batch_size=1,
                 max_new_tokens: int = 128, max_batch_size=None, prompt_too_long="error", **unknown):
        check_model_args(self.MODEL, unknown, self.COMMON_ARGS)
        super().__init__(batch_size, max_new_tokens, max_batch_size, prompt_too_long)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import visionzip
        from visionzip.hf import compression_aware_processor, current_compression

        config = parse_compression(compression)
        self.device = resolve_device(device)
        # the compression the checkpoint saved (config.json) is applied on load; a compression argument
        # replaces it (absent: the checkpoint's own setting, as visionzip_llava)
        self.model = visionzip.hf.from_pretrained(
            str(pretrained), model_class=AutoModelForImageTextToText, dtype=resolve_dtype(dtype, self.device)
        ).to(self.device).eval()
        if config is not None:
            visionzip.apply_compression(self.model, config)  # TypeError naming the supported classes
        self.compression = current_compression(self.model)
        processor = AutoProcessor.from_pretrained(str(pretrained))
        processor.tokenizer.padding_side = "left"  # batched generation continues every row from its end
        self.processor = compression_aware_processor(processor, self.model)
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        logger.info(f"{self.MODEL}: {pretrained} with compression {self.compression.spec()}")

    def prompt(self, context: str, num_images: int) -> str:
        image_token = self.processor.image_token
        if getattr(self.processor, "chat_template", None):
            content = [] if image_token in context else [{"type": "image"}] * num_images
            messages = [{"role": "user", "content": content + [{"type": "text", "text": context}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if image_token not in context:
            context = f"{image_token}\n" * num_images + context
        return f"USER: {context} ASSISTANT:"

    def answer_batch(self, contexts, images, generation):
        prompts = [self.prompt(c, len(imgs)) for c, imgs in zip(contexts, images)]
        flat = [image for imgs in images for image in imgs]
        inputs = self.processor(text=prompts, images=flat or None, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        width = inputs["input_ids"].shape[1]
        pad = self.tokenizer.pad_token_id
        # the processor expanded each <image> to its kept tokens: the prompt's positions are its real tokens
        text_config = getattr(self.model.config, "text_config", self.model.config)
        positions = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else [width] * len(prompts)
        kwargs = generation.generate_kwargs()
        kwargs["max_new_tokens"] = check_prompts_fit(
            positions, kwargs["max_new_tokens"], getattr(text_config, "max_position_embeddings", None)
        )
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, **kwargs, pad_token_id=pad)
        output_ids = output_ids[:, width:]
        texts = [t.strip() for t in self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]
        metrics = {"new_tokens": _new_tokens(output_ids, pad, self.tokenizer.eos_token_id)}
        if flat:
            placeholders = int((inputs["input_ids"] == self.image_token_id).sum())
            metrics["visual_tokens_per_image"] = placeholders / len(flat)
        return texts, metrics


def _new_tokens(output_ids: torch.Tensor, pad: int | None, eos: int | None) -> int:
    keep = torch.ones_like(output_ids, dtype=torch.bool)
    for special in (pad, eos):
        if special is not None:
            keep &= output_ids != special
    return int(keep.sum())
