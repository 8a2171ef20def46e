"""Shared test setup: offline hub, the official fixtures' location, small helpers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (scripts/test.sh runs `-n 2`) each worker gets its share of the cores as torch threads
# (and so do the processes it starts): 2 workers x 2 threads on 2 cores only thrash (docs/architecture.md,
# "Test time"). Set before the test modules import torch; an explicit OMP_NUM_THREADS wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))

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


@pytest.fixture(scope="module")
def official_checkpoints(official_dir, tmp_path_factory) -> Path:
    """A copy, for one test module, of the official tiny LLaVA-1.5 and LLaVA-NeXT checkpoints and their CLIP
    (a module may write beside them, e.g. conversions). v1.5's mm_vision_tower is pointed at the copied CLIP
    (absolute); v1.6's stays the relative "clip-vit-tiny-336", which resolves beside the checkpoint folder."""
    root = tmp_path_factory.mktemp("official-checkpoints")
    for name in ("llava-v1.5-tiny", "llava-v1.6-tiny", "clip-vit-tiny-336"):
        shutil.copytree(official_dir / name, root / name)
    config_file = root / "llava-v1.5-tiny" / "config.json"
    config = json.loads(config_file.read_text())
    config["mm_vision_tower"] = str(root / "clip-vit-tiny-336")
    config_file.write_text(json.dumps(config))
    return root


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


# The slowest modules first. Under `--dist loadfile` (scripts/test.sh) a worker takes whole modules in
# collection order, so a slow module collected last (alphabetically: test_toy_*, test_train_*) leaves the other
# worker idle at the end of the run. Sorting is stable: every other module, and the tests inside each module,
# keep their order (docs/architecture.md, "Test time").
SLOW_MODULES_FIRST = (
    "test_methods_e2e.py",
    "test_train_deepspeed.py",
    "test_toy_task.py",
    "test_compiled.py",
    "test_bench_e2e.py",
    "test_eval_e2e.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
