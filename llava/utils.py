"""Small helpers shared by the LLaVA scripts."""
from __future__ import annotations


def disable_torch_init() -> None:
    """Kept so that scripts written for the original LLaVA run unchanged; it does nothing.

    [VisionZip-LLaVA] the original replaced ``reset_parameters`` of ``torch.nn.Linear`` and
    ``torch.nn.LayerNorm`` globally to speed up model creation. transformers 5 already skips the random
    initialisation of weights that ``from_pretrained`` loads, and we do not patch torch classes globally.
    """
