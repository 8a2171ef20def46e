"""Benchmark evaluation: answer generation, local scorers, submission converters and the paper-table report.

Entry points: ``python -m llava.eval.generate`` (and LLaVA's ``model_vqa_*`` names), ``llava.eval.evaluate``,
``llava.eval.convert``, ``llava.eval.merge_answers``, ``llava.eval.report``, ``llava.eval.budgets``,
``llava.eval.mini_benchmark``; see ``docs/evaluation.md``.
"""
