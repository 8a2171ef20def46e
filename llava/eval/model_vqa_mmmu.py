"""LLaVA's ``python -m llava.eval.model_vqa_mmmu`` command: the shared engine (``llava.eval.generate``) for the MMMU jsonl written by llava.eval.prepare_mmmu."""
from llava.eval.generate import main

if __name__ == "__main__":
    main(default_format="mmmu", prog="python -m llava.eval.model_vqa_mmmu")
