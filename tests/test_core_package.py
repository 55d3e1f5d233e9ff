"""``core.<name>`` reaches every module of the package (``core.__all__`` is read from its files)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

import core


def _module_names() -> set[str]:
    here = Path(core.__file__).parent
    files = {p.stem for p in here.glob("*.py")}
    packages = {p.parent.name for p in here.glob("*/__init__.py")}
    return {n for n in files | packages if not n.startswith("_")}


def test_all_lists_every_module_file():
    assert set(core.__all__) == _module_names()


def test_every_module_is_an_attribute_of_core():
    for name in sorted(_module_names()):
        mod = getattr(core, name)
        assert isinstance(mod, types.ModuleType) and mod.__name__ == f"core.{name}"


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_module"):
        core.no_such_module  # noqa: B018
