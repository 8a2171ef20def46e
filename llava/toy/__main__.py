"""``python -m llava.toy``: the toy study (llava/toy/study.py)."""
import sys

from .study import main

sys.exit(main())
