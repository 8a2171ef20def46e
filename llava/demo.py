"""The README's main job on the embedded default: the toy study (``llava/toy/study.py``).

    bash scripts/demo.sh [--tower both|clip|random --jobs N --questions N --tune-steps K --text-question ...]
    # = python -m llava.demo

A tiny LLaVA-1.5 in ViT-L/14-336's token geometry (576 patches + CLS) is trained once, on this CPU, the way
LLaVA is: a tower pre-trained contrastively on the scenes' captions (as CLIP is), then stage 1 (projector)
and stage 2 (LLM + projector) through the real training entry point, on a procedural visual task (how many
shapes, which colour, which half, on cluttered backgrounds; docs/toy_task.md); and the same LLaVA on the
tower's random initialisation. Then: the [CLS] attention concentration of both towers (VisionZip Fig. 2),
held-out accuracy against visual tokens for vanilla and every registered method on both towers (tables and
plot), VisionZip‡ (projector-only tuning at 64 tokens), the tokens VisionZip, VisPruner, random and
downsample keep on one image, and answering times (medians after a warm-up, with the range). The two towers'
models are trained and answer side by side, one process each. The trained models and the answers are cached
(``.cache/toy/``, ``outputs/demo/answers/``): later runs take about a minute.
"""
from __future__ import annotations

import sys

from llava.toy.study import main as study_main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in argv):
        argv = ["--output-dir", "outputs/demo", *argv]
    return study_main(argv)


if __name__ == "__main__":
    sys.exit(main())
