"""``python -m llava.toy``: the toy study (llava/toy/study.py)."""
import sys

from .study import main

if __name__ == "__main__":  # the towers' spawned processes never run the study again
    sys.exit(main())
