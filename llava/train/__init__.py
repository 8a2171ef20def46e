"""Training LLaVA with compressed visual tokens (VisionZip efficient tuning and full fine-tuning).

Entry point: ``python -m llava.train.train`` (see docs/training.md). Building blocks: ``arguments``
(command line), ``preprocess`` (conversation -> ids and labels), ``dataset`` (lazy LLaVA-665k data and
collator), ``sampler`` (modality-grouped batches), ``trainer`` (``LlavaTrainer``), ``checkpointing``
(resume / refuse / save), ``subset`` (deterministic 1/10 subset), ``quick`` (seconds-long demo run),
``bench`` (step time and memory per visual-token budget).
"""
