"""Shared test setup: offline hub, the official fixtures' location, small helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI clones main with shared/ beside it); VISIONZIP_FIXTURES overrides.
OFFICIAL_FIXTURES = Path(os.environ.get("VISIONZIP_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "official"))


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL_FIXTURES.is_dir():
        raise FileNotFoundError(
            f"official fixtures not found at {OFFICIAL_FIXTURES}; set VISIONZIP_FIXTURES to their folder"
        )
    return OFFICIAL_FIXTURES


@pytest.fixture(scope="session")
def reproduces_recorded_features(official_dir) -> bool:
    """Whether this machine's float32 kernels give the tower features of the machine that recorded the
    official outputs: the official VisionZip tensor fixture's dominant tokens are raw layer -2 features at
    known positions. Where they differ (an AVX-512 x86 CPU differs by about 2e-5), near-ties in a selection
    can resolve otherwise than in the records (docs/visionzip.md)."""
    import torch
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(official_dir / "clip-vit-tiny-336-seed0-tensorcase").eval()
    record = torch.load(official_dir / "visionzip_tensors_seed0.pt", weights_only=True)
    with torch.no_grad():
        hidden = model(record["pixel_values"], output_hidden_states=True).hidden_states[-2]
    keep = record["keep_162_30"].sort(dim=1).values
    return all(torch.equal(hidden[b, keep[b]], record["tokens_162_30"][b, :162]) for b in range(hidden.shape[0]))
