"""The toy study, the README's main job: a tiny LLaVA trained on the procedural task the way LLaVA is
trained (a CLIP-like tower, stage 1, stage 2), and its accuracy against visual tokens per method, next to
the same LLaVA on a random tower.

    python -m llava.toy [--tower both|clip|random --jobs 2 --questions 60 --tune-steps 8 --text-question]
    # bash scripts/demo.sh runs this

1. The toy models (``llava.toy``, docs/toy_task.md): a tiny LLaVA-1.5 in the real ViT-L/14-336 token
   geometry (576 patches + CLS; a narrow, shallow tower) on a procedural visual task (shapes on cluttered
   backgrounds: how many, which colour, which half), twice: with a tower trained contrastively on the
   scenes' captions (``llava.toy.clip``, as CLIP is) and with that tower's random initialisation; each
   through LLaVA's stage 1 (projector on captions) and stage 2 (LLM + projector on questions) with the
   real training entry point; trained once, then reused from ``.cache/toy/``. The two towers' models are
   trained and answer (step 3) side by side, one process each (``--jobs``; ``tower_job``), on the same
   drawn scenes. ``--text-question``: the task with a word written in each scene and a fourth question.
2. The [CLS] attention's concentration per tower layer (VisionZip Fig. 2): the share held by the top 1 /
   5 / 10 % of the patches, trained against random tower (``cls_attention.{md,png}``).
3. Accuracy against visual tokens per tower: held-out questions answered by the eval engine
   (``llava.eval.generate``) and scored by exact match (``llava.eval.scoring.score_gqa``), vanilla (576)
   and every registered method at 192 / 128 / 64 / 32 / 16 tokens (``METHOD:TOKENS``; a budget the method
   cannot take is n/a with its reason), with VisionZip‡ (the projector alone tuned with VisionZip 64 in
   the forward): tables per tower and per question type, and ``accuracy_vs_tokens.png``.
4. The kept tokens of VisionZip, VisPruner, random and downsample (where registered) on one held-out image,
   per tower (``kept_tokens.png``).
5. Answering time per question at 64 tokens: medians over interleaved repeats after a warm-up, with the
   range, measured in the random tower's process (it finishes first: no contrastive pre-training).

Steps 2 and 4 take their data from the towers' processes too (``tower_figures``); the main process only
draws the tables and figures once both are done.

Answers are kept under ``<output-dir>/answers/<toy model>-<held-out set>-code<hash>-weights<hash>/`` and
reused by later runs of the same code on the same weights (the code hash covers the methods, the model and
the eval engine; the weights hash the checkpoint's weight files, tower included); ``--reanswer``
regenerates them anyway.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from llava.utils_io import atomic_write, atomic_write_text

BUDGETS = (192, 128, 64, 32, 16)
TIMING_TOKENS = 64


def quiet_libraries() -> None:
    """Silence what would bury the tables: weight-loading progress bars, DeepSpeed's accelerator notice
    (the CPU is the accelerator here) and bitsandbytes' note about a 4-bit CPU kernel the demo never uses."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # the kernels hub notes that offline mode skips a publisher check, for a kernel the toy never uses
    logging.getLogger("kernels").setLevel(logging.ERROR)


def say(*parts, **kwargs) -> None:
    print(*parts, **{"flush": True, **kwargs})


def loss_span(losses: list) -> str:
    """Mean loss of the first and of the last tenth of the steps (single steps of batch 8 are noisy)."""
    part = max(1, len(losses) // 10)
    first, last = sum(losses[:part]) / part, sum(losses[-part:]) / part
    return f"{first:.3f} -> {last:.3f} (means of the first and last {part} steps)"


def answering_code_key() -> str:
    """A hash of the source that decides an answer (the methods, the model, the eval engine, the toy
    evaluator): answers kept from a run of other code are never reused, so a changed method is re-answered
    (the answer files' settings check cannot see code)."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for folder in ("visionzip", "llava/model", "llava/eval"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    digest.update((root / "llava/toy/evaluate.py").read_bytes())
    return digest.hexdigest()[:8]


def answers_folder(output: Path, toy, model_path: Path | None = None) -> Path:
    """Where the answers of ``toy`` (or of the checkpoint ``model_path`` on it) are kept: named by the
    toy model, the held-out set, the answering code and the weights (``weights_digest``: a replaced
    projector or tower is answered afresh, whatever the settings say)."""
    from llava.toy.model import weights_digest

    weights = weights_digest(*([model_path] if model_path is not None else []), toy.model_path)
    name = f"{toy.folder.name}-{toy.question_file.parent.name}-code{answering_code_key()}-weights{weights}"
    return Path(output) / "answers" / name


# ------------------------------------------------------------------------------------------- accuracy
def accuracy_rows(evaluator, methods: list[str], budgets=BUDGETS, printer=say) -> tuple[dict, dict, dict]:
    """Accuracy (%) per method and budget. Returns (vanilla score, {method: {tokens: ToyScore | None}},
    {method: reason a budget is n/a}). A method that refuses a budget (ValueError from its settings or
    the tower's check) gets None there and its reason. One progress line per setting (the accuracies go
    to the table, once)."""
    total = 1 + len(methods) * len(budgets)
    done = 0

    def progress(spec: str, score) -> None:
        nonlocal done
        done += 1
        how = "n/a" if score is None else ("reused" if score.seconds == 0 else f"answered in {score.seconds:.0f} s")
        printer(f"  [{done}/{total}] {spec}: {how}")

    vanilla = evaluator.evaluate("none", label="vanilla")
    progress("vanilla", vanilla)
    table: dict[str, dict] = {}
    reasons: dict[str, str] = {}
    for method in methods:
        row = {}
        for tokens in budgets:
            spec = f"{method}:{tokens}"
            try:  # the method's and the model's checks: a budget it cannot take is n/a, with the reason
                evaluator.set_compression(spec)
            except (ValueError, NotImplementedError) as err:
                row[tokens] = None
                reasons.setdefault(method, f"{spec}: {err}")
            else:  # anything failing from here on is an error, not a refused budget
                row[tokens] = evaluator.evaluate(spec)
            progress(spec, row[tokens])
        table[method] = row
    return vanilla, table, reasons


def markdown_table(vanilla, table: dict, reasons: dict, majority: float, num_questions: int,
                   budgets=BUDGETS, extra_rows: list[tuple[str, dict]] = ()) -> str:
    header = "| method | " + " | ".join(f"{t} tokens" for t in (vanilla.visual_tokens, *budgets)) + " |"
    lines = [header, "|---" * (len(budgets) + 2) + "|",
             f"| vanilla | {vanilla.accuracy:.1f} | " + " | ".join("" for _ in budgets) + " |"]
    for method, row in table.items():
        cells = ["n/a" if row[t] is None else f"{row[t].accuracy:.1f}" for t in budgets]
        lines.append(f"| {method} | | " + " | ".join(cells) + " |")
    for name, row in extra_rows:
        lines.append(f"| {name} | | " + " | ".join(row.get(t, "") for t in budgets) + " |")
    notes = [f"Accuracy (%) on {num_questions} held-out questions, exact match; majority-answer baseline "
             f"{majority:.1f} %."]
    notes += [f"n/a ({method}): {reason}" for method, reason in reasons.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def by_type_table(vanilla, table: dict, tokens: int = TIMING_TOKENS, extra: list[tuple[str, object]] = ()) -> str:
    """Accuracy (%) per question type at ``tokens`` visual tokens (vanilla at all of them): which kind of
    question a method's compression costs. ``extra``: (name, ToyScore) rows, e.g. VisionZip‡."""
    types = list(vanilla.by_type)
    lines = [f"| method ({tokens} tokens; vanilla {vanilla.visual_tokens}) | " + " | ".join(types) + " |",
             "|---" * (len(types) + 1) + "|",
             "| vanilla | " + " | ".join(f"{vanilla.by_type[t]:.1f}" for t in types) + " |"]
    rows = [(method, row.get(tokens)) for method, row in table.items()] + list(extra)
    for name, score in rows:
        cells = ["n/a" if score is None else f"{score.by_type.get(t, float('nan')):.1f}" for t in types]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(groups: list[tuple[str, object, dict, float | None]], majority: float, path: Path,
                  budgets=BUDGETS, dagger_tokens: int = TIMING_TOKENS) -> Path:
    """One panel per tower: each method's accuracy against its visual tokens, vanilla (all 576) as a
    dashed line, the majority answer dotted; ``groups``: (title, vanilla, table, VisionZip‡ accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups) + 2, 5), sharey=True, squeeze=False)
    ticks = sorted(budgets)
    for ax, (title, vanilla, table, dagger) in zip(axes[0], groups):
        ax.axhline(vanilla.accuracy, color="black", linestyle="--", linewidth=1,
                   label=f"vanilla (all {vanilla.visual_tokens} tokens)")
        ax.axhline(majority, color="grey", linestyle=":", linewidth=1, label="majority answer (no image)")
        for index, (method, row) in enumerate(table.items()):
            points = [(t, s.accuracy) for t, s in sorted(row.items()) if s is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=method, linestyle="-" if index < 10 else "--")
        if dagger is not None:
            ax.plot([dagger_tokens], [dagger], marker="*", markersize=14, linestyle="none", color="crimson",
                    label=f"VisionZip‡ (projector tuned at {dagger_tokens})")
        ax.set_xscale("log", base=2)
        # the budgets only: vanilla's 576 is the dashed line, not a tick that would leave the right third empty
        ax.set_xlim(min(ticks) / 1.2, max(ticks) * 1.2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("visual tokens per image")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves
    fig.suptitle("Toy LLaVA: accuracy against visual tokens")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:  # a complete picture or none under that name
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- tower diagnostics
def load_tower(toy):
    """The toy model's (frozen) vision tower and its image processor, from the checkpoint's tower folder."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    from llava.model.tiny import TOWER_DIR

    folder = toy.model_path / TOWER_DIR
    return (CLIPVisionModel.from_pretrained(folder, attn_implementation="sdpa").eval(),
            CLIPImageProcessorPil.from_pretrained(folder))


def held_out_pixels(evaluator, processor, count: int):
    import torch

    images = [item.load_image() for item in evaluator.items[:count]]
    return torch.cat([processor(images=image, return_tensors="pt")["pixel_values"] for image in images])


def plot_concentration(rows: list[tuple[str, list[dict]]], path: Path) -> Path:
    """Share of the [CLS] attention held by the top 1 / 5 / 10 % of the patches, per layer, per tower."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llava.toy.clip import TOP_SHARES

    fig, axes = plt.subplots(1, len(TOP_SHARES), figsize=(4.2 * len(TOP_SHARES), 3.8), sharey=True)
    for ax, top in zip(axes, TOP_SHARES):
        for name, shares in rows:
            ax.plot(range(1, len(shares) + 1), [layer[top] for layer in shares], marker="o", label=name)
        ax.axhline(top, color="grey", linestyle=":", linewidth=1, label="uniform attention")
        ax.set_xticks(range(1, len(rows[0][1]) + 1))
        ax.set_xlabel("tower layer (layer -2 feeds LLaVA)")
        ax.set_title(f"top {top} % of the patches")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of [CLS] attention (%)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("[CLS] attention concentration (VisionZip Fig. 2): trained against random tower")
    fig.tight_layout()
    return _save(fig, path)


PICTURED_METHODS = ("visionzip", "vispruner", "random", "downsample")


def kept_positions(tower, pixel_values, spec: str) -> tuple[list[int], list[int]]:
    """(kept patches, patches standing for merged tokens) of a vision-side method on one image, from the
    tokens it returns (``CompressedTokens.keep_indices`` / ``merged_indices``), patch numbers 0..575."""
    from visionzip import CompressionConfig
    from visionzip.compress import compress

    out = compress(tower, pixel_values, CompressionConfig.parse(spec))
    offset = int(out.has_cls)
    kept = [int(i) - offset for i in out.keep_indices[0].tolist() if int(i) >= offset]
    merged = [] if out.merged_indices is None else [int(i) - offset for i in out.merged_indices[0].tolist() if int(i) >= offset]
    return kept, merged


def plot_kept_tokens(image, rows: list[tuple[str, list[tuple[str, list, list]]]], patches_per_side: int,
                     tokens: int, path: Path) -> Path:
    """One row per tower, one panel per method: kept patches bright, dropped ones dimmed, the patches that
    stand for merged tokens tinted blue. ``rows``: (tower, [(title, kept, merged)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    size = image.size[0]
    columns = max(len(panels) for _, panels in rows)
    # constrained layout keeps each title above its own image (tight_layout let the bottom row's titles
    # hide behind the top row's images)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.3 * columns, 3.9 * len(rows)), squeeze=False,
                             layout="constrained")
    for axes_row, (tower, panels) in zip(axes, rows):
        for ax in axes_row:
            ax.axis("off")
        for ax, (title, kept, merged) in zip(axes_row, panels):
            overlay = np.zeros((patches_per_side, patches_per_side, 4))
            overlay[..., 3] = 0.7
            for p in kept:
                overlay[divmod(p, patches_per_side)] = (0, 0, 0, 0)
            for p in merged:
                overlay[divmod(p, patches_per_side)] = (0.1, 0.4, 1.0, 0.75)
            ax.imshow(image)
            ax.imshow(overlay, extent=(0, size, size, 0), interpolation="nearest")
            ax.set_title(f"{tower} tower\n{title}", fontsize=9)
    fig.suptitle(f"Visual tokens kept at {tokens}: bright = kept patches, dimmed = dropped, blue = merged tokens' positions")
    return _save(fig, path)


# -------------------------------------------------------------------------------------------- timings
def timing_rows(evaluator, specs: list[str], batch_size: int, repeats: int) -> list[tuple[str, object]]:
    """Answering time of one batch of held-out questions per spec, interleaved across specs (so that the
    load of a shared machine hits them alike, A B then B A as ``measure_interleaved``): one warm-up round,
    then ``repeats`` timed rounds (no memory round: the study prints times only)."""
    from visionzip.profiling import Measurement, timed_call

    batch = evaluator.items[:batch_size]
    calls = {}
    for spec in specs:
        def call(spec=spec):
            evaluator.set_compression(spec)
            evaluator.answerer(batch)
        calls[spec] = call
    for spec in specs:
        calls[spec]()
    results = {spec: Measurement() for spec in specs}
    for round_index in range(repeats):
        for spec in specs if round_index % 2 == 0 else specs[::-1]:
            results[spec].times.append(timed_call(calls[spec]))
    evaluator.model.set_visual_compression(None)
    return [(spec, results[spec]) for spec in specs]


# ----------------------------------------------------------------------------------------------- main
TOWER_TITLES = {"clip": "trained tower (contrastive, CLIP-like)", "random": "random tower"}


def describe_training(toy) -> str:
    """One line per stage of a toy model: what ran, how long it took, its loss."""
    s, record = toy.settings, toy.record
    if toy.cached:
        return f"  model {toy.model_path} (reused from an earlier run)"
    lines = [f"  model {toy.model_path} (trained now)"]
    if "clip" in record:
        clip = record["clip"]
        lines.append(f"  tower: {len(clip['losses'])} contrastive steps in {clip['seconds']:.0f} s{_cpu(clip)}, loss "
                     f"{loss_span(clip['losses'])}; caption retrieval {clip['retrieval']:.1f} % (chance {clip['chance']:.1f} %)")
    if "stage1" in record:
        lines.append(f"  stage 1: {len(record['stage1']['losses'])} steps in {record['stage1']['seconds']:.0f} s"
                     f"{_cpu(record['stage1'])}, "
                     f"loss {loss_span(record['stage1']['losses'])}")
    lines.append(f"  stage 2: {s.train_images} scenes x {s.epochs} epochs, batch {s.batch_size}, in "
                 f"{toy.train_seconds:.0f} s{_cpu(record, 'train_cpu_seconds')}, loss {loss_span(toy.train_losses)}")
    return "\n".join(lines)


def _cpu(record: dict, key: str = "cpu_seconds") -> str:
    """" (N s of CPU)" where the record has it (records of older runs do not)."""
    return f" ({record[key]:.0f} s of CPU)" if key in record else ""


TOWER_TAGS = {"clip": "[trained tower]", "random": "[random tower]"}


def tower_job(tower: str, options: dict) -> dict:
    """One tower's part of the main job: its toy model (trained now or reused), the accuracy of vanilla
    and every registered method at every budget, and VisionZip‡. Run in a process of its own when the
    towers run side by side (``--jobs``), so it takes plain values and returns plain values; its progress
    lines carry the tower's tag. Returns what the tables need, with its wall and CPU seconds."""
    began, cpu_began = time.perf_counter(), time.process_time()
    from llava.toy import ToySettings, prepare_toy

    settings = ToySettings(tower=tower, text_question=options["text_question"],  # bad settings fail first
                           **({} if options["questions"] is None else {"eval_images": options["questions"]}))
    quiet_libraries()
    import torch

    from llava.toy.evaluate import ToyEvaluator
    from llava.toy.model import tune_projector
    from visionzip import registered_methods

    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    tag = TOWER_TAGS[tower]

    def printer(*parts, **kwargs):
        say(tag, *parts, **kwargs)

    output, focus = Path(options["output"]), options["focus"]
    phases, mark = {}, [time.perf_counter(), time.process_time()]

    def phase(name: str) -> None:  # the wall and CPU seconds since the last phase ended
        now = [time.perf_counter(), time.process_time()]
        phases[name] = (now[0] - mark[0], now[1] - mark[1])
        mark[:] = now

    toy = prepare_toy(settings, cache_root=options["cache_dir"], printer=printer)
    phase("models")
    for line in describe_training(toy).splitlines():
        printer(line)
    answers_dir = answers_folder(output, toy)
    if options["reanswer"] and answers_dir.exists():
        shutil.rmtree(answers_dir)
    reused = len(list(answers_dir.glob("*.jsonl"))) if answers_dir.exists() else 0
    if reused:
        printer(f"  ({reused} answer files of these weights and this code in {answers_dir} are reused; "
                "--reanswer regenerates them)")
    evaluator = ToyEvaluator(toy, answers_dir, batch_size=options["batch_size"])
    methods = registered_methods()
    printer(f"answering {len(evaluator.items)} held-out questions: vanilla and {len(methods)} methods at "
            f"{', '.join(map(str, options['budgets']))} tokens")
    vanilla, table, reasons = accuracy_rows(evaluator, methods, options["budgets"], printer=printer)
    phase("answers")
    extra_rows, extra_scores, dagger = [], [], None
    if options["tune_steps"]:
        tuning = tune_projector(toy, f"visionzip:{focus}", steps=options["tune_steps"], printer=printer)
        tuned = ToyEvaluator(toy, answers_folder(output, toy, tuning.run_dir) / "visionzip-dagger",
                             batch_size=options["batch_size"], model_path=tuning.run_dir, model_base=toy.model_path)
        score = tuned.evaluate(f"visionzip:{focus}")
        dagger = score.accuracy
        printer(f"  VisionZip‡: {tuning.steps} projector-only steps at {focus} tokens "
                f"({'reused' if tuning.cached else f'{tuning.seconds:.0f} s'}), loss {loss_span(tuning.losses)}")
        extra_rows.append((f"visionzip‡ (projector tuned at {focus})", {focus: f"{score.accuracy:.1f}"}))
        extra_scores.append(("visionzip‡", score))
        phase("VisionZip‡")
    # this tower's share of the figures and the timings, here rather than after both towers finish: that
    # tail ran on one core while the other sat idle
    figures = tower_figures(evaluator, toy, focus)
    timings = None
    if options.get("timings_tower") == tower:
        specs = ["none"] + [f"{m}:{focus}" for m in methods if _usable(evaluator, f"{m}:{focus}")]
        batch = min(8, len(evaluator.items))
        printer(f"timing the answers at {focus} tokens: {len(specs)} settings, a batch of {batch}, "
                f"{options['repeats']} interleaved rounds after a warm-up")
        with torch.inference_mode():
            timings = {"batch": batch, "rows": timing_rows(evaluator, specs, batch, options["repeats"])}
    phase("figures' data" + (" and timings" if timings else ""))
    printer("time: " + "; ".join(f"{name} {wall:.0f} s ({cpu:.0f} s of CPU)" for name, (wall, cpu) in phases.items()))
    return {"toy": toy, "vanilla": vanilla, "table": table, "reasons": reasons, "extra_rows": extra_rows,
            "extra_scores": extra_scores, "dagger": dagger, "questions": len(evaluator.items),
            "num_patches": evaluator.num_patches, "figures": figures, "timings": timings,
            "seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu_began}


def tower_figures(evaluator, toy, focus: int) -> dict:
    """What the figures need of one tower: its [CLS] attention concentration per layer on the first 16
    held-out images, and the patches that each pictured vision-side method keeps at ``focus`` tokens on
    the first held-out image (plain values: this runs in the tower's process)."""
    import torch

    from llava.toy.clip import cls_attention_shares
    from visionzip import get_method, registered_methods

    model, processor = load_tower(toy)
    shares = cls_attention_shares(model, held_out_pixels(evaluator, processor, 16))
    methods = registered_methods()
    pictured = [m for m in PICTURED_METHODS if m in methods and get_method(m).stage != "llm"]
    image = evaluator.items[0].load_image()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    panels = []
    with torch.no_grad():
        for method in pictured:
            kept, merged = kept_positions(model, pixels, f"{method}:{focus}")
            panels.append((f"{method}:{focus} ({len(kept)} kept, {len(merged)} merged)", kept, merged))
    return {"shares": shares, "pictured": pictured, "panels": panels, "image": image.copy(),
            "image_size": int(model.config.image_size),
            "patches_per_side": int(model.config.image_size) // int(model.config.patch_size)}


def _tower_process(tower: str, options: dict, connection) -> None:
    """``tower_job`` in a process of its own: the result, or the error's traceback, goes to ``connection``."""
    import traceback

    try:
        result = tower_job(tower, options)
    except BaseException:  # KeyboardInterrupt included: the parent prints it and stops the other tower
        connection.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None  # the traceback is printed once, by the parent
    else:
        connection.send(("done", result))
    finally:
        connection.close()


def run_tower_jobs(towers: tuple, options: dict, jobs: int) -> dict:
    """``tower_job`` for each tower: side by side, one process each (spawned: a forked torch is unsafe),
    the CPU threads split between them, when ``jobs`` > 1; else one after the other in this process. A
    job that fails, or a process that ends without a result (killed), stops the others and raises."""
    if jobs <= 1 or len(towers) == 1:
        return {tower: tower_job(tower, options) for tower in towers}
    import multiprocessing
    from multiprocessing.connection import wait

    import torch

    context = multiprocessing.get_context("spawn")
    options = {**options, "threads": max(1, torch.get_num_threads() // len(towers))}
    running, results = {}, {}
    finished = False
    try:
        for tower in towers:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_tower_process, args=(tower, options, sender), name=f"toy-{tower}")
            process.start()
            sender.close()  # the child holds the other end: its exit closes the pipe
            running[tower] = (process, receiver)
        while len(results) < len(towers):
            pending = {receiver: tower for tower, (_process, receiver) in running.items() if tower not in results}
            for receiver in wait(list(pending)):
                tower = pending[receiver]
                try:
                    status, payload = receiver.recv()
                except EOFError:
                    process = running[tower][0]
                    process.join()
                    raise RuntimeError(f"the {TOWER_TAGS[tower][1:-1]}'s process ended (exit code {process.exitcode}) "
                                       "without a result") from None
                if status == "error":
                    raise RuntimeError(f"the {TOWER_TAGS[tower][1:-1]}'s process failed:\n{payload}")
                results[tower] = payload
        finished = True
    finally:
        for process, receiver in running.values():
            if not finished and process.is_alive():
                process.terminate()  # a finished one is left to exit by itself (its cleanup frees its locks)
            process.join()
            receiver.close()
    return {tower: results[tower] for tower in towers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/toy", help="where the tables, plots and answers go")
    parser.add_argument("--cache-dir", default=None, help="where the toy model is trained (default .cache/toy/)")
    parser.add_argument("--tower", choices=("both", "clip", "random"), default="both",
                        help="the toy LLaVA's vision tower: contrastively trained (clip), its random initialisation "
                             "(random), or both as two row groups (default)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="towers trained and answered side by side, one process each (default: as many as "
                             "there are towers and CPU cores; 1: one after the other in this process)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per timing (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    parser.add_argument("--tune-steps", type=int, default=100, help="VisionZip‡ projector-tuning steps (0 skips)")
    parser.add_argument("--reanswer", action="store_true", help="regenerate answers kept from earlier runs")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                        help="visual-token budgets per image, comma-separated (default %(default)s)")
    parser.add_argument("--questions", type=int, default=None,
                        help="held-out questions (default: the toy settings', 120); the model is the same")
    parser.add_argument("--text-question", action="store_true",
                        help="the task with a word written in each scene and a fourth question type, \"What word "
                             "is written in the image?\" (other models, trained on those scenes; docs/toy_task.md)")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch_size", "questions", "jobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tune_steps < 0:
        parser.error(f"--tune-steps must be >= 0, got {args.tune_steps}")
    try:
        budgets = tuple(int(b) for b in args.budgets.split(","))
    except ValueError:
        parser.error(f"--budgets must be comma-separated integers, got {args.budgets!r}")
    if not budgets or min(budgets) < 1:
        parser.error(f"--budgets must be positive integers, got {args.budgets!r}")
    # the budget of the per-type table, VisionZip‡, the pictures and the timings: 64 where it is asked
    focus = TIMING_TOKENS if TIMING_TOKENS in budgets else budgets[len(budgets) // 2]
    quiet_libraries()

    from llava.toy import majority_baseline
    from llava.toy.clip import shares_table
    from llava.toy.task import question_types
    from visionzip import registered_methods

    began, cpu_began = time.perf_counter(), time.process_time()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    towers = ("clip", "random") if args.tower == "both" else (args.tower,)
    timing_tower = "random" if "random" in towers else towers[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = min(len(towers), cores) if args.jobs is None else min(args.jobs, len(towers))
    options = {"output": str(output), "cache_dir": args.cache_dir, "questions": args.questions, "budgets": budgets,
               "focus": focus, "tune_steps": args.tune_steps, "batch_size": args.batch_size,
               "reanswer": args.reanswer, "text_question": args.text_question, "repeats": args.repeats,
               # the timings run in the random tower's process, which has no contrastive pre-training and so
               # finishes first (with one tower, in its own)
               "timings_tower": timing_tower}
    from llava.toy import ToySettings

    for tower in towers:  # the settings' checks, before any process starts
        ToySettings(tower=tower, text_question=args.text_question,
                    **({} if args.questions is None else {"eval_images": args.questions}))

    methods = registered_methods()
    how = (f"side by side, one process per tower ({cores} CPU cores)" if jobs > 1 and len(towers) > 1
           else "one after the other")
    say("== 1. The toy models: a tiny LLaVA-1.5 (ViT-L/14-336 geometry) trained on a procedural task, "
        f"on the {' and the '.join(TOWER_TITLES[t] for t in towers)}, and their answers: vanilla and "
        f"{len(methods)} methods ({', '.join(methods)}) at {', '.join(map(str, budgets))} tokens; {how} ==")
    results = run_tower_jobs(towers, options, jobs)
    phase_seconds, phase_cpu = time.perf_counter() - began, time.process_time() - cpu_began
    toys = {tower: result["toy"] for tower, result in results.items()}
    num_questions = results[towers[0]]["questions"]
    majority = majority_baseline(str(toys[towers[0]].annotation_file))
    say(f"held-out set: {num_questions} questions, an equal share each of "
        f"{', '.join(question_types(args.text_question))}; "
        f"majority-answer baseline {majority:.1f} %")

    say("\n== 2. [CLS] attention concentration per tower layer (VisionZip Fig. 2), on 16 held-out images ==")
    concentration = [(TOWER_TITLES[tower], results[tower]["figures"]["shares"]) for tower in towers]
    shares = shares_table(concentration)
    atomic_write_text(output / "cls_attention.md", shares)
    say(shares + f"figure: {plot_concentration(concentration, output / 'cls_attention.png')}")

    say(f"\n== 3. Accuracy against visual tokens: vanilla and {len(methods)} methods ==")
    markdown, groups = "", []
    for tower in towers:
        result = results[tower]
        markdown += (f"\n### {TOWER_TITLES[tower]}\n\n"
                     + markdown_table(result["vanilla"], result["table"], result["reasons"], majority,
                                      num_questions, budgets, result["extra_rows"])
                     + "\nPer question type:\n\n"
                     + by_type_table(result["vanilla"], result["table"], focus, result["extra_scores"]))
        groups.append((TOWER_TITLES[tower], result["vanilla"], result["table"], result["dagger"]))
    atomic_write_text(output / "accuracy_vs_tokens.md", markdown.lstrip())
    plot = plot_accuracy(groups, majority, output / "accuracy_vs_tokens.png", budgets, focus)
    say(markdown)
    say(f"table: {output / 'accuracy_vs_tokens.md'}; plot: {plot}")

    figures = {tower: results[tower]["figures"] for tower in towers}
    pictured = figures[towers[0]]["pictured"]
    missing = [m for m in PICTURED_METHODS if m not in pictured]
    say(f"\n== 4. The visual tokens {', '.join(pictured)} keep at {focus} on a held-out image, per tower ==")
    if missing:
        say(f"  ({', '.join(missing)}: not a registered vision-side method here, so not pictured)")
    shown = figures[towers[0]]
    picture = plot_kept_tokens(shown["image"].resize((shown["image_size"],) * 2),
                               [(tower, figures[tower]["panels"]) for tower in towers],
                               shown["patches_per_side"], focus, output / "kept_tokens.png")
    say(f"figure: {picture}")

    timed = results[timing_tower]
    batch, timings = timed["timings"]["batch"], timed["timings"]["rows"]
    say(f"\n== 5. Answering time at {focus} visual tokens ({TOWER_TITLES[timing_tower]}; a method computes the "
        f"same on either tower): a batch of {batch} questions, median of {args.repeats} interleaved rounds after "
        "a warm-up (range in brackets) ==")
    base = timings[0][1].median
    say(f"{'setting':<16} {'per batch':>10} {'range':>17} {'per question':>13} {'vs vanilla':>11}")
    for spec, m in timings:
        label = f"vanilla ({timed['num_patches']})" if spec == "none" else spec
        say(f"{label:<16} {m.median * 1e3:>8.0f}ms [{min(m.times) * 1e3:>6.0f}-{max(m.times) * 1e3:>6.0f}ms] "
            f"{m.median / batch * 1e3:>11.1f}ms {base / m.median:>10.2f}x")

    say("\n== Ask the toy model yourself: it was trained on each question followed by LLaVA-1.5's short-answer "
        "hint, so give it that prompt, as here ==")
    say(run_llava_command(toys[towers[0]]))
    total, total_cpu = time.perf_counter() - began, time.process_time() - cpu_began
    per_tower = "; ".join(f"{TOWER_TAGS[t][1:-1]} {results[t]['seconds']:.0f} s ({results[t]['cpu_seconds']:.0f} s of CPU)"
                          for t in towers)
    say(f"\nmain job finished in {total:.0f} s: models, answers, figures' data and timings {phase_seconds:.0f} s "
        f"({per_tower}), tables and figures {total - phase_seconds:.0f} s ({total_cpu - phase_cpu:.0f} s of CPU); "
        f"this process {total_cpu:.0f} s of CPU")
    return 0


def _usable(evaluator, spec: str) -> bool:
    try:
        evaluator.set_compression(spec)
    except (ValueError, NotImplementedError):
        return False
    finally:
        evaluator.model.set_visual_compression(None)
    return True


def run_llava_command(toy) -> str:
    """The ``llava.eval.run_llava`` command line that asks the toy model its first held-out question
    exactly as it was trained (the question, a newline, the short-answer hint)."""
    import json

    with open(toy.question_file, encoding="utf-8") as handle:
        record = json.loads(handle.readline())
    return (f"python -m llava.eval.run_llava --model-path {toy.model_path} --image-file "
            f"{toy.image_folder / record['image']} --device cpu --temperature 0 --max_new_tokens 8 "
            f"--query {shlex.quote(record['text'])}")


if __name__ == "__main__":
    sys.exit(main())
