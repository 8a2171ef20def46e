"""Guards on code copied from transformers: each copy names the upstream function and a hash of its code.

Where our code re-implements a piece of transformers (a decoder layer loop, an attention forward, a model's
``__init__``), the copy goes stale silently when transformers changes that function. Every such block is
marked where it is written:

.. code-block:: python

    # Copied from transformers v5.25.0, models/llama/modeling_llama.py, LlamaModel.forward: the layer loop
    @copied_from("transformers.models.llama.modeling_llama.LlamaModel.forward", sha="3f2c...", version="5.25.0")
    def pruned_forward(...):

The comment is for the reader; the decorator is the guard. ``tests/test_copied_code.py`` finds every
``copied_from`` in ``visionzip/`` and ``llava/`` (statically, without importing the module that holds it),
hashes the installed transformers' function with ``upstream_sha`` and fails, naming the block and the
upstream function, when the hash differs: re-read the upstream change, carry it over where it matters,
then update ``sha`` and ``version``. ``python -m visionzip.copied DOTTED.PATH`` prints the current hash.

The hash covers the function's code, not its formatting: the normalised AST of ``inspect.getsource``
(decorators included, docstrings dropped, comments and layout ignored by the parser).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

SHA_LENGTH = 16


@dataclass(frozen=True)
class CopiedBlock:
    """One guarded copy. where: ``module.qualname`` of our copy; upstream: dotted path of the copied function;
    sha: ``upstream_sha(upstream)`` when the copy was made; version: transformers' version then."""

    where: str
    upstream: str
    sha: str
    version: str


# every copy whose module has been imported (the test finds them statically; this is for inspection)
COPIED_BLOCKS: list[CopiedBlock] = []


def resolve(path: str):
    """The object at a dotted path such as ``transformers.models.llama.modeling_llama.LlamaModel.forward``:
    the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for index, name in enumerate(parts[split:], start=split):
            if not hasattr(obj, name):
                raise ValueError(f"{path!r}: {'.'.join(parts[:index])} has no attribute {name!r}")
            obj = getattr(obj, name)
        return obj
    raise ValueError(f"{path!r}: no importable module prefix")


def _drop_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def source_sha(source: str) -> str:
    """The hash of a function's source: sha256 of its AST dump without docstrings, first SHA_LENGTH hex digits."""
    tree = _drop_docstrings(ast.parse(textwrap.dedent(source)))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:SHA_LENGTH]


def upstream_sha(path: str) -> str:
    """The hash of the installed code at ``path`` (a function, method or class)."""
    return source_sha(inspect.getsource(resolve(path)))


def copied_from(upstream: str, sha: str, version: str) -> Callable:
    """Mark a function (or class) as holding a copy of ``upstream`` whose hash was ``sha`` in transformers
    ``version``. Stack it for a block that copies several functions. The object is returned unchanged."""
    if not upstream.startswith("transformers.") or len(sha) != SHA_LENGTH:
        raise ValueError(
            f"copied_from needs a transformers dotted path and a {SHA_LENGTH}-digit sha, got {upstream!r}, {sha!r}"
        )

    def mark(obj):
        COPIED_BLOCKS.append(CopiedBlock(f"{obj.__module__}.{obj.__qualname__}", upstream, sha, version))
        return obj

    return mark


if __name__ == "__main__":  # pragma: no cover - a helper for whoever updates a guard
    import transformers

    for dotted in sys.argv[1:]:
        print(f'copied_from("{dotted}", sha="{upstream_sha(dotted)}", version="{transformers.__version__}")')
