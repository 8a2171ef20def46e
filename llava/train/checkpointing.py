"""Where a run starts (fresh, resumed, refused) and what a finished run writes.

Run identity: a run writes ``llava_run.json`` (``RUN_RECORD``: a random ``run_id`` and the ``fingerprint``
of the settings that decide what it learns) into its output directory before the model loads, and a copy
into every ``checkpoint-*`` it saves (``IdentityCallback``). A run resumes only from checkpoints that carry
its own identity: checkpoints of an earlier run in the same folder (kept by ``--overwrite_output_dir``) are
ignored, and checkpoints of the same run made with other settings (``--visual_tokens 64`` resumed with
``128``) are refused with the differing settings named. ``--resume_from_checkpoint PATH`` needs a checkpoint
whose identity has the same fingerprint; a checkpoint without identity (not written by this code) is
refused, because resuming unpickles its optimizer/scheduler/RNG files (DeepSpeed loads with
``weights_only=False``): a foreign checkpoint can run code.

Finishing: final weights are written atomically (``llava.utils_io.atomic_write``), and the run counts as
finished only by ``training_complete.json`` (``FINISHED_MARKER``), written last; it lists the files the
run wrote. A second start there is refused unless ``--overwrite_output_dir``, which then removes only the
weight files that marker lists: never a file this code did not write. An output directory that is the
input model's folder, or that holds weights without a run record of this code, is refused.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field

import torch

from llava.utils_io import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

FINISHED_MARKER = "training_complete.json"
RUN_RECORD = "llava_run.json"
# held (llava.utils_io.FileLock: host and pid) by the main process of a run for its whole length, so that
# a second run into the same folder fails at once naming the holder instead of both writing mixed files
TRAINING_LOCK = ".llava_train.lock"
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
    "non_lora_trainables.bin",
)
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint by transformers.Trainer
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
RESUME_LATEST = ("last", "latest", "true", "True")


@dataclass
class StartPlan:
    resume_from: str | None
    reason: str
    run_id: str = ""
    ignored_checkpoints: list[str] = field(default_factory=list)


def read_json_file(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished_run_evidence(output_dir: str) -> str | None:
    """The file that shows ``output_dir`` holds a finished run, or None.

    Our runs count as finished only by the marker (written last); a folder without our run record but with
    final weights holds a run of other code (the original LLaVA) and counts as finished too."""
    if os.path.exists(os.path.join(output_dir, FINISHED_MARKER)):
        return FINISHED_MARKER
    if os.path.exists(os.path.join(output_dir, RUN_RECORD)):
        return None  # ours, interrupted (maybe while saving its final weights): not finished
    return foreign_weights(output_dir)


def foreign_weights(output_dir: str) -> str | None:
    """A weight file in ``output_dir`` that no run of this code wrote (no run record, no marker), or None."""
    if not os.path.isdir(output_dir):
        return None
    if os.path.exists(os.path.join(output_dir, RUN_RECORD)) or os.path.exists(os.path.join(output_dir, FINISHED_MARKER)):
        return None
    for name in FINAL_WEIGHTS:
        if os.path.exists(os.path.join(output_dir, name)):
            return name
    return None


def same_folder(a: str | None, b: str | None) -> bool:
    return bool(a and b and os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b))


def check_output_is_not_input(output_dir: str, model_name_or_path: str | None, pretrain_mm_mlp_adapter: str | None) -> None:
    """Refuse an output directory whose writes would replace the run's own inputs."""
    if same_folder(output_dir, model_name_or_path):
        raise ValueError(
            f"--output_dir {output_dir} is the folder of --model_name_or_path {model_name_or_path}: the run "
            "would overwrite the model it trains from; choose another --output_dir"
        )
    if pretrain_mm_mlp_adapter and same_folder(output_dir, os.path.dirname(os.path.abspath(pretrain_mm_mlp_adapter))):
        raise ValueError(
            f"--output_dir {output_dir} holds --pretrain_mm_mlp_adapter {pretrain_mm_mlp_adapter}, which the "
            "run's own mm_projector.bin would replace; choose another --output_dir"
        )


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


def fingerprint_differences(stored: dict, current: dict) -> dict:
    keys = sorted(set(stored) | set(current))
    return {k: (stored.get(k), current.get(k)) for k in keys if stored.get(k) != current.get(k)}


def describe_differences(differences: dict) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differences.items())


def checkpoint_identity(path: str) -> dict | None:
    return read_json_file(os.path.join(path, RUN_RECORD))


def plan_start(
    output_dir: str,
    resume_from_checkpoint: str | None,
    overwrite_output_dir: bool,
    fingerprint: dict | None = None,
) -> StartPlan:
    """Decide how a run in ``output_dir`` starts; raises instead of overwriting a finished run, resuming
    from another run's checkpoint, or resuming with other settings. ``fingerprint``: the settings that
    decide what the run learns (``None``: identity is not checked, for callers outside ``train``)."""
    foreign = foreign_weights(output_dir)
    if foreign:
        raise FileExistsError(
            f"output directory {output_dir} holds {foreign}, not written by a run of this code (no {RUN_RECORD}); "
            "it is never deleted or overwritten: choose another --output_dir"
        )
    evidence = finished_run_evidence(output_dir) if os.path.isdir(output_dir) else None
    if evidence and not overwrite_output_dir:
        raise FileExistsError(
            f"output directory {output_dir} holds a finished run ({evidence}); pass --overwrite_output_dir to "
            "train there again, or choose another --output_dir"
        )
    record = read_json_file(os.path.join(output_dir, RUN_RECORD)) or {}
    complete, incomplete = checkpoints(output_dir)

    if resume_from_checkpoint and resume_from_checkpoint not in RESUME_LATEST:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINER_STATE)):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume_from_checkpoint} is not a complete checkpoint (no {TRAINER_STATE})"
            )
        identity = checkpoint_identity(resume_from_checkpoint)
        if fingerprint is not None:
            if identity is None:
                raise ValueError(
                    f"--resume_from_checkpoint {resume_from_checkpoint} has no {RUN_RECORD}: it was not written by "
                    "a run of this code, and resuming unpickles its files (optimizer, scheduler, RNG; DeepSpeed "
                    "loads with weights_only=False), which can run code. Resume only checkpoints you wrote"
                )
            differences = fingerprint_differences(identity.get("fingerprint", {}), fingerprint)
            if differences:
                raise ValueError(
                    f"--resume_from_checkpoint {resume_from_checkpoint} belongs to a run with other settings "
                    f"({describe_differences(differences)}); resume with the same settings or start afresh"
                )
        run_id = (identity or {}).get("run_id") or uuid.uuid4().hex
        return StartPlan(resume_from_checkpoint, f"resuming from {resume_from_checkpoint} (as asked)", run_id)

    if overwrite_output_dir and not resume_from_checkpoint:
        if complete or evidence:
            logger.warning(
                "--overwrite_output_dir: starting afresh in %s (its earlier final weights are replaced; its "
                "checkpoints are kept but never resumed)", output_dir
            )
        return StartPlan(None, "fresh start (--overwrite_output_dir)", uuid.uuid4().hex, [p for _, p in complete])
    if incomplete:
        logger.warning("ignoring incomplete checkpoints (interrupted while saving): %s", ", ".join(incomplete))

    run_id = record.get("run_id")
    ours, ignored = [], []
    for step, path in complete:
        identity = checkpoint_identity(path)
        if fingerprint is None or (identity is not None and run_id and identity.get("run_id") == run_id):
            ours.append((step, path, identity))
        else:
            ignored.append(path)
    if ignored:
        logger.warning(
            "ignoring checkpoints not written by the run recorded in %s (an earlier run, or other code): %s",
            os.path.join(output_dir, RUN_RECORD), ", ".join(ignored),
        )
    if ours:
        step, path, identity = ours[-1]
        if fingerprint is not None:
            differences = fingerprint_differences((identity or {}).get("fingerprint", {}), fingerprint)
            if differences:
                raise ValueError(
                    f"{output_dir} holds checkpoints of a run with other settings ({describe_differences(differences)}); "
                    "resume it with the same settings, or pass --overwrite_output_dir to start afresh, or choose "
                    "another --output_dir"
                )
        return StartPlan(path, f"resuming from {path} (step {step}, the last complete checkpoint of this run)",
                         run_id or uuid.uuid4().hex, ignored)
    if resume_from_checkpoint:
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint of this run in {output_dir}")
    return StartPlan(None, "fresh start", uuid.uuid4().hex, ignored)


def write_run_record(output_dir: str, plan: StartPlan, fingerprint: dict) -> dict:
    """Write the run's identity (before the model loads); returns it."""
    record = {
        "run_id": plan.run_id,
        "fingerprint": fingerprint,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "start": plan.reason,
    }
    atomic_write_json(os.path.join(output_dir, RUN_RECORD), record)
    return record


def write_checkpoint_identity(checkpoint_dir: str, record: dict) -> None:
    if os.path.isdir(checkpoint_dir):
        atomic_write_json(os.path.join(checkpoint_dir, RUN_RECORD), record)


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
        with atomic_write(os.path.join(output_dir, "mm_projector.bin")) as temporary:
            torch.save(state, temporary)
        with atomic_write(os.path.join(output_dir, "mm_projector.safetensors")) as temporary:
            save_file({k: v.contiguous() for k, v in state.items()}, temporary)
        save_config(model.config, output_dir)
    return state


def save_config(config, output_dir: str) -> None:
    """``config.json`` written atomically (``save_pretrained`` writes in place)."""
    with atomic_write(os.path.join(output_dir, "config.json")) as temporary:
        config.to_json_file(temporary)


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
        save_config(model.config, output_dir)
        model.save_pretrained(output_dir, state_dict=lora_state)
        with atomic_write(os.path.join(output_dir, "non_lora_trainables.bin")) as temporary:
            torch.save(non_lora, temporary)


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
    """The marker a finished run writes last (atomically)."""
    atomic_write_json(os.path.join(output_dir, FINISHED_MARKER), summary)


def files_written_since(output_dir: str, since: float) -> list[str]:
    """Top-level files of ``output_dir`` modified at or after ``since`` (the run's final save)."""
    names = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path) and os.path.getmtime(path) >= since - 1.0 and name not in (FINISHED_MARKER, TRAINING_LOCK):
            names.append(name)
    return names


@contextlib.contextmanager
def training_lock(output_dir: str, is_main_process: bool = True):
    """Hold ``TRAINING_LOCK`` in ``output_dir`` while a run works there (main process only: the others of
    a distributed run follow it). The folder is created for it; a folder this call created is removed
    again if the run leaves it empty (refused before writing anything). A second run is refused at once
    (``FileExistsError`` naming the holder's host and pid); a lock whose process is gone is taken over."""
    from llava.utils_io import FileLock

    if not is_main_process:
        yield
        return
    if not output_dir:
        raise ValueError("--output_dir is empty")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} exists and is not a folder")
    created = not os.path.isdir(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"--output_dir {output_dir} is not writable ({err.strerror or err})") from err
    try:
        with FileLock(os.path.join(output_dir, TRAINING_LOCK), what=f"training output folder {output_dir}"):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)  # only succeeds when empty: nothing of the run is ever removed


def remove_finished_run(output_dir: str) -> None:
    """--overwrite_output_dir on a finished run: its marker and the weight files that marker lists as
    written by it go before training starts, so that an interrupted new run is not mistaken for the old
    finished one. Nothing else is deleted (checkpoints are kept, and never resumed by the new run)."""
    marker = os.path.join(output_dir, FINISHED_MARKER)
    summary = read_json_file(marker) or {}
    written = set(summary.get("files_written") or ())
    if os.path.isfile(marker):
        os.remove(marker)
    for name in FINAL_WEIGHTS:
        path = os.path.join(output_dir, name)
        if name in written and os.path.isfile(path):
            logger.warning("--overwrite_output_dir: removing %s of the earlier run", path)
            os.remove(path)


def identity_callback(record: dict):
    """A ``TrainerCallback`` that writes the run's identity into every checkpoint it saves.

    It is written when the Trainer decides to save (``on_step_end`` / ``on_epoch_end`` with
    ``should_save``), before the
    Trainer's own files, so that every checkpoint with ``trainer_state.json`` (written last) carries it,
    however early a kill comes. A stale folder of the same name (an earlier run's, kept by
    ``--overwrite_output_dir``) first loses its ``trainer_state.json``, so that it cannot pass for this
    run's checkpoint until the Trainer has rewritten it. ``on_save`` writes it again (idempotent)."""
    from transformers import TrainerCallback

    def claim(args, state, before_save: bool) -> None:
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        identity = checkpoint_identity(folder) if os.path.isdir(folder) else None
        if before_save and os.path.isdir(folder) and (identity or {}).get("run_id") != record.get("run_id"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, TRAINER_STATE))
        os.makedirs(folder, exist_ok=True)
        write_checkpoint_identity(folder, record)

    class IdentityCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                claim(args, state, before_save=True)

        def on_epoch_end(self, args, state, control, **kwargs):
            if control.should_save:
                claim(args, state, before_save=True)

        def on_save(self, args, state, control, **kwargs):
            claim(args, state, before_save=False)

    return IdentityCallback()
