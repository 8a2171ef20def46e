"""The benchmarks of the VisionZip tables: how each is generated, scored and shown in a table.

One registry for the generation (question format, answer length), the scoring route (local, an
evaluation server, or an external GPT judge) and the report (column name, paper order, stability).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str  # file / command-line key, e.g. "pope"
    column: str  # the paper's column header, e.g. "POPE"
    question_format: str  # generation reader: vqa | science | mmbench | mmmu
    scoring: str  # "local" (python -m llava.eval.evaluate), "server" or "judge" (recorded with `external`)
    headline: str  # the metric the table shows
    max_new_tokens: int = 128
    in_paper: bool = True  # one of the paper's 11 LLaVA benchmarks
    # GPT-judged scores move by a point or more between judge runs: the report also averages without them.
    unstable: bool = False


# Paper order (Table 1 of VisionZip): GQA, MMB, MME, POPE, SQA, VQAv2, TextVQA, MMMU, SEED, MMVet, LLaVA-B.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("gqa", "GQA", "vqa", "local", "accuracy"),
        Benchmark("mmbench", "MMB", "mmbench", "local", "circular_accuracy"),
        Benchmark("mme", "MME", "vqa", "local", "total"),
        Benchmark("pope", "POPE", "vqa", "local", "f1"),
        Benchmark("sqa", "SQA", "science", "local", "img_accuracy"),
        Benchmark("vqav2", "VQAv2", "vqa", "server", "accuracy"),
        Benchmark("textvqa", "TextVQA", "vqa", "local", "accuracy"),
        Benchmark("mmmu", "MMMU", "mmmu", "local", "accuracy"),
        Benchmark("seed", "SEED", "vqa", "local", "accuracy"),
        Benchmark("mmvet", "MMVet", "vqa", "judge", "score", max_new_tokens=1024, unstable=True),
        Benchmark("llavabench", "LLaVA-B", "vqa", "judge", "relative_score", max_new_tokens=1024, unstable=True),
        Benchmark("mmbench_cn", "MMB-CN", "mmbench", "local", "circular_accuracy", in_paper=False),
        Benchmark("vizwiz", "VizWiz", "vqa", "server", "accuracy", in_paper=False),
    )
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
