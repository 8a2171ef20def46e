"""Issue 22, item 10: the lmms-eval plugin validates its arguments as the CLIs do (``llava.preflight``),
instead of falling back silently: ``device=cuda`` without CUDA, a temperature of -1 or nan, ``num_beams=0``
and an unknown ``prompt_too_long`` are refused by name. (The helpers need no lmms-eval: this environment.)"""
from __future__ import annotations

import pytest
import torch

from llava.lmms_eval_plugin.requests import generation_settings, parse_device, parse_prompt_too_long


def test_a_device_that_is_not_there_is_refused():
    assert parse_device(None) == parse_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            parse_device("cuda")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda"):
        parse_device("gpu")


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"temperature": -1}, r"temperature must be a finite number >= 0.*-1"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0.*nan"),
    ({"temperature": "nan"}, r"temperature must be a finite number >= 0.*nan"),
    ({"temperature": "hot"}, r"generation_kwargs\['temperature'\] must be a number"),
    ({"num_beams": 0}, r"num_beams must be an integer >= 1, got 0"),
    ({"num_beams": 1.5}, r"generation_kwargs\['num_beams'\] must be an integer"),
    ({"top_p": 2}, r"top_p must be in \(0, 1\]"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1"),
])
def test_bad_generation_settings_are_refused_by_name(gen_kwargs, message):
    with pytest.raises(ValueError, match=message):
        generation_settings(gen_kwargs, 16)


def test_good_generation_settings_pass():
    settings = generation_settings({"temperature": "0.2", "top_p": 0.9, "num_beams": "2", "max_new_tokens": 8}, 16)
    assert (settings.temperature, settings.top_p, settings.num_beams, settings.max_new_tokens) == (0.2, 0.9, 2, 8)
    assert generation_settings({"temperature": 0, "top_p": None}, 16).do_sample is False


def test_prompt_too_long_policy_argument():
    assert parse_prompt_too_long('"refuse"') == "refuse" and parse_prompt_too_long("error") == "error"
    with pytest.raises(ValueError, match="prompt_too_long must be one of"):
        parse_prompt_too_long("truncate")
