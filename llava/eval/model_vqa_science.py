"""LLaVA's ``python -m llava.eval.model_vqa_science`` command: the shared engine (``llava.eval.generate``) for ScienceQA's llava_test_CQM-A.json."""
from llava.eval.generate import main

if __name__ == "__main__":
    main(default_format="science", prog="python -m llava.eval.model_vqa_science")
