"""The toy study, the README's main job: a tiny LLaVA trained on the procedural task, and its accuracy
against visual tokens per method.

    python -m llava.toy [--questions 60 --tune-steps 8]        # bash scripts/demo.sh runs this

1. The toy model (``llava.toy``, docs/toy_task.md): a tiny LLaVA-1.5 in the real ViT-L/14-336 token
   geometry (576 patches + CLS; a narrow, shallow tower) trained on a procedural visual task (shapes on
   cluttered backgrounds; "How many shapes are there?", "What colour is the shape?", "Is the shape in the
   top or the bottom half?") through the real
   training entry point; trained once, then reused from ``.cache/toy/``.
2. Accuracy against visual tokens: held-out questions answered by the eval engine
   (``llava.eval.generate``) and scored by exact match (``llava.eval.scoring.score_gqa``), vanilla (576)
   and every registered method at 192 / 128 / 64 / 32 / 16 tokens (``METHOD:TOKENS``; a budget the method
   cannot take is shown as n/a with its reason): a markdown table and ``accuracy_vs_tokens.png``.
3. The kept tokens of VisionZip and VisPruner on one of the held-out images (``visionzip_tokens.png``).
4. VisionZip‡ in miniature: the projector alone tuned with VisionZip 64 in the forward, through the
   same entry point, and its accuracy at 64 tokens against the training-free VisionZip 64.
5. Answering time per question at 64 tokens: medians over interleaved repeats after a warm-up, with
   the range.

Answers are kept under ``<output-dir>/answers/<toy model>-<held-out set>-code<hash>/`` and reused by later
runs of the same code (the hash covers the methods, the model and the eval engine: changed code answers
afresh); ``--reanswer`` regenerates them anyway.
"""
from __future__ import annotations

import argparse
import logging
import os
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


# ------------------------------------------------------------------------------------------- accuracy
def accuracy_rows(evaluator, methods: list[str], budgets=BUDGETS, printer=say) -> tuple[dict, dict, dict]:
    """Accuracy (%) per method and budget. Returns (vanilla score, {method: {tokens: ToyScore | None}},
    {method: reason a budget is n/a}). A method that refuses a budget (ValueError from its settings or
    the tower's check) gets None there and its reason."""
    start = time.perf_counter()
    vanilla = evaluator.evaluate("none", label="vanilla")
    printer(f"  vanilla ({vanilla.visual_tokens} tokens): {vanilla.accuracy:.1f} %  [{time.perf_counter() - start:.0f} s]")
    table: dict[str, dict] = {}
    reasons: dict[str, str] = {}
    for method in methods:
        start = time.perf_counter()
        row = {}
        for tokens in budgets:
            try:  # the method's and the model's checks: a budget it cannot take is n/a, with the reason
                evaluator.set_compression(f"{method}:{tokens}")
            except (ValueError, NotImplementedError) as err:
                row[tokens] = None
                reasons.setdefault(method, f"{method}:{tokens}: {err}")
            else:  # anything failing from here on is an error, not a refused budget
                row[tokens] = evaluator.evaluate(f"{method}:{tokens}")
        table[method] = row
        cells = " ".join(f"{t}:{'n/a' if s is None else f'{s.accuracy:.1f}'}" for t, s in row.items())
        printer(f"  {method:<10} {cells}  [{time.perf_counter() - start:.0f} s]")
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


def plot_accuracy(vanilla, table: dict, majority: float, path: Path, budgets=BUDGETS, dagger=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    ticks = sorted((*budgets, vanilla.visual_tokens))
    ax.axhline(vanilla.accuracy, color="black", linestyle="--", linewidth=1,
               label=f"vanilla ({vanilla.visual_tokens} tokens)")
    ax.axhline(majority, color="grey", linestyle=":", linewidth=1, label="majority answer (no image)")
    for method, row in table.items():
        points = [(t, s.accuracy) for t, s in sorted(row.items()) if s is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=method)
    if dagger is not None:
        ax.plot([TIMING_TOKENS], [dagger], marker="*", markersize=14, linestyle="none", color="crimson",
                label="VisionZip‡ (projector tuned at 64)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Toy LLaVA: accuracy against visual tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not over them
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:  # a complete plot or none under that name
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------- timings
def timing_rows(evaluator, specs: list[str], batch_size: int, repeats: int) -> list[tuple[str, object]]:
    """Answering time of one batch of held-out questions per spec, interleaved across specs (so that the
    load of a shared machine hits them alike): ``warmup`` 1, then ``repeats`` timed rounds."""
    from visionzip.profiling import measure_interleaved

    batch = evaluator.items[:batch_size]
    calls = {}
    for spec in specs:
        def call(spec=spec):
            evaluator.set_compression(spec)
            evaluator.answerer(batch)
        calls[spec] = call
    results = measure_interleaved(calls, repeats=repeats, warmup=1)
    evaluator.model.set_visual_compression(None)
    return [(spec, results[spec]) for spec in specs]


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/toy", help="where the tables, plots and answers go")
    parser.add_argument("--cache-dir", default=None, help="where the toy model is trained (default .cache/toy/)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per timing (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    parser.add_argument("--tune-steps", type=int, default=100, help="VisionZip‡ projector-tuning steps (0 skips)")
    parser.add_argument("--reanswer", action="store_true", help="regenerate answers kept from earlier runs")
    parser.add_argument("--questions", type=int, default=None,
                        help="held-out questions (default: the toy settings', 240); the model is the same")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch_size", "questions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tune_steps < 0:
        parser.error(f"--tune-steps must be >= 0, got {args.tune_steps}")
    quiet_libraries()

    import torch

    from llava.toy import QUESTION_TYPES, ToySettings, majority_baseline, prepare_toy
    from llava.toy.evaluate import ToyEvaluator
    from llava.toy.model import tune_projector
    from visionzip import registered_methods
    from visionzip.demo import compression_demo

    began = time.perf_counter()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    say("== 1. The toy model: a tiny LLaVA-1.5 (ViT-L/14-336 geometry) trained on a procedural task ==")
    settings = ToySettings() if args.questions is None else ToySettings(eval_images=args.questions)
    toy = prepare_toy(settings, cache_root=args.cache_dir, printer=say)
    s = toy.settings
    how = "reused from an earlier run" if toy.cached else "trained now"
    say(f"model {toy.model_path} ({how}; training took {toy.train_seconds:.0f} s): {s.train_images} scenes x "
        f"{s.epochs} epoch(s), batch {s.batch_size}, loss {loss_span(toy.train_losses)}")
    answers_dir = output / "answers" / f"{toy.folder.name}-{toy.question_file.parent.name}-code{answering_code_key()}"
    if args.reanswer and answers_dir.exists():
        shutil.rmtree(answers_dir)
    reused = len(list(answers_dir.glob("*.jsonl"))) if answers_dir.exists() else 0
    evaluator = ToyEvaluator(toy, answers_dir, batch_size=args.batch_size)
    majority = majority_baseline(str(toy.annotation_file))
    say(f"held-out set: {len(evaluator.items)} questions, an equal share each of {', '.join(QUESTION_TYPES)}; "
        f"majority-answer baseline {majority:.1f} %")

    methods = registered_methods()
    say(f"\n== 2. Accuracy against visual tokens: vanilla and {len(methods)} methods "
        f"({', '.join(methods)}) ==")
    if reused:
        say(f"  ({reused} answer files from earlier runs in {answers_dir} are reused; --reanswer regenerates them)")
    vanilla, table, reasons = accuracy_rows(evaluator, methods)

    dagger_accuracy = None
    extra_rows, extra_scores = [], []
    if args.tune_steps:
        say(f"\n== 3. VisionZip‡: projector-only tuning with VisionZip {TIMING_TOKENS} in the forward ==")
        tuning = tune_projector(toy, f"visionzip:{TIMING_TOKENS}", steps=args.tune_steps, printer=say)
        tuned = ToyEvaluator(toy, answers_dir / f"visionzip-dagger-{tuning.run_dir.name}", batch_size=args.batch_size,
                             model_path=tuning.run_dir, model_base=toy.model_path)
        score = tuned.evaluate(f"visionzip:{TIMING_TOKENS}")
        before = table.get("visionzip", {}).get(TIMING_TOKENS)
        dagger_accuracy = score.accuracy
        gain = f"{score.accuracy - before.accuracy:+.1f} points" if before is not None else "n/a"
        say(f"  {tuning.steps} steps ({'reused' if tuning.cached else f'{tuning.seconds:.0f} s'}), loss "
            f"{loss_span(tuning.losses)}; accuracy at {TIMING_TOKENS} tokens: VisionZip "
            f"{before.accuracy if before else float('nan'):.1f} % -> VisionZip‡ {score.accuracy:.1f} % ({gain})")
        extra_rows.append(("visionzip‡ (projector tuned at 64)", {TIMING_TOKENS: f"{score.accuracy:.1f}"}))
        extra_scores.append(("visionzip‡", score))
        del tuned

    markdown = markdown_table(vanilla, table, reasons, majority, len(evaluator.items), extra_rows=extra_rows)
    markdown += "\nPer question type:\n\n" + by_type_table(vanilla, table, extra=extra_scores)
    atomic_write_text(output / "accuracy_vs_tokens.md", markdown)
    plot = plot_accuracy(vanilla, table, majority, output / "accuracy_vs_tokens.png", dagger=dagger_accuracy)
    say("\n" + markdown)
    say(f"table: {output / 'accuracy_vs_tokens.md'}; plot: {plot}")

    say("\n== 4. The visual tokens VisionZip and VisPruner keep on a held-out image (the toy model's tower) ==")
    image = evaluator.items[0].load_image()
    tower = evaluator.model.get_vision_tower()
    compression_demo(tower.vision_tower, tower.image_processor, image, output / "visionzip_tokens.png",
                     repeats=args.repeats)

    usable = [m for m in methods if table[m].get(TIMING_TOKENS) is not None]
    specs = ["none"] + [f"{m}:{TIMING_TOKENS}" for m in usable]
    batch = min(8, len(evaluator.items))
    say(f"\n== 5. Answering time at {TIMING_TOKENS} visual tokens: a batch of {batch} questions, median of "
        f"{args.repeats} interleaved rounds after a warm-up (range in brackets) ==")
    with torch.inference_mode():
        rows = timing_rows(evaluator, specs, batch, args.repeats)
    base = rows[0][1].median
    say(f"{'setting':<16} {'per batch':>10} {'range':>17} {'per question':>13} {'vs vanilla':>11}")
    for spec, m in rows:
        label = f"vanilla ({evaluator.num_patches})" if spec == "none" else spec
        say(f"{label:<16} {m.median * 1e3:>8.0f}ms [{min(m.times) * 1e3:>6.0f}-{max(m.times) * 1e3:>6.0f}ms] "
            f"{m.median / batch * 1e3:>11.1f}ms {base / m.median:>10.2f}x")
    say(f"\nmain job finished in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
