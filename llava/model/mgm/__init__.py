"""Mini-Gemini (MGM) pieces for ``llava.model.language_model.mgm_llama``: the HR ConvNeXt tower, patch-info
mining, the LR / HR inputs, the official-forward re-enactment and the tiny checkpoint builder (docs/mgm.md)."""
