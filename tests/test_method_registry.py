"""The registry's contract, checked on every registered method: the checklist of ``docs/adding_a_method.md``.

A new file in ``visionzip/methods/`` is discovered (``visionzip.methods`` imports every module of the
package) and these tests run on it with no list to edit: each failure names the method.
"""
from __future__ import annotations

import dataclasses
import pkgutil
import sys

import pytest

import visionzip.methods
from visionzip import CompressionConfig, get_method, registered_methods
from visionzip.copied import resolve
from visionzip.methods.base import STAGES, CompressionMethod

METHODS = registered_methods()
BUDGET = 64  # tokens per view: a budget every method's paper table has (LLaVA-1.5's smallest)


def test_every_module_of_the_package_is_imported_and_registers_a_method():
    """Discovery: each method module is imported by the package and registers at least one class."""
    modules = [m.name for m in pkgutil.iter_modules(visionzip.methods.__path__) if m.name != "base"]
    registered_modules = {get_method(name).__module__.rpartition(".")[2] for name in METHODS}
    for module in modules:
        assert f"visionzip.methods.{module}" in sys.modules, f"visionzip.methods.{module} is not imported"
        assert module in registered_modules, f"visionzip/methods/{module}.py registers no method"


@pytest.mark.parametrize("name", METHODS)
def test_class_contract(name):
    cls = get_method(name)
    assert issubclass(cls, CompressionMethod) and dataclasses.is_dataclass(cls), f"{name}: not a CompressionMethod dataclass"
    assert cls.name == name, f"registered as {name!r} but names itself {cls.name!r}"
    assert cls.stage in STAGES, f"{name}: stage {cls.stage!r} not one of {STAGES}"
    assert cls.summary.strip(), f"{name}: no summary (one line for tables and --help)"
    assert cls.__doc__ and cls.__doc__.strip(), f"{name}: no docstring"
    assert cls.reference, f"{name}: no reference (the dotted path of its re-enactment of the official code)"
    reference = resolve(cls.reference)
    assert callable(reference), f"{name}: reference {cls.reference} is not callable"
    assert reference.__doc__ and reference.__doc__.strip(), f"{name}: its reference {cls.reference} has no docstring"
    if cls.stage == "llm":
        assert cls.llm_pruner is not CompressionMethod.llm_pruner, f"{name}: an llm-stage method without llm_pruner"
    else:
        assert (cls.encode is not CompressionMethod.encode or cls.compress is not CompressionMethod.compress), (
            f"{name}: a vision-side method overriding neither encode nor compress"
        )


@pytest.mark.parametrize("name", METHODS)
def test_budget_round_trips_through_the_spec(name):
    cls = get_method(name)
    settings = cls.from_budget(BUDGET)
    assert isinstance(settings, cls), f"{name}.from_budget returned {type(settings).__name__}"
    spec = settings.spec()
    assert spec.startswith(f"{name}:") and all("=" in part for part in spec.partition(":")[2].split(",")), (
        f"{name}: spec() {spec!r} is not the canonical METHOD:key=value,..."
    )
    assert CompressionConfig.parse(spec).settings == settings, f"{name}: {spec!r} parses to other settings"
    assert CompressionConfig.parse(f"{name}:{BUDGET}").settings == settings, f"{name}:{BUDGET} is not from_budget"
    config = CompressionConfig(name, settings)
    assert CompressionConfig.from_dict(config.to_dict()) == config, f"{name}: to_dict / from_dict differ"
    per_view = settings.tokens_per_view(576)
    assert per_view is None or 1 <= per_view <= 576, f"{name}: {per_view} tokens per view of 576"


def scalar_number_fields(cls) -> list[str]:
    """Fields declared as an int or a float (optionally None), not bool / tuple / str."""
    names = []
    for field in dataclasses.fields(cls):
        kind = str(field.type).replace(" ", "")
        if kind in ("int", "float", "int|None", "float|None"):
            names.append(field.name)
    return names


@pytest.mark.parametrize("name", METHODS)
def test_validation_names_the_value(name):
    """A wrong value in any numeric setting is a ValueError naming the setting and the value, from the
    constructor (before any model is involved) and from the spec."""
    cls = get_method(name)
    settings = cls.from_budget(BUDGET)
    for field in scalar_number_fields(cls):
        with pytest.raises(ValueError) as error:
            cls(**{**settings.to_dict(), field: "bogus"})
        assert field in str(error.value) and "bogus" in str(error.value), f"{name}.{field}: {error.value}"
    with pytest.raises(ValueError, match=f"unknown setting 'bogus' for {name}"):
        CompressionConfig.parse(f"{name}:bogus=1")
