"""The toy LLaVA: a tiny LLaVA-1.5 in the real ViT-L/14-336 token geometry trained on the toy task.

``prepare_toy(settings, cache_root)`` builds the random-weight base (``llava.model.tiny.build_tiny_llava``:
a CLIP tower in ViT-L/14-336's token geometry, 336 px, patch 14, 576 patches + CLS, narrow and shallow;
a tokenizer that knows the task's words), writes the training and held-out sets
(``llava.toy.task``) and trains through the real entry point (``llava.train.train.train(*parse_arguments
(argv))``), all under ``cache_root/<key>/`` where ``key`` hashes the settings: a second call with the same
settings reuses the finished run and returns at once.

What trains: the language model and the projector (LLaVA's stage-2 "full fine-tuning"), with the vision
tower frozen at its random initialisation, as LLaVA freezes its CLIP. A random pre-LN ViT is nearly the
identity around its residual stream (its blocks add small updates to the patch embeddings), so the
selected layer's patch features are a fixed random projection of each patch's pixels plus its position
embedding: colour, and so coloured area, is linearly readable, which is what the task asks about.
Training the tower too would multiply the cost of every step (backward through the tower at 577 tokens)
for no accuracy the frozen tower does not already reach (see docs/toy_task.md); and a frozen tower keeps
the compression methods' token scores (the tower's own attention) exactly those of the evaluated model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from llava.utils_io import atomic_write_text

from .task import TASK_CORPUS, check_image_size, write_eval_set, write_train_set

# Bump when the task or the recipe changes in a way the settings do not show: old caches are then unused.
TOY_FORMAT = 4
DONE = "toy_complete.json"


@dataclass(frozen=True)
class ToySettings:
    """Everything that decides the toy model; its hash names the cache folder."""

    seed: int = 0
    train_images: int = 1600
    eval_images: int = 240
    epochs: int = 4
    batch_size: int = 8
    learning_rate: float = 3e-3
    projector_learning_rate: float = 1e-2  # --mm_projector_lr: the projector has the most to learn
    warmup_ratio: float = 0.05
    hidden: int = 64
    layers: int = 4
    vision_hidden: int = 32
    vision_layers: int = 6
    image_size: int = 336  # ViT-L/14-336's input (576 patches); the CI test trains a smaller geometry

    def __post_init__(self):
        for name in ("train_images", "eval_images", "epochs", "batch_size", "hidden", "layers", "vision_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ToySettings.{name} must be a positive integer, got {value!r}")
        check_image_size(self.image_size)
        if not isinstance(self.vision_layers, int) or self.vision_layers < 2:
            raise ValueError(f"ToySettings.vision_layers must be an integer >= 2 (features come from layer -2), "
                             f"got {self.vision_layers!r}")
        for name in ("learning_rate", "projector_learning_rate"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"ToySettings.{name} must be in (0, 1), got {getattr(self, name)}")

    def key(self) -> str:
        """Hash of what decides the trained model (the held-out set's size does not: it has a folder of
        its own beside the model, so a larger evaluation reuses the trained model)."""
        model_settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "eval_images"}
        payload = json.dumps({"format": TOY_FORMAT, **model_settings}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ToyModel:
    """Paths of a trained toy model and its held-out evaluation set."""

    folder: Path
    model_path: Path  # the trained checkpoint (full weights + tokenizer + tower folder)
    question_file: Path  # held-out questions (eval-<n>/ beside the model)
    annotation_file: Path
    image_folder: Path
    train_seconds: float
    train_losses: list
    settings: ToySettings
    cached: bool


def default_toy_cache() -> Path:
    return Path(os.environ.get("VISIONZIP_CACHE", Path(__file__).resolve().parents[2] / ".cache")) / "toy"


def total_steps(settings: ToySettings) -> int:
    return settings.epochs * -(-settings.train_images // settings.batch_size)


def train_argv(model_dir: str, data_path: str, image_folder: str, output_dir: str, settings: ToySettings,
               *extra: str) -> list[str]:
    """The command line of ``python -m llava.train.train`` for a toy run (CPU, deterministic, quiet)."""
    return [
        "--model_name_or_path", model_dir,
        "--data_path", data_path,
        "--image_folder", image_folder,
        "--image_aspect_ratio", "pad",
        "--output_dir", output_dir,
        "--num_train_epochs", str(settings.epochs),
        "--per_device_train_batch_size", str(settings.batch_size),
        "--learning_rate", str(settings.learning_rate),
        "--mm_projector_lr", str(settings.projector_learning_rate),
        "--warmup_steps", str(max(1, round(settings.warmup_ratio * total_steps(settings)))),
        "--lr_scheduler_type", "cosine",
        "--weight_decay", "0.0",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu", "True",
        "--seed", str(settings.seed),
        "--data_seed", str(settings.seed),
        "--disable_tqdm", "True",
        "--dataloader_num_workers", "0",
        "--model_max_length", "2048",
        "--overwrite_output_dir", "True",
        *extra,
    ]


def progress_callback(label: str, every: int, out):
    """A ``TrainerCallback`` writing one line to ``out`` every ``every`` steps and at the last step."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            if logs and "loss" in logs and (step % every == 0 or step == state.max_steps):
                out.write(f"  {label}: step {step}/{state.max_steps}, loss {logs['loss']:.3f}\n")
                out.flush()

    return StepProgress()


def run_training(argv: list[str], label: str, every: int = 10):
    """``llava.train.train.train(*parse_arguments(argv))`` showing one progress line every ``every`` steps.

    The Trainer prints every logged step's dict when its progress bar is off; that stdout goes to a
    buffer, and the entry point's one summary line is returned with the result. Warnings still surface
    (they go to stderr)."""
    from llava.train.train import parse_arguments, train

    out = sys.stdout
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = train(*parse_arguments(argv), callbacks=[progress_callback(label, every, out)])
    summary = [line for line in buffer.getvalue().splitlines() if line.startswith("[llava.train]")]
    return result, summary


def _copy_tower(base: Path, checkpoint: Path) -> None:
    """The trained checkpoint names its tower relatively (``clip-vit-tiny-336``, resolved inside the
    checkpoint folder), as the tiny base does: the frozen tower's folder goes along."""
    from llava.model.tiny import TOWER_DIR

    target = checkpoint / TOWER_DIR
    if not target.exists():
        shutil.copytree(base / TOWER_DIR, target)
    config_file = checkpoint / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("mm_vision_tower") != TOWER_DIR:
        config["mm_vision_tower"] = TOWER_DIR
        atomic_write_text(config_file, json.dumps(config, indent=2))


def prepare_toy(settings: ToySettings | None = None, cache_root: Path | str | None = None,
                printer=print) -> ToyModel:
    """The trained toy model for ``settings`` (default ``ToySettings()``), trained once into
    ``cache_root/<settings.key()>/`` and reused afterwards."""
    import time

    settings = settings or ToySettings()
    root = Path(cache_root) if cache_root is not None else default_toy_cache()
    folder = (root / settings.key()).resolve()
    data = folder / "data"
    held_out = folder / f"eval-{settings.eval_images}"
    checkpoint = folder / "model"
    done = folder / DONE
    if not (held_out / "annotations.json").is_file():
        printer(f"toy task: drawing {settings.eval_images} held-out scenes into {held_out}", flush=True)
        write_eval_set(str(held_out), settings.eval_images, settings.seed, settings.image_size)
    eval_paths = (held_out / "questions.jsonl", held_out / "annotations.json", held_out / "images")
    if done.is_file():
        record = json.loads(done.read_text())
        return ToyModel(folder, checkpoint, *eval_paths, record["train_seconds"], record["losses"], settings,
                        cached=True)

    from llava.model.tiny import build_tiny_llava

    base = Path(build_tiny_llava(str(folder / "base"), version="v1.5", seed=settings.seed, hidden=settings.hidden,
                                 layers=settings.layers, vision_hidden=settings.vision_hidden,
                                 vision_layers=settings.vision_layers, image_size=settings.image_size,
                                 extra_corpus=TASK_CORPUS))
    printer(f"toy task: drawing {settings.train_images} training scenes into {data}", flush=True)
    train_json = write_train_set(str(data), settings.train_images, settings.seed, settings.image_size)
    steps = total_steps(settings)
    printer(f"toy model: training the LLM and projector ({settings.layers} layers, hidden {settings.hidden}; "
            f"{settings.vision_layers}-layer tower frozen) for {steps} steps through llava.train.train", flush=True)
    start = time.perf_counter()
    result, summary = run_training(
        train_argv(str(base), train_json, str(data / "images"), str(checkpoint), settings),
        "toy training", every=max(1, steps // 10),
    )
    for line in summary:
        printer(line)
    seconds = time.perf_counter() - start
    _copy_tower(base, checkpoint)
    model_settings = {k: v for k, v in dataclasses.asdict(settings).items() if k != "eval_images"}
    atomic_write_text(done, json.dumps({"settings": model_settings, "train_seconds": seconds,
                                        "losses": result.losses, "steps": result.global_step}, indent=1))
    return ToyModel(folder, checkpoint, *eval_paths, seconds, result.losses, settings, cached=False)


@dataclass(frozen=True)
class ProjectorTuning:
    """A projector-only run (VisionZip‡ in miniature) on the toy model: its checkpoint and its losses."""

    run_dir: Path
    spec: str
    steps: int
    seconds: float
    losses: list
    cached: bool


def tune_projector(toy: ToyModel, spec: str = "visionzip:64", steps: int = 32, learning_rate: float = 1e-3,
                   printer=print) -> ProjectorTuning:
    """Train only ``mm_projector`` of the toy model on its training set for ``steps`` steps with the
    compression ``spec`` in the forward (``--tune_mm_mlp_adapter True --compression SPEC``), through
    ``llava.train.train``; cached in ``toy.folder/projector-<hash>/`` like the toy model itself."""
    import time

    from visionzip import CompressionConfig

    config = CompressionConfig.parse(spec)  # a bad spec fails here, before any training
    if not config.enabled:
        raise ValueError(f"projector tuning needs a compression spec, got {spec!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    key = hashlib.sha256(json.dumps([TOY_FORMAT, config.spec(), steps, learning_rate]).encode()).hexdigest()[:12]
    run_dir = toy.folder / f"projector-{key}"
    done = run_dir / DONE
    if done.is_file():
        record = json.loads(done.read_text())
        return ProjectorTuning(run_dir, config.spec(), steps, record["train_seconds"], record["losses"], True)
    settings = dataclasses.replace(toy.settings, learning_rate=learning_rate, projector_learning_rate=learning_rate,
                                   warmup_ratio=0.0)
    data = toy.folder / "data"
    argv = train_argv(str(toy.model_path), str(data / "train.json"), str(data / "images"), str(run_dir), settings,
                      "--tune_mm_mlp_adapter", "True", "--compression", config.spec(), "--max_steps", str(steps))
    printer(f"projector-only tuning with {config.spec()}: {steps} steps through llava.train.train", flush=True)
    start = time.perf_counter()
    result, _summary = run_training(argv, "projector tuning", every=max(1, steps // 4))
    seconds = time.perf_counter() - start
    atomic_write_text(done, json.dumps({"spec": config.spec(), "steps": steps, "train_seconds": seconds,
                                        "losses": result.losses}, indent=1))
    return ProjectorTuning(run_dir, config.spec(), steps, seconds, result.losses, False)
