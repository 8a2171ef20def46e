"""LLaVA's ``python -m llava.eval.model_vqa`` command: the shared engine (``llava.eval.generate``) for free-form jsonl questions (MM-Vet, LLaVA-Bench): answers up to 1024 tokens."""
from llava.eval.generate import main

if __name__ == "__main__":
    main(default_format="vqa", default_max_new_tokens=1024, prog="python -m llava.eval.model_vqa")
