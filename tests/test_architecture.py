"""A compression method is one file: a method registered here, in a test file, works through
``apply_compression``, run_llava, the evaluation engine and the bench with no change anywhere else; and
the codebase keeps its boundaries (no method-name branches in ``llava/``, no references to files outside
the repository, one spec language)."""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import visionzip
from visionzip import CompressedTokens, CompressionConfig, CompressionMethod, register_method
from visionzip.methods.base import check_count, unregister_method

REPO = Path(__file__).resolve().parents[1]


@dataclass
class KeepFirst(CompressionMethod):
    """Keep the first ``tokens`` patches of every view (a toy encoder-output method)."""

    name: ClassVar[str] = "keepfirst"
    stage: ClassVar[str] = "encoder_output"
    needs_attention_input: ClassVar[bool] = False

    tokens: int = 8

    def validate(self):
        self.tokens = check_count("tokens", self.tokens)
        return self

    @classmethod
    def from_budget(cls, tokens: int):
        return cls(tokens=tokens)

    def tokens_per_view(self, num_tokens=None) -> int:
        return self.tokens

    def check(self, adapter, select_layer: int) -> None:
        if self.tokens > adapter.num_patches:
            raise ValueError(f"tokens = {self.tokens} exceeds the {adapter.num_patches} patches")

    def compress(self, adapter, capture) -> CompressedTokens:
        offset = int(adapter.has_cls)
        keep = torch.arange(offset, offset + self.tokens, device=capture.hidden.device)
        keep = keep.expand(capture.hidden.shape[0], -1)
        return CompressedTokens(capture.hidden[:, offset : offset + self.tokens], keep, adapter.has_cls, False)


@pytest.fixture(scope="module")
def keepfirst():
    register_method(KeepFirst)
    yield KeepFirst
    unregister_method("keepfirst")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from llava.model.tiny import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("arch") / "llava-v1.5-tiny"), "v1.5", seed=0)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.fromarray((np.random.default_rng(1).random((200, 260, 3)) * 255).astype("uint8")).save(path)
    return path


def test_spec_language(keepfirst):
    assert "keepfirst" in visionzip.registered_methods()
    config = CompressionConfig.parse("keepfirst:12")
    assert config.settings == KeepFirst(tokens=12) and config.tokens_per_image == 12
    assert CompressionConfig.parse("keepfirst:tokens=5").tokens == 5
    assert CompressionConfig.from_dict(config.to_dict()) == config
    assert CompressionConfig.parse(config.spec()) == config
    # the paper split of VisionZip is owned by its file, for any budget
    assert (CompressionConfig.parse("visionzip:64").dominant, CompressionConfig.parse("visionzip:64").contextual) == (54, 10)
    assert CompressionConfig.parse("visionzip:32").settings.to_dict() == {"dominant": 27, "contextual": 5}
    # the canonical spec names every setting; the positional form of the released code is input only
    assert CompressionConfig.parse("visionzip:54,10").spec() == "visionzip:dominant=54,contextual=10"
    # a dict of the unreleased format with every method's keys (unused ones None) is refused, naming them
    old = {"method": "vispruner", "dominant": None, "contextual": None, "tokens": 64, "important_ratio": 0.5,
           "anyres_layout": "official"}
    with pytest.raises(ValueError, match=r"unknown compression settings \['contextual', 'dominant'\]"):
        CompressionConfig.from_dict(old)
    for bad, message in (("keepfirst:0", "tokens must be >= 1"), ("keepfirst:tokens=x", "cannot parse"),
                         ("keepfirst:size=3", "unknown setting 'size'"), ("keepfirst", "needs a budget"),
                         ("nosuch:3", "unknown compression method 'nosuch'")):
        with pytest.raises(ValueError, match=message):
            CompressionConfig.parse(bad)


def test_new_method_through_apply_compression_and_generate(keepfirst, tiny, image_file):
    from llava.model.builder import load_pretrained_model
    from llava.processor import LlavaProcessor

    tokenizer, model, image_processor, _ = load_pretrained_model(tiny, None, None, device="cpu")
    visionzip.apply_compression(model, "keepfirst:8")
    assert model.config.visual_compression == {"method": "keepfirst", "tokens": 8, "anyres_layout": "official"}
    processor = LlavaProcessor.from_model(model, tokenizer, image_processor)
    image = Image.open(image_file).convert("RGB")
    inputs = processor(["What is it?", "Describe the picture in detail."], [image, image])
    spliced = model.splice_multimodal(inputs.input_ids, inputs.images, inputs.image_sizes, inputs.attention_mask)
    # each sample: its text (minus the placeholder) + 8 visual tokens, left-padded to the longest
    text = inputs.attention_mask.sum(dim=1) - 1
    assert spliced.attention_mask.sum(dim=1).tolist() == (text + 8).tolist()
    assert spliced.visual_mask.sum(dim=1).tolist() == [8, 8]
    features = model.get_image_features(inputs.images, inputs.image_sizes)
    assert [f.shape[0] for f in features.per_image] == [8, 8]
    assert features.views.compressed.keep_indices[0].tolist() == list(range(1, 9))
    out = model.generate(**inputs.generate_kwargs(), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=processor.pad_token_id)
    assert out.shape == (2, 3)
    with pytest.raises(ValueError, match="exceeds the 576 patches"):
        visionzip.apply_compression(model, "keepfirst:600")


def test_new_method_through_run_llava_and_eval_engine(keepfirst, tiny, image_file, tmp_path, capsys):
    from llava.eval import generate
    from llava.eval.run_llava import main as run_llava

    assert run_llava(["--model-path", tiny, "--image-file", str(image_file), "--query", "What?", "--device", "cpu",
                      "--temperature", "0", "--max_new_tokens", "2", "--compression", "keepfirst:8"]) == 0
    capsys.readouterr()
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": image_file.name, "text": f"Question {i}?"})
                                 + "\n" for i in range(3)))
    answers = tmp_path / "answers.jsonl"
    record = generate.main(["--model-path", tiny, "--question-file", str(questions), "--image-folder",
                            str(image_file.parent), "--answers-file", str(answers), "--format", "vqa",
                            "--compression", "keepfirst:8", "--device", "cpu", "--max-new-tokens", "2",
                            "--batch-size", "2", "--no-progress"])
    assert record["num_answered"] == 3
    from llava.eval.data_io import settings_path_for

    recorded = json.loads(settings_path_for(answers).read_text())
    assert "keepfirst" in json.dumps(recorded)


def test_new_method_through_the_bench(keepfirst, tiny):
    from llava.bench import main as bench

    result = bench(["--model", tiny, "--in-process", "--repeats", "1", "--warmup", "0", "--new-tokens", "1",
                    "--methods", "none", "keepfirst:8"])
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["keepfirst:8"]["visual_tokens"] == 8 and rows["none"]["visual_tokens"] == 576
    assert rows["keepfirst:8"]["label"] == "keepfirst 8"


def test_no_method_name_branches_outside_visionzip_methods():
    found = subprocess.run(["grep", "-rnE", r"method ==|== \"visionzip\"|== \"vispruner\"", "llava/"],
                           cwd=REPO, capture_output=True, text=True).stdout
    assert found == "", found


def test_nothing_outside_tests_points_into_shared():
    pattern = re.compile(r"\.\./shared|SPEC\.md")
    # the project's own files (tracked, or new and not ignored): never the environments or caches
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert "README.md" in listed
    offenders = []
    for name in listed:
        path = REPO / name
        if not path.is_file() or path.suffix not in (".py", ".md", ".sh", ".toml", ".json", ".cfg"):
            continue
        if name.startswith("tests/"):
            continue
        if pattern.search(path.read_text(encoding="utf-8", errors="ignore")):
            offenders.append(name)
    assert offenders == []


def code_without_comments(path: Path) -> str:
    """The source of ``path`` with comments and docstrings blanked (what runs, not what explains it)."""
    import ast
    import io
    import tokenize

    text = path.read_text(encoding="utf-8")
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add((first.lineno, first.col_offset))
    kept = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.start in docstrings):
            continue
        kept.append(token.string)
    return " ".join(kept)


def test_the_next_view_count_and_budget_families_live_in_one_place():
    """``visionzip/budgets.py`` alone says how many views a LLaVA-NeXT budget counts (5) and which budget
    families exist; everything else imports them (issue 19: the count was written in 3 places)."""
    home = REPO / "visionzip" / "budgets.py"
    assert re.search(r"^ANYRES_VIEWS = 5$", home.read_text(encoding="utf-8"), re.M)
    patterns = {
        "a view count": re.compile(r"\b\w*views\w* = \d+\b", re.I),
        "a family table": re.compile(r"[\"']v1\.6[\"'] :"),
        "5 views written out": re.compile(r"\b5 \* 576\b|\b576 \* 5\b|\btotal // 5\b|\(5, 5 \*"),
    }
    offenders = []
    for path in sorted([*REPO.glob("visionzip/**/*.py"), *REPO.glob("llava/**/*.py")]):
        if path == home:
            continue
        code = code_without_comments(path)
        offenders += [f"{path.relative_to(REPO)}: {what}" for what, pattern in patterns.items() if pattern.search(code)]
    assert offenders == [], offenders
    # and the pattern finds what it looks for (so that the test can fail)
    assert patterns["a view count"].search(code_without_comments(home))
    assert patterns["a family table"].search(code_without_comments(home))


def test_every_compression_alias_parses_into_the_same_spec():
    """One flag dialect: each alias of ``--compression`` (run_llava's ``--visionzip``, the eval engine's
    ``--method/--budget``, training's ``--visual_tokens/--dominant/--contextual``) gives the config the
    spec gives, through ``llava.compression_args.compression_from_flags``; the canonical form is printed."""
    from argparse import Namespace

    from llava.compression_args import compression_from_args, compression_from_flags
    from llava.eval.generate import build_parser, resolve_compression
    from llava.train.arguments import CompressionArguments, build_compression_config

    spec = CompressionConfig.parse("visionzip:dominant=54,contextual=10")
    eval_args = build_parser("vqa").parse_args(
        ["--model-path", "m", "--question-file", "q", "--answers-file", "a", "--method", "visionzip", "--budget", "64"]
    )
    same = {
        "positional spec": compression_from_flags("visionzip:54,10").compression,
        "--visionzip 54,10": compression_from_args(Namespace(visionzip="54,10", compression=None)),
        "--method visionzip --budget 64": resolve_compression(eval_args, "pad")[0],
        "--method visionzip --budget 320 (NeXT)": compression_from_flags(
            method="visionzip", budget=320, family="v1.6").compression,
        "--visual_tokens 64": build_compression_config(CompressionArguments("visionzip", visual_tokens=64), "pad"),
        "--dominant 54 --contextual 10": build_compression_config(
            CompressionArguments("visionzip", dominant=54, contextual=10), "pad"),
    }
    for alias, config in same.items():
        assert config == spec, f"{alias} gave {config!r}"
    assert spec.spec() == "visionzip:dominant=54,contextual=10"
    for kwargs, message in (
        (dict(spec="visionzip:64", method="visionzip"), "give either --compression"),
        (dict(spec="visionzip:64", budget=64), "already gives the budget"),
        (dict(method="visionzip", budget=64, family="v1.6"), "must divide by 5; got 64"),
        (dict(method="visionzip", settings={"tokens": 3}), r"visionzip has no setting \['tokens'\]"),
        (dict(method="none", budget=64), "method 'none' takes no budget"),
    ):
        with pytest.raises(ValueError, match=message):
            compression_from_flags(**kwargs)
