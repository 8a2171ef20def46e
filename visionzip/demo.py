"""The compression part of the main job: VisionZip and VisPruner on one image at the paper's budgets.

``python -m visionzip.demo`` builds (once, deterministically) a tiny CLIP in the real ViT-L/14-336 geometry
(336 px, patch 14, 24 layers, 577 tokens; narrow width, random weights), draws a test image, prints the
visual-token counts with the measured time and memory of each method, and writes a PNG that marks the
dominant and contextual tokens on the image. ``llava.demo`` runs the same on the tiny LLaVA's tower.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .encoders import encoder_adapter
from .methods.visionzip import VISIONZIP_BUDGETS, zip_vision_tokens
from .methods.vispruner import vispruner_select
from .profiling import measure

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_cache_dir() -> Path:
    return Path(os.environ.get("VISIONZIP_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def build_tiny_clip(path: Path | str, seed: int = 0, hidden_size: int = 64, heads: int = 4):
    """A CLIPVisionModel in ViT-L/14-336 geometry with a small width, saved (with its image processor)
    to ``path`` once; later calls load it. Deterministic for a given seed."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    if not (path / "config.json").exists():
        config = CLIPVisionConfig(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=24,
            num_attention_heads=heads, image_size=336, patch_size=14, hidden_act="quick_gelu",
            initializer_factor=4.0, projection_dim=32,
        )
        torch.manual_seed(seed)
        model = CLIPVisionModel(config).eval()
        model.save_pretrained(path)
        CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3,
        ).save_pretrained(path)
    return CLIPVisionModel.from_pretrained(path).eval(), CLIPImageProcessorPil.from_pretrained(path)


def demo_image(width: int = 500, height: int = 375) -> Image.Image:
    """A deterministic synthetic scene: sky, sun, hills, a house and a tree."""
    y = np.linspace(0, 1, height)[:, None, None]
    sky = (np.array([70, 130, 220]) * (1 - y) + np.array([200, 225, 255]) * y).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).copy())
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.75, height * 0.08, width * 0.9, height * 0.28], fill=(255, 215, 60))
    draw.polygon([(0, height), (0, height * 0.62), (width * 0.35, height * 0.5), (width * 0.7, height * 0.64),
                  (width, height * 0.55), (width, height)], fill=(60, 150, 70))
    draw.rectangle([width * 0.2, height * 0.5, width * 0.42, height * 0.78], fill=(180, 60, 50))
    draw.polygon([(width * 0.17, height * 0.5), (width * 0.31, height * 0.36), (width * 0.45, height * 0.5)],
                 fill=(90, 50, 40))
    draw.rectangle([width * 0.28, height * 0.64, width * 0.33, height * 0.78], fill=(250, 230, 120))
    draw.rectangle([width * 0.62, height * 0.45, width * 0.65, height * 0.7], fill=(100, 70, 40))
    draw.ellipse([width * 0.56, height * 0.3, width * 0.71, height * 0.5], fill=(30, 110, 40))
    return image


@dataclass
class DemoRow:
    method: str
    budget: int
    detail: str
    seconds: float
    peak_mib: float
    marks: dict


def run_compression_demo(vision_model, pixel_values: torch.Tensor, repeats: int = 3) -> tuple[list[DemoRow], DemoRow]:
    """VisionZip and VisPruner at 192 / 128 / 64 tokens on one image; returns the rows and the vanilla row."""
    adapter = encoder_adapter(vision_model)
    rows = []
    with torch.no_grad():
        vanilla = measure(lambda: vision_model(pixel_values, output_hidden_states=True), repeats=repeats)
        base = DemoRow("vanilla", adapter.num_patches, "all patch tokens", vanilla.median, vanilla.peak_mib, {})
        for budget, (dominant, contextual) in sorted(VISIONZIP_BUDGETS.items(), reverse=True):
            out = zip_vision_tokens(vision_model, pixel_values, dominant, contextual)
            m = measure(partial(zip_vision_tokens, vision_model, pixel_values, dominant, contextual), repeats=repeats)
            offset = int(out.has_cls)
            marks = {
                "dominant": (out.keep_indices[0, offset:] - offset).tolist(),
                "contextual": (out.contextual_indices[0] - offset).tolist(),
            }
            rows.append(DemoRow("VisionZip", budget, f"{dominant} dominant + {contextual} contextual",
                                m.median, m.peak_mib, marks))
        for budget in sorted(VISIONZIP_BUDGETS, reverse=True):
            out = vispruner_select(vision_model, pixel_values, budget)
            m = measure(partial(vispruner_select, vision_model, pixel_values, budget), repeats=repeats)
            rows.append(DemoRow("VisPruner", budget, f"{budget // 2} important + {budget - budget // 2} diverse",
                                m.median, m.peak_mib, {"kept": out.keep_indices[0].tolist()}))
    return rows, base


def print_rows(rows: list[DemoRow], base: DemoRow, num_patches: int) -> None:
    print(f"{'method':<10} {'visual tokens':<14} {'composition':<34} {'time':>10} {'peak mem':>10}")
    print(f"{base.method:<10} {num_patches:<14} {base.detail:<34} {base.seconds * 1e3:>8.1f}ms {base.peak_mib:>7.1f}MiB")
    for r in rows:
        tokens = f"{num_patches} -> {r.budget}"
        print(f"{r.method:<10} {tokens:<14} {r.detail:<34} {r.seconds * 1e3:>8.1f}ms {r.peak_mib:>7.1f}MiB")


def save_token_map(image: Image.Image, rows: list[DemoRow], patches_per_side: int, path: Path | str) -> Path:
    """One panel per method and budget: kept (dominant) patches bright, dropped ones dimmed, contextual
    merge targets tinted blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 336
    shown = image.convert("RGB").resize((size, size), Image.BICUBIC)
    # constrained layout sizes each row with its titles (tight_layout let the bottom row's two-line titles
    # run under the top row's images)
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.8), layout="constrained")
    for ax, row in zip(axes.flat, rows):
        overlay = np.zeros((patches_per_side, patches_per_side, 4))
        overlay[..., 3] = 0.7  # dim everything ...
        for name in ("dominant", "kept"):
            for p in row.marks.get(name, []):
                overlay[divmod(int(p), patches_per_side)] = (0, 0, 0, 0)  # ... but the kept patches
        for p in row.marks.get("contextual", []):
            overlay[divmod(int(p), patches_per_side)] = (0.1, 0.4, 1.0, 0.75)
        ax.imshow(shown)
        ax.imshow(overlay, extent=(0, size, size, 0), interpolation="nearest")
        ax.set_title(f"{row.method} {row.budget} tokens\n{row.detail}", fontsize=10)
        ax.axis("off")
    fig.suptitle("Visual tokens kept: bright = dominant / kept patches, dimmed = dropped or merged, blue = contextual merge targets")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")  # a complete picture or none under that name
    fig.savefig(temporary, dpi=80, format="png")
    os.replace(temporary, path)
    plt.close(fig)
    return path


def compression_demo(vision_model, image_processor, image: Image.Image, png_path: Path | str, repeats: int = 3) -> list[DemoRow]:
    """The whole compression section: run, print, plot."""
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
    adapter = encoder_adapter(vision_model)
    rows, base = run_compression_demo(vision_model, pixel_values, repeats=repeats)
    print_rows(rows, base, adapter.num_patches)
    path = save_token_map(image, rows, adapter.patches_per_side, png_path)
    print(f"token map written to {path}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model, processor = build_tiny_clip(default_cache_dir() / "tiny-clip-vit-l14-336")
    compression_demo(model, processor, demo_image(), Path(args.output_dir) / "visionzip_tokens.png", args.repeats)


if __name__ == "__main__":
    main()
