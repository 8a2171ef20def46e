#!/usr/bin/env python
"""Deterministic 1/10 (or any fraction) subset of a LLaVA data file; see llava/train/subset.py."""
import sys

from llava.train.subset import main

if __name__ == "__main__":
    sys.exit(main())
