"""Installable package for the VisionZip research codebase (LLaVA stack + visual-token compression).

The distribution is called ``visionzip-llava``: ``visionzip`` on PyPI is the official package
(its 0.1.3 wheel ships no code) and ``llava-torch`` is the original LLaVA; we must not shadow either.
"""
from setuptools import find_packages, setup

setup(
    name="visionzip-llava",
    version="0.1.0",
    description="VisionZip and VisPruner visual-token compression on a modern LLaVA training stack",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llava", "llava.*", "visionzip", "visionzip.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24",  # oldest version the suite was run against (the `cache=` keyword, see docs/architecture.md)
        "accelerate>=1.0",
        "safetensors",
        "sentencepiece",
        "protobuf",
        "tokenizers",
        "pillow",
        "numpy",
        "tqdm",
        "matplotlib",
        "psutil",
    ],
    extras_require={
        "train": ["deepspeed>=0.15", "wandb", "peft>=0.13", "bitsandbytes>=0.45"],
        "dev": ["pytest", "pytest-xdist", "ruff"],  # scripts/test.sh runs the suite on 2 workers
        "flash": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "visionzip-demo=visionzip.demo:main",
        ],
        # lmms-eval (>= 0.7) registers models from this group: --model visionzip_llava / visionzip_hf
        "lmms_eval.models": [
            "visionzip = llava.lmms_eval_plugin:manifests",
        ],
        # vLLM loads these in every process it starts: registers the compressed model classes (docs/serving.md)
        "vllm.general_plugins": [
            "visionzip = visionzip.vllm:register",
        ],
    },
)
