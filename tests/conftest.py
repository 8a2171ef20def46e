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
