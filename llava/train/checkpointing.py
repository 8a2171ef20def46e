"""Where a run starts (fresh, resumed, refused) and what a finished run writes.

A finished run leaves ``training_complete.json`` (with a summary) beside its final weights. Starting again
in that directory is refused unless ``--overwrite_output_dir``; a directory holding only ``checkpoint-*``
folders (an interrupted run) is resumed from the last complete one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

FINISHED_MARKER = "training_complete.json"
# Files a finished LLaVA run leaves at the top of its output directory (ours or the original's).
FINAL_WEIGHTS = (
    "mm_projector.bin",
    "mm_projector.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint by transformers.Trainer
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
RESUME_LATEST = ("last", "latest", "true", "True")


@dataclass
class StartPlan:
    resume_from: str | None
    reason: str


def finished_run_evidence(output_dir: str) -> str | None:
    """The file that shows ``output_dir`` holds a finished run, or None."""
    for name in (FINISHED_MARKER,) + FINAL_WEIGHTS:
        if os.path.exists(os.path.join(output_dir, name)):
            return name
    return None


def checkpoints(output_dir: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(complete checkpoints as (step, path) sorted by step, incomplete checkpoint paths)."""
    complete, incomplete = [], []
    if not os.path.isdir(output_dir):
        return complete, incomplete
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            if os.path.isfile(os.path.join(path, TRAINER_STATE)):
                complete.append((int(match.group(1)), path))
            else:
                incomplete.append(path)
    return sorted(complete), sorted(incomplete)


def plan_start(output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> StartPlan:
    """Decide how a run in ``output_dir`` starts; raises instead of overwriting a finished run."""
    evidence = finished_run_evidence(output_dir) if os.path.isdir(output_dir) else None
    if evidence and not overwrite_output_dir:
        raise FileExistsError(
            f"output directory {output_dir} holds a finished run ({evidence}); pass --overwrite_output_dir to "
            "train there again, or choose another --output_dir"
        )
    complete, incomplete = checkpoints(output_dir)
    if resume_from_checkpoint and resume_from_checkpoint not in RESUME_LATEST:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINER_STATE)):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume_from_checkpoint} is not a complete checkpoint (no {TRAINER_STATE})"
            )
        return StartPlan(resume_from_checkpoint, f"resuming from {resume_from_checkpoint} (as asked)")
    if overwrite_output_dir and not resume_from_checkpoint:
        if complete or evidence:
            logger.warning(
                "--overwrite_output_dir: starting afresh in %s (earlier files there will be replaced)", output_dir
            )
        return StartPlan(None, "fresh start (--overwrite_output_dir)")
    if incomplete:
        logger.warning("ignoring incomplete checkpoints (interrupted while saving): %s", ", ".join(incomplete))
    if complete:
        step, path = complete[-1]
        return StartPlan(path, f"resuming from {path} (step {step}, the last complete checkpoint)")
    if resume_from_checkpoint:
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint in {output_dir}")
    return StartPlan(None, "fresh start")


# ---- saving ----


def gathered(parameter: torch.Tensor):
    """Context in which a ZeRO-3-partitioned parameter holds its full value (plain tensors as they are)."""
    if hasattr(parameter, "ds_id"):
        from deepspeed import zero

        return zero.GatheredParameters([parameter], modifier_rank=None)
    return contextlib.nullcontext()


def collect_state(named_parameters, keep) -> dict[str, torch.Tensor]:
    """Full CPU copies of the parameters whose name ``keep(name)`` accepts (gathered under ZeRO-3)."""
    state = {}
    for name, parameter in named_parameters:
        if keep(name):
            with gathered(parameter):
                state[name] = parameter.detach().cpu().clone()
    return state


def projector_state(model, with_embeddings: bool) -> dict[str, torch.Tensor]:
    """``mm_projector`` weights under their model names (``model.mm_projector.0.weight``, ...), plus the
    token embeddings when the image start/end tokens were trained with them (as the original)."""
    keys = ("mm_projector",) + (("embed_tokens",) if with_embeddings else ())
    return collect_state(model.named_parameters(), lambda name: any(k in name.split(".") for k in keys))


def save_projector(model, output_dir: str, with_embeddings: bool, is_main_process: bool) -> dict[str, torch.Tensor]:
    """Write ``mm_projector.bin`` and ``mm_projector.safetensors`` + ``config.json`` (every process must
    call this: gathering ZeRO-3 parameters is collective)."""
    state = projector_state(model, with_embeddings)
    if not state:
        raise ValueError("the model has no mm_projector parameters to save")
    if is_main_process:
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        torch.save(state, os.path.join(output_dir, "mm_projector.bin"))
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(output_dir, "mm_projector.safetensors"))
        model.config.save_pretrained(output_dir)
    return state


def save_lora(model, output_dir: str, lora_bias: str, is_main_process: bool) -> None:
    """Adapter weights (peft format) + ``non_lora_trainables.bin`` (e.g. the projector) + ``config.json``."""
    names = [name for name, _ in model.named_parameters()]
    lora_modules = {name.split("lora_")[0] for name in names if "lora_" in name}
    lora_state = collect_state(model.named_parameters(), lambda name: lora_keep(name, lora_bias, lora_modules))
    non_lora = {
        name: value
        for name, value in collect_state(
            ((n, p) for n, p in model.named_parameters() if p.requires_grad), lambda name: "lora_" not in name
        ).items()
    }
    if is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        model.config.save_pretrained(output_dir)
        model.save_pretrained(output_dir, state_dict=lora_state)
        torch.save(non_lora, os.path.join(output_dir, "non_lora_trainables.bin"))


def lora_keep(name: str, lora_bias: str, lora_modules: set[str]) -> bool:
    """Adapter weights, plus biases as peft's ``bias`` option trains them: "all" biases, or "lora_only"
    the biases of the layers that carry an adapter (``lora_modules``: their name prefixes)."""
    if "lora_" in name:
        return True
    if not name.endswith(".bias"):
        return False
    if lora_bias == "all":
        return True
    return lora_bias == "lora_only" and any(name.startswith(prefix) for prefix in lora_modules)


def write_finished_marker(output_dir: str, summary: dict) -> None:
    with open(os.path.join(output_dir, FINISHED_MARKER), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
        handle.write("\n")
