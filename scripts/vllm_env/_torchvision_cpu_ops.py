"""Installed into the vLLM environment only (scripts/setup_vllm_env.sh), where the package index offers no
CPU torchvision: PyPI's Linux torchvision wheels are CUDA builds, whose ``_C.so`` does not load against a CPU
torch. torchvision then runs without its C++ ops (``_has_ops()`` is False; vLLM's LLaVA path uses only its
pure-torch transforms), except that its import registers fake kernels for ``torchvision::nms`` / ``qnms``,
which raises when the C++ library did not define them. This import hook defines those two schemas (no
kernels: calling them still fails) just before torchvision is imported, and only when its ``_C`` cannot load.
With a CPU torchvision (``download.pytorch.org/whl/cpu``, vLLM's documented CPU install) it does nothing.
"""
import importlib.abc
import sys

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class _DefineMissingOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import glob
        import os
        from importlib.util import find_spec

        import torch

        spec = find_spec("torchvision")
        libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) if spec else []
        try:
            for library in libraries:
                torch.ops.load_library(library)
            loaded = bool(libraries)
        except OSError:
            loaded = False
        if not loaded:
            library = torch.library.Library("torchvision", "FRAGMENT")
            for schema in SCHEMAS:
                library.define(schema)
            _DefineMissingOps.library = library  # a Library unregisters its definitions when collected
        return None


sys.meta_path.insert(0, _DefineMissingOps())
