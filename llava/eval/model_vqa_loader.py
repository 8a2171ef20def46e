"""LLaVA's ``python -m llava.eval.model_vqa_loader`` command: the shared engine (``llava.eval.generate``) for jsonl VQA questions (GQA, TextVQA, POPE, MME, VQAv2, VizWiz, SEED)."""
from llava.eval.generate import main

if __name__ == "__main__":
    main(default_format="vqa", prog="python -m llava.eval.model_vqa_loader")
