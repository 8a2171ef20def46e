#!/usr/bin/env python
"""Step time and peak memory of projector tuning and full fine-tuning at 576 vs 192/128/64 visual
tokens on CPU (scaled-down model); see llava/train/bench.py."""
import sys

from llava.train.bench import main

if __name__ == "__main__":
    sys.exit(main())
