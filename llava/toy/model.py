"""The toy LLaVA: a tiny LLaVA-1.5 in the real ViT-L/14-336 token geometry trained on the toy task.

``prepare_toy(settings, cache_root)`` follows LLaVA's recipe in miniature, under ``cache_root/<key>/``
where ``key`` hashes the settings (a second call with the same settings reuses the finished run); the
drawn scenes are shared by every model of the same task (``cache_root/scenes-<key>/``: both towers train
and are evaluated on the same files, drawn once):

0. the random-weight base (``llava.model.tiny.build_tiny_llava``: a CLIP tower in ViT-L/14-336's token
   geometry, 336 px, patch 14, 576 patches + CLS, narrow and shallow; a tokenizer that knows the task's
   words) and the training and held-out sets (``llava.toy.task``);
1. the vision tower (``settings.tower``): ``"clip"`` trains it the way CLIP is trained, contrastively
   against a tiny text encoder on the scenes' captions (``llava.toy.clip``), starting from the base's
   random tower; ``"random"`` keeps that random initialisation (the comparison the main job shows);
2. LLaVA stage 1: the projector alone, tower and LLM frozen, on the scenes' captions with the ``plain``
   template (LLaVA's feature-alignment pre-training);
3. LLaVA stage 2: the language model and the projector (LLaVA's "full fine-tuning"), tower frozen, on the
   question-answer conversations, starting from the stage-1 projector.

Stages 2 and 3 run through the real entry point (``llava.train.train.train(*parse_arguments(argv))``).
A frozen tower keeps the compression methods' token scores (the tower's own attention) exactly those of
the evaluated model.
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

from .task import (
    TASK_CORPUS,
    TEXT_CORPUS,
    check_image_size,
    write_caption_set,
    write_eval_set,
    write_train_set,
)

# Bump when the task or the recipe changes in a way the settings do not show: old caches are then unused.
TOY_FORMAT = 5  # 5: the contrastive tower, stage 1 on captions, 4-layer tower (the scenes' folder is no part of it)
DONE = "toy_complete.json"
TOWERS = ("clip", "random")


@dataclass(frozen=True)
class ToySettings:
    """Everything that decides the toy model; its hash names the cache folder."""

    seed: int = 0
    train_images: int = 1280
    eval_images: int = 120  # 40 per question type (the model does not depend on it)
    epochs: int = 4  # 640 steps: with 320 (loss 0.20) the model had not learnt to count (30 %, chance)
    batch_size: int = 8
    learning_rate: float = 3e-3
    projector_learning_rate: float = 1e-2  # --mm_projector_lr: the projector has the most to learn
    warmup_ratio: float = 0.05
    hidden: int = 64
    layers: int = 4
    vision_hidden: int = 32
    vision_layers: int = 4  # layer -2 (LLaVA's features, the methods' scores) and a last layer above it
    image_size: int = 336  # ViT-L/14-336's input (576 patches); the CI test trains a smaller geometry
    tower: str = "clip"  # "clip": trained contrastively (llava.toy.clip); "random": its random initialisation
    clip_steps: int = 80  # contrastive steps of the tower (tower="clip")
    clip_batch_size: int = 32
    clip_learning_rate: float = 2e-3
    stage1_steps: int = 40  # LLaVA stage 1: projector-only steps on captions (0 skips the stage)
    stage1_learning_rate: float = 1e-3  # LLaVA-1.5's stage-1 learning rate
    text_question: bool = False  # scenes with a written word and "What word is written in the image?"

    def __post_init__(self):
        for name in ("train_images", "eval_images", "epochs", "batch_size", "hidden", "layers", "vision_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ToySettings.{name} must be a positive integer, got {value!r}")
        check_image_size(self.image_size)
        if not isinstance(self.vision_layers, int) or self.vision_layers < 2:
            raise ValueError(f"ToySettings.vision_layers must be an integer >= 2 (features come from layer -2), "
                             f"got {self.vision_layers!r}")
        if self.tower not in TOWERS:
            raise ValueError(f"ToySettings.tower must be one of {TOWERS}, got {self.tower!r}")
        for name in ("clip_steps", "clip_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ToySettings.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.text_question, bool):
            raise ValueError(f"ToySettings.text_question must be True or False, got {self.text_question!r}")
        if not isinstance(self.stage1_steps, int) or self.stage1_steps < 0:
            raise ValueError(f"ToySettings.stage1_steps must be an integer >= 0, got {self.stage1_steps!r}")
        for name in ("learning_rate", "projector_learning_rate", "clip_learning_rate", "stage1_learning_rate"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"ToySettings.{name} must be in (0, 1), got {getattr(self, name)}")

    def key(self) -> str:
        """Hash of what decides the trained model (the held-out set's size does not: it has a folder of
        its own beside the model, so a larger evaluation reuses the trained model)."""
        model_settings = self.model_settings()
        payload = json.dumps({"format": TOY_FORMAT, **model_settings}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def scenes_key(self) -> str:
        """Hash of what decides the drawn scenes: the training and held-out sets are shared by the models
        of both towers (and any other training settings), drawn once."""
        words = {"words": True} if self.text_question else {}  # the task without words keeps its key
        payload = json.dumps({"format": TOY_FORMAT, "seed": self.seed, "image_size": self.image_size, **words},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def model_settings(self) -> dict:
        """The settings that decide the trained model (those of the other tower's training are left out
        of a random tower's, so they do not split its cache)."""
        unused = ({"eval_images"} | ({"clip_steps", "clip_batch_size", "clip_learning_rate"} if self.tower == "random" else set())
                  | (set() if self.text_question else {"text_question"}))  # the task without words keeps its key
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}


@dataclass(frozen=True)
class ToyModel:
    """Paths of a trained toy model and its held-out evaluation set."""

    folder: Path
    model_path: Path  # the trained checkpoint (full weights + tokenizer + tower folder)
    question_file: Path  # held-out questions (scenes-<key>/eval-<n>/, shared by the towers)
    annotation_file: Path
    image_folder: Path
    train_seconds: float
    train_losses: list
    settings: ToySettings
    cached: bool
    record: dict = dataclasses.field(default_factory=dict)  # toy_complete.json: stages' seconds and losses
    data_folder: Path | None = None  # the training scenes (train.json, captions.json, images/)


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
        # the scenes are drawn by this code and written atomically (llava.toy.task.save_image): decoding all
        # 1280 images before each of the three runs (stage 1, stage 2, VisionZip‡) took about 6 s of CPU each
        "--check_image_decode", "no",
        *extra,
    ]


def progress_callback(label: str, every: int, out):
    """A ``TrainerCallback`` writing one line every ``every`` steps and at the last step, to ``out`` (a
    stream, or a ``print``-like function, called with ``file=`` the stdout of the moment this callback is
    made: the Trainer's stdout is redirected while it runs), with the time since the first step."""
    import time

    from transformers import TrainerCallback

    write = out if callable(out) else None
    stdout = sys.stdout
    began = time.perf_counter()

    class StepProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            if logs and "loss" in logs and (step % every == 0 or step == state.max_steps):
                line = f"  {label}: step {step}/{state.max_steps}, loss {logs['loss']:.3f} [{time.perf_counter() - began:.0f} s]"
                if write is not None:
                    write(line, flush=True, file=stdout)
                else:
                    out.write(line + "\n")
                    out.flush()

    return StepProgress()


def run_training(argv: list[str], label: str, every: int = 10, printer=None):
    """``llava.train.train.train(*parse_arguments(argv))`` showing one progress line every ``every`` steps
    (through ``printer``, default this process's stdout).

    The Trainer prints every logged step's dict when its progress bar is off; that stdout goes to a
    buffer, and the entry point's one summary line is returned with the result. Warnings still surface
    (they go to stderr)."""
    from llava.train.train import parse_arguments, train

    progress = progress_callback(label, every, printer if printer is not None else sys.stdout)  # outside the redirect
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = train(*parse_arguments(argv), callbacks=[progress])
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


def weights_digest(*folders: Path | str) -> str:
    """A hash of the weight files (``*.safetensors``, ``*.bin``) under ``folders``, tower folders included:
    what a cache of the model's answers must be keyed on besides the settings and the code, so that
    answers of replaced weights (another projector, another tower) are never reused."""
    digest = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        # training_args.bin is the Trainer's pickled arguments, not weights
        files = sorted(f for pattern in ("*.safetensors", "*.bin") for f in folder.rglob(pattern)
                       if f.name != "training_args.bin")
        if not files:
            raise ValueError(f"{folder} holds no weight files (*.safetensors, *.bin)")
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def install_tower(base: Path, tower, target: Path) -> Path:
    """A copy of the LLaVA checkpoint ``base`` at ``target`` whose vision tower is ``tower`` (a
    ``CLIPVisionModel`` of the same shape): the tower folder (``TOWER_DIR``) and the tower's copy inside
    ``model.safetensors`` (what ``from_pretrained`` loads) are both replaced. Written in a staging folder
    and renamed: a complete checkpoint or none."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from llava.model.tiny import TOWER_DIR

    staging = Path(tempfile.mkdtemp(prefix=".tower-", dir=target.parent))
    try:
        shutil.copytree(base, staging, dirs_exist_ok=True)
        tower_dir = staging / TOWER_DIR
        (tower_dir / "model.safetensors").unlink()
        tower.save_pretrained(tower_dir)
        weights = load_file(staging / "model.safetensors")
        prefix = "model.vision_tower.vision_tower.vision_model."
        trained = {k: v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
        stored = {k[len(prefix):] for k in weights if k.startswith(prefix)}
        if stored != set(trained):
            raise ValueError(f"the tower's parameters {sorted(set(trained) ^ stored)[:4]} differ from {base}'s")
        weights.update({prefix + k: v.detach().contiguous() for k, v in trained.items()})
        save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _contrastive_tower(base: Path, folder: Path, settings: ToySettings, printer) -> tuple[Path, dict]:
    """Train the base's random tower contrastively (``llava.toy.clip``) and install it into
    ``folder/base-clip``; returns that checkpoint and the training record (cached)."""
    import time

    from transformers import CLIPVisionModel

    from llava.model.tiny import TOWER_DIR

    from .clip import ClipSettings, train_clip_tower

    target = folder / "base-clip"
    record_file = folder / "clip_tower.json"
    if target.is_dir() and record_file.is_file():
        return target, json.loads(record_file.read_text())
    tower = CLIPVisionModel.from_pretrained(base / TOWER_DIR, attn_implementation="sdpa")
    clip = ClipSettings(steps=settings.clip_steps, batch_size=settings.clip_batch_size,
                        learning_rate=settings.clip_learning_rate, words=settings.text_question)
    printer(f"toy tower: contrastive image-text pre-training of the {settings.vision_layers}-layer tower "
            f"({clip.steps} steps of {clip.batch_size} captioned scenes, InfoNCE)", flush=True)
    cpu = time.process_time()
    training = train_clip_tower(tower, clip, settings.seed, printer=printer, every=max(1, clip.steps // 5))
    cpu = time.process_time() - cpu  # this process's: the drawing worker's CPU is its own
    printer(f"  caption retrieval on 64 held-out scenes: {training.retrieval:.1f} % (chance {training.chance:.1f} %)",
            flush=True)
    if target.exists():
        shutil.rmtree(target)  # an unfinished install of this run's own key (no record yet)
    install_tower(base, tower, target)
    record = {"seconds": training.seconds, "cpu_seconds": cpu, "losses": training.losses,
              "retrieval": training.retrieval, "chance": training.chance}
    atomic_write_text(record_file, json.dumps(record, indent=1))
    return target, record


def _draw_once(folder: Path, marker: str, draw, what: str, printer) -> None:
    """Run ``draw()`` (which writes ``folder`` and, last, ``folder/marker``) unless ``marker`` is there,
    holding a lock beside ``folder``: the processes of the two towers share the scenes, and the second
    one waits for the first's drawing instead of drawing the same files again."""
    import time

    from llava.utils_io import FileLock

    if (folder / marker).is_file():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder.parent / f".{folder.name}.lock", what=what)
    waiting = False
    while True:
        try:
            lock.acquire()
            break
        except FileExistsError:  # a live process draws them now (a dead one's lock is taken over)
            if not waiting:
                printer(f"  waiting for another process drawing {what}", flush=True)
                waiting = True
            time.sleep(0.5)
    try:
        if not (folder / marker).is_file():
            draw()
    finally:
        lock.release()


def _held_out_set(settings: ToySettings, held_out: Path, printer) -> None:
    def draw():
        printer(f"toy task: drawing {settings.eval_images} held-out scenes into {held_out}", flush=True)
        write_eval_set(str(held_out), settings.eval_images, settings.seed, settings.image_size,
                       words=settings.text_question)

    _draw_once(held_out, "annotations.json", draw, f"the held-out scenes {held_out}", printer)


def _training_set(settings: ToySettings, data: Path, printer) -> None:
    """The training scenes' conversations (stage 2) and captions (stage 1), ``captions.json`` last."""
    def draw():
        printer(f"toy task: drawing {settings.train_images} training scenes into {data}", flush=True)
        write_train_set(str(data), settings.train_images, settings.seed, settings.image_size,
                        progress=lambda n: printer(f"  {n}/{settings.train_images} scenes", flush=True),
                        words=settings.text_question)
        write_caption_set(str(data), settings.train_images, settings.seed, settings.image_size,
                          words=settings.text_question)

    _draw_once(data, "captions.json", draw, f"the training scenes {data}", printer)


def prepare_toy(settings: ToySettings | None = None, cache_root: Path | str | None = None,
                printer=print) -> ToyModel:
    """The trained toy model for ``settings`` (default ``ToySettings()``), trained once into
    ``cache_root/<settings.key()>/`` and reused afterwards; its scenes in ``cache_root/scenes-<key>/``."""
    settings = settings or ToySettings()
    root = (Path(cache_root) if cache_root is not None else default_toy_cache()).resolve()
    folder = root / settings.key()
    scenes = root / f"scenes-{settings.scenes_key()}"
    data = scenes / f"train-{settings.train_images}"
    held_out = scenes / f"eval-{settings.eval_images}"
    checkpoint = folder / "model"
    done = folder / DONE
    _held_out_set(settings, held_out, printer)
    eval_paths = (held_out / "questions.jsonl", held_out / "annotations.json", held_out / "images")
    if done.is_file():
        record = json.loads(done.read_text())
        return ToyModel(folder, checkpoint, *eval_paths, record["train_seconds"], record["losses"], settings,
                        cached=True, record=record, data_folder=data)

    from llava.utils_io import FileLock

    # one process trains a given toy model: a second one fails here, naming the first, instead of training
    # it again beside the first
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".toy.lock", what=f"the toy model {folder}"):
        return _train_toy(settings, folder, data, held_out, checkpoint, done, eval_paths, printer)


def _train_toy(settings: ToySettings, folder: Path, data: Path, held_out: Path, checkpoint: Path, done: Path,
               eval_paths: tuple, printer) -> ToyModel:
    import time

    from llava.model.tiny import build_tiny_llava

    if done.is_file():  # finished by the process that held the lock before
        record = json.loads(done.read_text())
        return ToyModel(folder, checkpoint, *eval_paths, record["train_seconds"], record["losses"], settings,
                        cached=True, record=record, data_folder=data)
    base = Path(build_tiny_llava(str(folder / "base"), version="v1.5", seed=settings.seed, hidden=settings.hidden,
                                 layers=settings.layers, vision_hidden=settings.vision_hidden,
                                 vision_layers=settings.vision_layers, image_size=settings.image_size,
                                 extra_corpus=TASK_CORPUS + (TEXT_CORPUS if settings.text_question else "")))
    record: dict = {"settings": settings.model_settings()}
    if settings.tower == "clip":
        base, record["clip"] = _contrastive_tower(base, folder, settings, printer)
    _training_set(settings, data, printer)
    train_json = str(data / "train.json")
    tower_words = "contrastively trained" if settings.tower == "clip" else "random"
    extra = []
    if settings.stage1_steps:
        captions_json = str(data / "captions.json")
        stage1 = folder / "stage1"
        printer(f"LLaVA stage 1: the projector alone on captions ({settings.stage1_steps} steps; {tower_words} "
                f"tower and LLM frozen) through llava.train.train", flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        stage1_settings = dataclasses.replace(settings, learning_rate=settings.stage1_learning_rate,
                                              projector_learning_rate=settings.stage1_learning_rate, warmup_ratio=0.0)
        result, _summary = run_training(
            train_argv(str(base), captions_json, str(data / "images"), str(stage1), stage1_settings,
                       "--version", "plain", "--tune_mm_mlp_adapter", "True", "--max_steps", str(settings.stage1_steps)),
            "stage 1", every=max(1, settings.stage1_steps // 4), printer=printer)
        record["stage1"] = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                            "losses": result.losses}
        extra = ["--pretrain_mm_mlp_adapter", str(stage1 / "mm_projector.bin")]
    steps = total_steps(settings)
    printer(f"LLaVA stage 2: the LLM and projector ({settings.layers} layers, hidden {settings.hidden}; "
            f"{settings.vision_layers}-layer {tower_words} tower frozen) for {steps} steps through llava.train.train",
            flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    result, summary = run_training(
        train_argv(str(base), train_json, str(data / "images"), str(checkpoint), settings, *extra),
        "stage 2", every=max(1, steps // 10), printer=printer,
    )
    for line in summary:
        printer(line)
    seconds = time.perf_counter() - start
    _copy_tower(base, checkpoint)
    record.update({"train_seconds": seconds, "train_cpu_seconds": time.process_time() - cpu, "losses": result.losses,
                   "steps": result.global_step})
    atomic_write_text(done, json.dumps(record, indent=1))
    return ToyModel(folder, checkpoint, *eval_paths, seconds, result.losses, settings, cached=False, record=record,
                    data_folder=data)


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
    data = toy.data_folder
    _training_set(toy.settings, data, printer)  # drawn already, unless the model came from an older cache
    argv = train_argv(str(toy.model_path), str(data / "train.json"), str(data / "images"), str(run_dir), settings,
                      "--tune_mm_mlp_adapter", "True", "--compression", config.spec(), "--max_steps", str(steps))
    printer(f"projector-only tuning with {config.spec()}: {steps} steps through llava.train.train", flush=True)
    start = time.perf_counter()
    result, _summary = run_training(argv, "projector tuning", every=max(1, steps // 4), printer=printer)
    seconds = time.perf_counter() - start
    atomic_write_text(done, json.dumps({"spec": config.spec(), "steps": steps, "train_seconds": seconds,
                                        "losses": result.losses}, indent=1))
    return ProjectorTuning(run_dir, config.spec(), steps, seconds, result.losses, False)
