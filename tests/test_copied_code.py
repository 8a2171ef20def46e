"""Every block copied from transformers carries a ``copied_from`` guard whose hash matches the installed
transformers' function (``visionzip/copied.py``). Found statically: no module of ours is imported here."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import transformers

from visionzip.copied import copied_from, source_sha, upstream_sha

ROOT = Path(__file__).resolve().parents[1]
COMMENT = re.compile(r"#\s*Copied from transformers v[\w.]+, (?P<file>[\w/.]+), (?P<functions>[^:\n]+)")


def guards() -> list[tuple[str, str, str, str]]:
    """(where, upstream, sha, version) for every ``@copied_from(...)`` decorator in visionzip/ and llava/."""
    found = []
    for path in sorted([*ROOT.glob("visionzip/**/*.py"), *ROOT.glob("llava/**/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "copied_from":
                    args = [ast.literal_eval(a) for a in decorator.args]
                    kwargs = {k.arg: ast.literal_eval(k.value) for k in decorator.keywords}
                    upstream = args[0] if args else kwargs["upstream"]
                    where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                    found.append((where, upstream, kwargs["sha"], kwargs["version"]))
    return found


GUARDS = guards()


def test_the_known_copies_are_guarded():
    """The copies issue 19 names: LlamaModel's layer loop (``visionzip.decoder_loop.pruned_decoder_forward``,
    which our LLaVA's ``pruned_forward`` calls), LlamaForCausalLM.__init__, the eager re-runs of a decoder layer."""
    guarded = {(where.split()[-1], upstream.rsplit(".", 1)[-1]) for where, upstream, _, _ in GUARDS}
    for ours, theirs in [("pruned_decoder_forward", "forward"), ("__init__", "__init__"), ("eager_layer", "forward")]:
        assert (ours, theirs) in guarded, f"{ours} carries no copied_from guard for {theirs}: {sorted(guarded)}"


@pytest.mark.parametrize("where,upstream,sha,version", GUARDS, ids=[g[0] for g in GUARDS])
def test_copied_block_matches_installed_transformers(where, upstream, sha, version):
    current = upstream_sha(upstream)
    assert current == sha, (
        f"{where} is a copy of {upstream} from transformers {version} (sha {sha}); the installed transformers "
        f"{transformers.__version__} has sha {current}: re-read the upstream change, carry it into the copy, "
        f"then update the guard (python -m visionzip.copied {upstream})"
    )


def test_every_copied_comment_has_its_guard():
    """A "Copied from transformers" comment names functions a ``copied_from`` in the same file guards."""
    by_file: dict[str, set[str]] = {}
    for where, upstream, _, _ in GUARDS:
        by_file.setdefault(where.split(":")[0], set()).add(upstream)
    comments = 0
    for path in sorted([*ROOT.glob("visionzip/**/*.py"), *ROOT.glob("llava/**/*.py")]):
        if path.name == "copied.py":  # its docstring shows the format
            continue
        for match in COMMENT.finditer(path.read_text(encoding="utf-8")):
            comments += 1
            upstreams = by_file.get(str(path.relative_to(ROOT)), set())
            for function in re.split(r",|\band\b", match["functions"].split(" (")[0]):
                function = function.strip()
                if not function:  # the list goes on on the next comment line
                    continue
                assert any(u.endswith("." + function) for u in upstreams), (
                    f"{path.relative_to(ROOT)}: comment 'Copied from ... {function}' has no copied_from guard "
                    f"naming it (guards there: {sorted(upstreams)})"
                )
    # and every guarded file says so in a comment, for the reader
    assert comments and all(
        "Copied from transformers" in (ROOT / where).read_text(encoding="utf-8") for where in by_file
    ), sorted(by_file)


def test_the_hash_sees_code_not_layout():
    base = "def f(x):\n    '''doc'''\n    return x + 1\n"
    assert source_sha(base) == source_sha("def f(x):\n    # a comment\n    return (x +\n            1)\n")
    assert source_sha(base) != source_sha("def f(x):\n    return x + 2\n")
    with pytest.raises(ValueError, match="sha"):
        copied_from("transformers.models.llama.modeling_llama.LlamaModel.forward", sha="abc", version="5")
