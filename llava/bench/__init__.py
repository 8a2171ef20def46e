"""``python -m llava.bench``: where the time and memory of a LLaVA request go, per visual-token
compression method and budget, with ratios to vanilla and to the official VisionZip path (see cli.py)."""
from .geometry import GEOMETRIES, Geometry, get_geometry, kv_cache_bytes, llm_layer_flops, llm_prefill_flops

__all__ = ["GEOMETRIES", "Geometry", "get_geometry", "kv_cache_bytes", "llm_layer_flops", "llm_prefill_flops", "main"]


def main(argv=None) -> dict:
    from .cli import main as cli_main

    return cli_main(argv)
