"""Collect finished results into the paper's table layout (markdown + CSV) and plot score vs. token budget.

    python -m llava.eval.report --results-dir playground/data/eval/results --out-dir reports

Results are the json files ``llava.eval.evaluate`` writes, at
``<results-dir>/<model>/<method>/<budget>/<benchmark>.json`` (the eval scripts' layout). For each model:
one row per (method, budget), the vanilla row (method ``none``) first; each cell is the absolute score and
its percentage of the vanilla score; ``Avg`` is the mean of those percentages (the paper's average), and
a second average leaves out the unstable (GPT-judged) benchmarks. Where the paper reports an average for
the same setting it is shown beside ours.
"""
from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from visionzip.budgets import budget_family

from .benchmarks import BENCHMARKS, get_benchmark
from .budgets import VANILLA_LABEL
from .data_io import read_json

VANILLA_METHODS = frozenset({"none"})


def method_display_name(method: str) -> str:
    """A method's name for tables: its settings class's ``display_name`` (``Vanilla`` for none)."""
    if method in VANILLA_METHODS:
        return "Vanilla"
    from visionzip import get_method, registered_methods

    return (get_method(method).display_name or method) if method in registered_methods() else method

# Averages relative to vanilla reported by the papers (VisionZip arXiv 2412.04467 Tables 1-2, VisPruner arXiv 2412.01818 Table 1), keyed by
# (family, method, total visual tokens). VisPruner's are over 10 benchmarks, VisionZip's over 11.
PAPER_AVERAGES = {
    ("v1.5", "visionzip", 192): 98.5,
    ("v1.5", "visionzip", 128): 97.6,
    ("v1.5", "visionzip", 64): 94.0,
    ("v1.6", "visionzip", 640): 97.6,
    ("v1.6", "visionzip", 320): 95.0,
    ("v1.6", "visionzip", 160): 92.0,
    ("v1.5", "vispruner", 128): 99.6,
    ("v1.5", "vispruner", 64): 96.6,
    ("v1.5", "vispruner", 32): 91.5,
}


@dataclass
class Row:
    model: str
    method: str
    budget: str  # folder name: "64", "54-10", "full"
    visual_tokens: int | None
    family: str | None
    scores: dict[str, float] = field(default_factory=dict)
    relative: dict[str, float] = field(default_factory=dict)

    @property
    def is_vanilla(self) -> bool:
        return self.method in VANILLA_METHODS

    @property
    def label(self) -> str:
        return method_display_name(self.method)


def _tokens_from(budget: str, generation: dict | None) -> tuple[int | None, str | None]:
    family = (generation or {}).get("budget_family")
    tokens = (generation or {}).get("visual_tokens")
    if tokens is None:
        if budget == VANILLA_LABEL:
            tokens = budget_family(family or "v1.5").vanilla_tokens
        elif budget.isdigit():
            tokens = int(budget)
        elif "-" in budget and all(p.isdigit() for p in budget.split("-")):
            crops = budget_family(family or "v1.5").views
            tokens = crops * sum(int(p) for p in budget.split("-"))
    return tokens, family


def collect(results_dir, metric_overrides: dict[str, str] | None = None,
            vanilla_of: dict[str, str] | None = None) -> dict[str, list[Row]]:
    """{model: [Row]} from ``<results_dir>/<model>/<method>/<budget>/<benchmark>.json``.

    Percentages are relative to the model's own vanilla row, or for a model named in ``vanilla_of``
    ({model: reference model}) to the reference's vanilla row: a projector-tuned checkpoint
    (VisionZip‡) is compared with the original model, as in the paper."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist")
    metric_overrides = metric_overrides or {}
    rows: dict[tuple[str, str, str], Row] = {}
    for path in sorted(results_dir.glob("*/*/*/*.json")):
        model, method, budget = path.parts[-4:-1]
        benchmark = path.stem
        if benchmark not in BENCHMARKS or path.name.endswith(".settings.json"):
            continue
        result = read_json(path)
        metric = metric_overrides.get(benchmark)
        if metric is None:
            score = result.get("score")
        elif metric in result.get("metrics", {}):
            score = result["metrics"][metric]
        else:
            raise ValueError(f"{path} has no metric {metric!r}; it has {sorted(result.get('metrics', {}))}")
        if not isinstance(score, (int, float)) or math.isnan(score):
            raise ValueError(f"{path}: score {score!r} is not a number")
        key = (model, method, budget)
        if key not in rows:
            tokens, family = _tokens_from(budget, result.get("generation"))
            rows[key] = Row(model, method, budget, tokens, family)
        row = rows[key]
        row.scores[benchmark] = float(score)
        if row.family is None and result.get("generation"):
            row.family = result["generation"].get("budget_family")
    by_model: dict[str, list[Row]] = {}
    for row in rows.values():
        by_model.setdefault(row.model, []).append(row)
    vanilla_of = vanilla_of or {}
    for model, reference in vanilla_of.items():
        for name in (model, reference):
            if name not in by_model:
                raise ValueError(f"no results for model {name!r} in {results_dir}; found {sorted(by_model)}")
    for model, model_rows in by_model.items():
        family = next((r.family for r in model_rows if r.family), None)
        for r in model_rows:
            r.family = r.family or family
        reference_rows = by_model[vanilla_of.get(model, model)]
        vanilla = next((r for r in reference_rows if r.is_vanilla), None)
        for r in model_rows:
            if vanilla is not None:
                r.relative = {b: 100.0 * s / vanilla.scores[b] for b, s in r.scores.items()
                              if vanilla.scores.get(b)}
        model_rows.sort(key=lambda r: (not r.is_vanilla, -(r.visual_tokens or 0), r.method, r.budget))
    return by_model


def average(row: Row, benchmarks: list[str]) -> tuple[float | None, int]:
    values = [row.relative[b] for b in benchmarks if b in row.relative]
    return (sum(values) / len(values) if values else None), len(values)


def paper_average(row: Row) -> float | None:
    if row.is_vanilla:
        return 100.0
    return PAPER_AVERAGES.get((row.family, row.method, row.visual_tokens))


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def table_columns(rows: list[Row], wanted: list[str] | None) -> list[str]:
    present = {b for r in rows for b in r.scores}
    order = [b for b in BENCHMARKS if b in present] if wanted is None else wanted
    return order


def markdown_table(model: str, rows: list[Row], columns: list[str], unstable: set[str],
                   reference: str | None = None) -> str:
    stable = [b for b in columns if b not in unstable]
    head = ["Method", "Tokens", *(get_benchmark(b).column for b in columns), "Avg"]
    if unstable & set(columns):
        head.append("Avg w/o " + ", ".join(get_benchmark(b).column for b in columns if b in unstable))
    head.append("Paper Avg")
    title = f"### {model}" + (f" (percentages of {reference}'s vanilla scores)" if reference else "")
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label, str(row.visual_tokens or row.budget)]
        for b in columns:
            if b not in row.scores:
                cells.append("–")
            elif b in row.relative and not row.is_vanilla:
                cells.append(f"{row.scores[b]:.1f} ({row.relative[b]:.1f}%)")
            else:
                cells.append(f"{row.scores[b]:.1f}")
        avg, n = average(row, columns)
        cells.append(_fmt(avg, suffix="%") + ("" if n == len(columns) or avg is None else f" ({n}/{len(columns)})"))
        if unstable & set(columns):
            avg_s, n_s = average(row, stable)
            cells.append(_fmt(avg_s, suffix="%") + ("" if n_s == len(stable) or avg_s is None
                                                   else f" ({n_s}/{len(stable)})"))
        cells.append(_fmt(paper_average(row), suffix="%"))
        lines.append("| " + " | ".join(cells) + " |")
    if reference is None and not any(r.is_vanilla for r in rows):
        lines += ["", "No vanilla (method `none`) results: percentages need them (or use --vanilla-of)."]
    return "\n".join(lines)


def write_csv(path: Path, by_model: dict[str, list[Row]], columns_of: dict[str, list[str]], unstable: set[str]) -> None:
    all_columns = [b for b in BENCHMARKS if any(b in cols for cols in columns_of.values())]
    header = ["model", "method", "budget", "visual_tokens", "family"]
    for b in all_columns:
        header += [b, f"{b}_rel"]
    header += ["avg_rel", "avg_rel_stable", "num_benchmarks", "paper_avg_rel"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for model, rows in by_model.items():
            columns = columns_of[model]
            stable = [b for b in columns if b not in unstable]
            for row in rows:
                values = [model, row.method, row.budget, row.visual_tokens, row.family or ""]
                for b in all_columns:
                    values += [_round(row.scores.get(b)), _round(row.relative.get(b))]
                avg, n = average(row, columns)
                avg_s, _ = average(row, stable)
                values += [_round(avg), _round(avg_s), n, _round(paper_average(row))]
                writer.writerow(values)


def _round(value):
    return "" if value is None else round(value, 3)


def plot(path: Path, model: str, rows: list[Row], columns: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(columns), 1)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    vanilla = next((r for r in rows if r.is_vanilla), None)
    methods = sorted({r.method for r in rows if not r.is_vanilla})
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    for ax, b in zip(axes.flat, columns):
        for method in methods:
            points = sorted((r.visual_tokens, r.scores[b]) for r in by_method[method]
                            if b in r.scores and r.visual_tokens)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=method_display_name(method))
        if vanilla is not None and b in vanilla.scores:
            ax.axhline(vanilla.scores[b], color="gray", linestyle="--", linewidth=1,
                       label=f"Vanilla ({vanilla.visual_tokens} tokens)")
        ax.set_title(get_benchmark(b).column)
        ax.set_xlabel("visual tokens")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"{model}: score vs. visual token budget")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_report(results_dir, out_dir, models: list[str] | None = None, benchmarks: list[str] | None = None,
                 unstable: list[str] | None = None, metric_overrides: dict[str, str] | None = None,
                 make_plot: bool = True, vanilla_of: dict[str, str] | None = None) -> dict:
    """Write ``report.md``, ``report.csv`` and ``<model>_score_vs_tokens.png`` into ``out_dir``."""
    for b in list(benchmarks or []) + list(unstable or []) + list(metric_overrides or {}):
        get_benchmark(b)
    by_model = collect(results_dir, metric_overrides, vanilla_of)
    if models:
        missing = [m for m in models if m not in by_model]
        if missing:
            raise ValueError(f"no results for model(s) {missing} in {results_dir}; found {sorted(by_model)}")
        by_model = {m: by_model[m] for m in models}
    if not by_model:
        raise ValueError(f"no results found under {results_dir} (<model>/<method>/<budget>/<benchmark>.json)")
    unstable_set = set(unstable) if unstable is not None else {b.name for b in BENCHMARKS.values() if b.unstable}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns_of = {m: table_columns(rows, benchmarks) for m, rows in by_model.items()}
    sections = [markdown_table(m, rows, columns_of[m], unstable_set, (vanilla_of or {}).get(m))
                for m, rows in by_model.items()]
    note = ("Cells: score (percent of the vanilla score). Avg: mean of those percentages; "
            "(k/n) marks an average over the k benchmarks available of n. Paper Avg: the paper's average "
            "for the same method and budget on the 7B model (VisionZip: 11 benchmarks, VisPruner: 10).")
    markdown = "# Results\n\n" + note + "\n\n" + "\n\n".join(sections) + "\n"
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    write_csv(out_dir / "report.csv", by_model, columns_of, unstable_set)
    plots = []
    if make_plot:
        for model, rows in by_model.items():
            safe = model.replace("/", "_")
            plots.append(plot(out_dir / f"{safe}_score_vs_tokens.png", model, rows, columns_of[model]))
    return {"markdown": markdown, "rows": by_model, "plots": plots,
            "files": [out_dir / "report.md", out_dir / "report.csv", *plots]}


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="playground/data/eval/results")
    parser.add_argument("--out-dir", default="reports")
    parser.add_argument("--model", action="append", help="model folder(s) to report (default: all)")
    parser.add_argument("--benchmarks", help="comma-separated columns, in order (default: all found, paper order)")
    parser.add_argument("--unstable", help="comma-separated benchmarks left out of the second average "
                                           "(default: the GPT-judged mmvet,llavabench); '' for none")
    parser.add_argument("--metric", action="append", default=[],
                        help="benchmark:metric to show instead of the headline, e.g. sqa:accuracy")
    parser.add_argument("--vanilla-of", action="append", default=[],
                        help="MODEL=REFERENCE: percentages of MODEL relative to REFERENCE's vanilla row "
                             "(e.g. a projector-tuned VisionZip‡ checkpoint vs. the original model)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.metric:
        bench, sep, metric = item.partition(":")
        if not sep or not metric:
            parser.error(f"--metric wants benchmark:metric, got {item!r}")
        overrides[bench] = metric
    vanilla_of = {}
    for item in args.vanilla_of:
        model, sep, reference = item.partition("=")
        if not sep or not model or not reference:
            parser.error(f"--vanilla-of wants MODEL=REFERENCE, got {item!r}")
        vanilla_of[model] = reference
    try:
        report = build_report(args.results_dir, args.out_dir, args.model, _csv_list(args.benchmarks),
                              _csv_list(args.unstable), overrides, not args.no_plot, vanilla_of)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(report["markdown"])
    print("wrote " + ", ".join(str(p) for p in report["files"]))
    return report


if __name__ == "__main__":
    main()
