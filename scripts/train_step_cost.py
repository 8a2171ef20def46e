#!/usr/bin/env python
"""Step time and peak memory of projector tuning and full fine-tuning at 576 vs 192/128/64 visual
tokens on CPU (scaled-down model); see llava/train/step_cost.py."""
import sys

from llava.train.step_cost import main

if __name__ == "__main__":
    sys.exit(main())
