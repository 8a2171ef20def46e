"""A procedural visual task and a tiny LLaVA trained on it on a CPU (docs/toy_task.md).

- ``llava.toy.task``: scenes drawn in code, questions with exact one-word answers, LLaVA's training
  format and eval question format, and the majority-answer baseline;
- ``llava.toy.clip``: the tower trained the way CLIP is (contrastive image-text pre-training on the scenes'
  captions) and the [CLS] attention concentration per layer (VisionZip Fig. 2);
- ``llava.toy.model``: ``prepare_toy(ToySettings(...))`` trains the tiny LLaVA once (tower, stage 1, stage 2
  through ``llava.train.train``) and caches it under ``.cache/toy/<settings hash>/``;
- ``llava.toy.evaluate``: accuracy of that model for any compression spec, through the eval engine
  (``llava.eval.generate``) and the GQA exact-match scorer (``llava.eval.scoring.score_gqa``).
"""
from .model import ToyModel, ToySettings, prepare_toy
from .task import QUESTION_TYPES, majority_baseline, make_scene, write_eval_set, write_train_set

__all__ = ["QUESTION_TYPES", "ToyModel", "ToySettings", "majority_baseline", "make_scene", "prepare_toy",
           "write_eval_set", "write_train_set"]
