"""``python -m llava.train.train`` for the two-process DeepSpeed tests (tests/test_train_deepspeed.py), with
DeepSpeed's shared-memory all-reduce op marked unavailable, so that its collectives go through gloo.

Why: on its CPU accelerator DeepSpeed JIT-compiles that C++ op (``deepspeed_shm_comm``) when its torch
backend starts, about 95 CPU-s on every fresh checkout (the build command holds the venv's paths, so torch's
extension cache does not carry over between clones): a sixth of the suite's time. Runs on GPUs never build
it (NCCL), and DeepSpeed itself takes gloo where the op is not compatible (non-Linux platforms). DeepSpeed
keeps its compatibility table in one module-level dict and documents that edits to it persist
(``deepspeed/ops/__init__.py``); nothing else is changed, the training entry point then runs as ``__main__``.
"""
import runpy

import deepspeed.ops

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
runpy.run_module("llava.train.train", run_name="__main__", alter_sys=True)
