"""Train LLaVA with compressed visual tokens: ``python -m llava.train.train [arguments]``.

Modes (see docs/training.md and scripts/v1_5/train/):

- efficient tuning (VisionZip‡): ``--model_name_or_path`` a LLaVA checkpoint, ``--tune_mm_mlp_adapter
  True``: only ``mm_projector`` trains; the output is ``mm_projector.bin`` + ``config.json``, loaded on top of
  the checkpoint with ``--model-base``;
- full fine-tuning: ``--model_name_or_path`` the LLM (vicuna) + ``--pretrain_mm_mlp_adapter`` (stage 1) and
  ``--vision_tower``: LLM and projector train; LoRA / QLoRA with ``--lora_enable`` / ``--bits 4``.

Compression (``--compression visionzip:64``, or ``--compression visionzip --visual_tokens 64``) is stored in the model config
(``visual_compression``) and applied by the model's own forward, the code path inference uses, so the
language model trains on the compressed sequence.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from enum import Enum

import torch
import transformers
from transformers import HfArgumentParser

from llava.processor import LlavaProcessor

from .arguments import (
    CompressionArguments,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    build_compression_config,
)
from .checkpointing import (
    FINISHED_MARKER,
    StartPlan,
    check_output_is_not_input,
    files_written_since,
    identity_callback,
    plan_start,
    remove_finished_run,
    save_lora,
    save_projector,
    training_lock,
    write_finished_marker,
    write_run_record,
)
from .dataset import LazySupervisedDataset, SupervisedCollator, check_data_file
from .trainer import LlavaTrainer, is_projector_parameter

logger = logging.getLogger("llava.train")

# [VisionZip-LLaVA] settings of a new multimodal model when neither the command line nor the checkpoint
# gives them: LLaVA-1.5's (the original's dataclass defaults were LLaVA-1.0's: linear projector, layer -1).
MULTIMODAL_DEFAULTS = {
    "mm_vision_select_layer": -2,
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "mm_patch_merge_type": "flat",
    "mm_vision_select_feature": "patch",
}


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    losses: list[float]
    skipped_samples: int
    start: StartPlan
    model: object = field(repr=False, default=None)
    trainer: object = field(repr=False, default=None)


def parse_arguments(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_processes = world_size() > 1 and not torch.cuda.is_available()
    if cpu_processes:
        # CPU processes talk through gloo (only for a real multi-process run: a single process has none),
        # and accelerate counts CPU processes only with use_cpu (else a DeepSpeed run sees a world of 1)
        if not has_flag(argv, "--ddp_backend"):
            argv += ["--ddp_backend", "gloo"]
        if not has_flag(argv, "--use_cpu"):
            argv += ["--use_cpu", "True"]
    if cpu_processes and has_flag(argv, "--deepspeed"):
        # DeepSpeed on CPU needs its gloo process group before TrainingArguments derive the global batch
        # size from the world size, and before ZeRO-3 partitions the weights while loading them.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    parser = HfArgumentParser((ModelArguments, DataArguments, CompressionArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def quantization_kwargs(training_args: TrainingArguments, dtype: torch.dtype) -> dict:
    if training_args.bits not in (4, 8):
        return {}
    from transformers import BitsAndBytesConfig

    return {
        "device_map": {"": training_args.device},
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=training_args.bits == 4,
            load_in_8bit=training_args.bits == 8,
            # transformers matches these as name prefixes or suffixes
            llm_int8_skip_modules=["model.mm_projector", "lm_head"],
            llm_int8_threshold=6.0,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=training_args.double_quant,
            bnb_4bit_quant_type=training_args.quant_type,
        ),
    }


def resolve_multimodal_settings(model_args: ModelArguments, config) -> ModelArguments | None:
    """``model_args`` with every multimodal setting decided: the command line, else the checkpoint's
    config, else LLaVA-1.5's. None for a text-only model. A ValueError names a setting that contradicts
    the checkpoint's existing projector."""
    # [VisionZip-LLaVA] a LLaVA checkpoint trains as a multimodal model without --vision_tower (the
    # original then fell back to text-only training)
    vision_tower = model_args.vision_tower or getattr(config, "mm_vision_tower", None)
    if not vision_tower:
        return None
    values = {"vision_tower": vision_tower}
    for name, default in MULTIMODAL_DEFAULTS.items():
        given = getattr(model_args, name)
        stored = getattr(config, name, None)
        values[name] = given if given is not None else stored if stored is not None else default
    stored_projector = getattr(config, "mm_projector_type", None)
    if stored_projector is not None and values["mm_projector_type"] != stored_projector:
        raise ValueError(
            f"--mm_projector_type {values['mm_projector_type']!r} contradicts the checkpoint's projector "
            f"({stored_projector!r}); leave it out to keep the checkpoint's"
        )
    return dataclasses.replace(model_args, **values)


def lora_target_modules(model) -> list[str]:
    """Full names of the language model's Linear layers (not the vision tower, projector or LM head).

    [VisionZip-LLaVA] the original targets short names (q_proj, ...) and must wrap LoRA before the vision
    tower exists, or the tower's q_proj would match too; full names let LoRA come last.
    """
    excluded = ("mm_projector", "vision_tower", "vision_resampler", "lm_head")
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(part in excluded for part in name.split("."))
    )


def visual_tokens_per_image(model, compression) -> int:
    """Visual tokens one image (one view, for anyres) contributes to the LLM's input sequence (at most)."""
    tower = model.get_vision_tower()
    extra = 1 if getattr(tower, "select_feature", "patch") == "cls_patch" else 0
    full = tower.num_patches + extra
    if not compression.enabled:
        return full
    tokens = compression.settings.llm_input_tokens_per_view(full)
    return full if tokens is None else tokens


def positions_per_image(model, tokens_per_view: int, image_aspect_ratio: str | None) -> int:
    """Sequence positions an image can take at most: one view, or for anyres the base image plus the
    largest crop grid of ``image_grid_pinpoints`` (an upper bound, so that no sample whose replies the
    model would truncate away is taken as learnable)."""
    if image_aspect_ratio != "anyres":
        return tokens_per_view
    from llava.mm_utils import parse_grid_pinpoints

    tower = model.get_vision_tower()
    side = tower.image_size
    grids = [(w // side, h // side) for w, h in parse_grid_pinpoints(model.config.image_grid_pinpoints)]
    crops = max(columns * rows for columns, rows in grids)
    # spatial_unpad adds one image_newline per row of patches (and one after an uncropped image)
    newlines = max(rows for _columns, rows in grids) * tower.num_patches_per_side + 1
    return tokens_per_view * (1 + crops) + newlines


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


class TrainingMode(str, Enum):
    """What trains; decides what the run writes at the end (see ``save_final``)."""

    PROJECTOR = "projector"  # mm_projector only (VisionZip efficient tuning, LLaVA stage 1)
    FULL = "full"  # language model + projector (LLaVA stage 2)
    LORA = "lora"  # LoRA adapters (+ projector); with --bits 4/8 on a quantised model: QLoRA

    @classmethod
    def of(cls, model_args: ModelArguments, training_args: TrainingArguments) -> TrainingMode:
        if training_args.lora_enable:
            return cls.LORA
        return cls.PROJECTOR if model_args.tune_mm_mlp_adapter else cls.FULL

    def describe(self, bits: int) -> str:
        return f"qlora-{bits}bit" if self is TrainingMode.LORA and bits in (4, 8) else self.value


def build_model_and_tokenizer(model_args, training_args, compression_args, data_args):
    """Load the model and tokenizer, wire the vision modules, freeze what does not train, apply the
    compression setting and LoRA. Returns (model, tokenizer, image processor or None, compression)."""
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.tokenizer import load_tokenizer

    dtype = compute_dtype(training_args)
    load_kwargs = {"dtype": dtype, "cache_dir": training_args.cache_dir}
    if training_args.attn_implementation:
        load_kwargs["attn_implementation"] = training_args.attn_implementation
    load_kwargs.update(quantization_kwargs(training_args, dtype))
    model = LlavaLlamaForCausalLM.from_pretrained(model_args.model_name_or_path, **load_kwargs)
    model.config.use_cache = False

    if model_args.freeze_backbone:
        model.get_model().requires_grad_(False)
    if training_args.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(training_args.gradient_checkpointing)
        )
    if training_args.gradient_checkpointing:
        # checkpointed blocks need an input that requires grad when the embeddings are frozen
        model.enable_input_require_grads()

    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token

    multimodal = resolve_multimodal_settings(model_args, model.config)
    image_processor = None
    if multimodal is not None:
        model.get_model().initialize_vision_modules(model_args=multimodal, fsdp=training_args.fsdp)
        tower = model.get_vision_tower()
        tower.to(dtype=dtype, device=training_args.device)
        image_processor = tower.image_processor
        config = model.config
        config.image_aspect_ratio = data_args.image_aspect_ratio or getattr(config, "image_aspect_ratio", None) or "square"
        data_args.image_aspect_ratio = config.image_aspect_ratio
        data_args.is_multimodal = True
        config.tokenizer_padding_side = tokenizer.padding_side
        config.tokenizer_model_max_length = tokenizer.model_max_length
        config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
        if model_args.tune_mm_mlp_adapter:
            model.requires_grad_(False)
            model.get_model().mm_projector.requires_grad_(True)
        config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
        if training_args.freeze_mm_mlp_adapter:
            model.get_model().mm_projector.requires_grad_(False)
        if training_args.bits in (4, 8):
            model.get_model().mm_projector.to(dtype=dtype, device=training_args.device)
        config.mm_use_im_start_end = multimodal.mm_use_im_start_end
        config.mm_use_im_patch_token = multimodal.mm_use_im_patch_token
        config.mm_projector_lr = training_args.mm_projector_lr
        model.initialize_vision_tokenizer(multimodal, tokenizer=tokenizer)
    elif model_args.tune_mm_mlp_adapter:
        raise ValueError("--tune_mm_mlp_adapter needs a vision tower (--vision_tower or a LLaVA checkpoint)")

    compression = build_compression_config(compression_args, data_args.image_aspect_ratio)
    if compression.enabled:
        compression.settings.check_training()
    if multimodal is not None:
        model.set_visual_compression(compression)
    elif compression.enabled:
        raise ValueError(f"--compression {compression.method} needs a vision tower")

    if training_args.lora_enable:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=training_args.lora_r,
            lora_alpha=training_args.lora_alpha,
            target_modules=lora_target_modules(model),
            lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
        if multimodal is not None and not training_args.freeze_mm_mlp_adapter:
            # as the original LLaVA LoRA recipe: the projector trains fully beside the adapters
            for name, parameter in model.named_parameters():
                if is_projector_parameter(name):
                    parameter.requires_grad_(True)
    return model, tokenizer, image_processor, compression


def summary_line(mode, bits, model, compression, dataset, tokens, plan, image_aspect_ratio) -> str:
    trainable, total = count_parameters(model)
    images, texts = dataset.count_modalities()
    if compression.enabled:
        settings = " ".join(f"{key}={value}" for key, value in compression.settings.to_dict().items())
        visual = f"{tokens} visual tokens per image ({compression.method} {settings})"
    else:
        visual = f"{tokens} visual tokens per image (no compression)"
    if image_aspect_ratio == "anyres":
        visual = visual.replace("per image", "per view (base image and each crop)")
    return (
        f"[llava.train] {visual} | {len(dataset)} samples ({images} with an image, {texts} text-only) | "
        f"mode {mode.describe(bits)}: {trainable:,} of {total:,} parameters train | {plan.reason}"
    )


# Training arguments that decide what a run learns: a checkpoint resumes only under the same values.
FINGERPRINT_TRAINING_FIELDS = (
    "learning_rate", "mm_projector_lr", "weight_decay", "warmup_ratio", "warmup_steps", "lr_scheduler_type",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed",
    "model_max_length", "bits", "lora_enable", "lora_r", "lora_alpha", "lora_dropout", "lora_bias",
    "freeze_mm_mlp_adapter", "bf16", "fp16", "group_by_modality_length", "optim",
)
FINGERPRINT_DATA_FIELDS = ("data_path", "image_folder", "image_aspect_ratio")
# Room asked of the output folder when the run writes no whole model (projector-only, no checkpoints).
SMALL_OUTPUT_BYTES = 16 * 2**20


def _plain(value):
    """A JSON value for the fingerprint: enums by value, existing paths absolute."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.abspath(value)
    return value


def run_fingerprint(model_args, data_args, compression_args, training_args) -> dict:
    """The settings that decide what a run learns (model, data, compression, optimisation), as JSON."""
    import json

    fingerprint = {f"model.{k}": _plain(v) for k, v in dataclasses.asdict(model_args).items()}
    fingerprint.update({f"data.{k}": _plain(getattr(data_args, k)) for k in FINGERPRINT_DATA_FIELDS})
    fingerprint.update({f"compression.{k}": _plain(v) for k, v in dataclasses.asdict(compression_args).items()})
    fingerprint.update({f"training.{k}": _plain(getattr(training_args, k, None)) for k in FINGERPRINT_TRAINING_FIELDS})
    return json.loads(json.dumps(fingerprint, default=str))


def check_compression_trainable(compression_args, image_aspect_ratio: str | None) -> None:
    """The compression parsed and asked whether it can be trained with (``CompressionMethod.check_training``:
    e.g. PruMerge's adaptive mode, whose token count differs per image), before anything loads. A budget
    that needs the checkpoint's image_aspect_ratio to split is checked again once the model is read."""
    try:
        compression = build_compression_config(compression_args, image_aspect_ratio)
    except ValueError:
        if image_aspect_ratio is not None:
            raise
        return  # the family comes from the checkpoint's config: build_model_and_tokenizer names the error
    if compression.enabled:
        compression.settings.check_training()


# checkpoint model types the trainer builds as LlavaLlamaForCausalLM (a plain Llama LM or a LLaVA-1.5/NeXT
# checkpoint); another family would train without what makes it that family
TRAINABLE_MODEL_TYPES = ("llama", "llava_llama", "llava")


def check_model_trainable(model_name_or_path: str) -> None:
    """Refuse, before anything loads, a local checkpoint of a family the trainer cannot build: Mini-Gemini
    (``mgm``: its HR tower and patch-info mining need MGM's data pipeline), the native families (Qwen-VL,
    CogVLM) and Mistral-based LLaVA would be loaded as LLaVA-Llama and lose what makes them that family."""
    config_file = os.path.join(model_name_or_path, "config.json")
    if not os.path.isfile(config_file):
        return  # a hub id: transformers resolves it and the class check happens at load
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    model_type = config.get("model_type") or "/".join(config.get("architectures") or ["?"])
    if model_type not in TRAINABLE_MODEL_TYPES:
        raise ValueError(
            f"--model_name_or_path {model_name_or_path!r} is a {model_type!r} checkpoint; the trainer builds "
            f"LLaVA-Llama models only (model_type one of {TRAINABLE_MODEL_TYPES})"
        )


def preflight(model_args, data_args, compression_args, training_args) -> tuple[StartPlan, dict, list[dict]]:
    """Everything checked before the model loads: required arguments, output != input, how the run starts
    (``plan_start``: finished run, run identity, settings), the output folder (writable, room), the data
    file (records, image files; images decode per ``--check_image_decode``). Returns (plan, fingerprint,
    records)."""
    from llava.preflight import check_output_dir, folder_weight_bytes

    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    if not data_args.data_path:
        raise ValueError("--data_path is required")
    check_compression_trainable(compression_args, data_args.image_aspect_ratio)
    check_model_trainable(model_args.model_name_or_path)
    output_dir = training_args.output_dir
    check_output_is_not_input(output_dir, model_args.model_name_or_path, model_args.pretrain_mm_mlp_adapter)
    fingerprint = run_fingerprint(model_args, data_args, compression_args, training_args)
    plan = plan_start(output_dir, training_args.resume_from_checkpoint, training_args.overwrite_output_dir, fingerprint)
    whole_model = TrainingMode.of(model_args, training_args) is not TrainingMode.PROJECTOR
    saves_checkpoints = str(_plain(training_args.save_strategy)) != "no"
    needed = SMALL_OUTPUT_BYTES
    if whole_model or saves_checkpoints:
        needed = max(needed, folder_weight_bytes(model_args.model_name_or_path))
    check_output_dir(output_dir, needed, "--output_dir")
    records = check_data_file(
        data_args.data_path,
        image_folder=data_args.image_folder,
        check_image_files=data_args.check_image_files,
        check_image_decode=getattr(data_args, "check_image_decode", "auto"),
    )
    return plan, fingerprint, records


def train(model_args, data_args, compression_args, training_args, callbacks=None) -> TrainResult:
    """Run one training job; ``callbacks``: extra ``transformers.TrainerCallback`` objects. The output
    folder is locked for the whole run (``training_lock``): a second run there fails at once, naming the
    holder."""
    with training_lock(training_args.output_dir, training_args.process_index == 0):
        return _train(model_args, data_args, compression_args, training_args, callbacks)


def _train(model_args, data_args, compression_args, training_args, callbacks=None) -> TrainResult:
    plan, fingerprint, records = preflight(model_args, data_args, compression_args, training_args)
    run_record = {"run_id": plan.run_id, "fingerprint": fingerprint}
    if training_args.process_index == 0:
        if plan.resume_from is None and training_args.overwrite_output_dir:
            remove_finished_run(training_args.output_dir)
        run_record = write_run_record(training_args.output_dir, plan, fingerprint)
    transformers.set_seed(training_args.seed)

    model, tokenizer, image_processor, compression = build_model_and_tokenizer(
        model_args, training_args, compression_args, data_args
    )
    base = model.get_base_model() if training_args.lora_enable else model
    tokens = visual_tokens_per_image(base, compression) if image_processor is not None else 0
    if tokens >= training_args.model_max_length:
        raise ValueError(
            f"--model_max_length {training_args.model_max_length} leaves no room for text after the "
            f"{tokens} visual tokens of an image; raise it (LLaVA-1.5: 2048) or compress the visual tokens"
        )
    processor = LlavaProcessor.for_training(
        tokenizer, image_processor, model_args.version,
        image_aspect_ratio=data_args.image_aspect_ratio or "square",
        image_grid_pinpoints=getattr(base.config, "image_grid_pinpoints", None),
        mm_use_im_start_end=bool(getattr(base.config, "mm_use_im_start_end", False)),
    )
    dataset = LazySupervisedDataset(
        data_args.data_path,
        processor,
        image_folder=data_args.image_folder,
        model_max_length=training_args.model_max_length,
        visual_tokens_per_image=positions_per_image(base, tokens, data_args.image_aspect_ratio) if tokens else 0,
        bad_sample_policy=training_args.bad_sample_policy,
        check_tokenization=training_args.check_tokenization,
        check_image_files=data_args.check_image_files,
        check_image_decode="no",  # decoded in preflight() when asked; later failures follow bad_sample_policy
        records=records,
    )
    collator = SupervisedCollator(pad_token_id=tokenizer.pad_token_id, model_max_length=training_args.model_max_length)
    mode = TrainingMode.of(model_args, training_args)
    line = summary_line(
        mode, training_args.bits, model, compression, dataset, tokens, plan, data_args.image_aspect_ratio
    )
    if training_args.process_index == 0:
        print(line, flush=True)

    trainer = LlavaTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks or []) + [identity_callback(run_record)],
    )
    trainer.train(resume_from_checkpoint=plan.resume_from)
    trainer.save_state()

    base.config.use_cache = True
    save_started = time.time()
    save_final(trainer, model, tokenizer, mode, training_args)
    skipped = trainer.total_skipped()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        write_finished_marker(
            training_args.output_dir,
            {
                "mode": mode.describe(training_args.bits),
                "global_step": trainer.state.global_step,
                "visual_compression": compression.to_dict(),
                "visual_tokens_per_image": tokens,
                "skipped_samples": skipped,
                "skipped_examples": trainer.skipped[:20],
                "final_loss": losses[-1] if losses else None,
                "run_id": plan.run_id,
                "files_written": files_written_since(training_args.output_dir, save_started),
            },
        )
        if skipped:
            logger.warning(
                "%d samples were skipped (no learnable reply, tokenization mismatch or unreadable image); "
                "see the warnings above and %s",
                skipped,
                os.path.join(training_args.output_dir, FINISHED_MARKER),
            )
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        output_dir=training_args.output_dir,
        global_step=trainer.state.global_step,
        losses=losses,
        skipped_samples=skipped,
        start=plan,
        model=model,
        trainer=trainer,
    )


def save_final(trainer, model, tokenizer, mode: TrainingMode, training_args) -> None:
    """projector: mm_projector.bin/.safetensors + config.json; lora: adapter + non_lora_trainables.bin;
    full: the whole model (gathered under ZeRO-3) + tokenizer. Collective: every process calls it."""
    output_dir = training_args.output_dir
    main = trainer.is_world_process_zero()
    if mode is TrainingMode.PROJECTOR:
        with_embeddings = bool(getattr(model.config, "mm_use_im_start_end", False))
        save_projector(model, output_dir, with_embeddings, main)
    elif mode is TrainingMode.LORA:
        save_lora(model, output_dir, training_args.lora_bias, main)
        if main:
            tokenizer.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
        if main:
            tokenizer.save_pretrained(output_dir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    train(*args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
