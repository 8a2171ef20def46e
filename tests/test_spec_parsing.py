"""Issue 22, item 11: settings that used to be accepted and fail (or silently change) later are refused
when parsed, naming the value and the limit: a setting given twice in a spec, a ``random`` seed beyond
what ``torch.Generator`` takes, and a CLIP tower folder given where a LLaVA checkpoint is expected."""
from __future__ import annotations

import json

import pytest

from visionzip.config import CompressionConfig
from visionzip.methods.random_tokens import MAX_SEED


@pytest.mark.parametrize("spec, key", [
    ("visionzip:dominant=54,dominant=10,contextual=10", "dominant"),
    ("random:tokens=64,seed=1,seed=2", "seed"),
    ("prumerge:mode=fixed,ratio=0.1,mode=adaptive", "mode"),
])
def test_a_setting_given_twice_is_refused(spec, key):
    with pytest.raises(ValueError, match=rf"gives '{key}' twice"):
        CompressionConfig.parse(spec)


def test_a_random_seed_beyond_the_generator_is_refused_at_parse_time():
    assert CompressionConfig.parse(f"random:tokens=8,seed={MAX_SEED}").settings.seed == MAX_SEED
    with pytest.raises(ValueError, match=rf"seed must be <= {MAX_SEED} \(2\*\*63 - 1\), got 99999999999999999999"):
        CompressionConfig.parse("random:tokens=8,seed=99999999999999999999")


def test_a_clip_folder_as_the_model_is_refused_by_name(tmp_path):
    from llava.model.builder import inspect_checkpoint

    tower = tmp_path / "clip-vit"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 64}))
    (tower / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds a 'clip_vision_model' model, which is neither a LLaVA checkpoint"):
        inspect_checkpoint(str(tower))
    language_model = tmp_path / "llama"
    language_model.mkdir()
    (language_model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (language_model / "model.safetensors").write_bytes(b"")
    assert inspect_checkpoint(str(language_model)).kind == "language_model"


def test_a_budget_is_checked_against_a_tower_that_is_not_loaded_yet(tmp_path):
    """Issue 22, item 11: ``visionzip(model, 570, 10)`` on a model loaded without its tower (the original's
    ``delay_load``) is refused at once, against the tower its config describes (built on the meta device)."""
    import visionzip
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.model.tiny import build_tiny_llava

    model = LlavaLlamaForCausalLM.from_pretrained(build_tiny_llava(str(tmp_path / "tiny")), load_vision_tower=False)
    assert not model.get_vision_tower().is_loaded
    with pytest.raises(ValueError, match="dominant \\+ contextual = 580 exceeds the 577 tokens"):
        visionzip.visionzip(model, 570, 10)
    visionzip.visionzip(model, 54, 10)  # a budget that fits is taken
    assert model.get_visual_compression().settings.to_dict() == {"dominant": 54, "contextual": 10}
