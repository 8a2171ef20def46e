"""LLaVA's ``python -m llava.eval.model_vqa_mmbench`` command: the shared engine (``llava.eval.generate``) for MMBench / MMBench-CN tsv files."""
from llava.eval.generate import main

if __name__ == "__main__":
    main(default_format="mmbench", prog="python -m llava.eval.model_vqa_mmbench")
