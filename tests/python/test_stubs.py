"""The checked-in kvtier/_kvtier.pyi matches the extension that was built."""

from __future__ import annotations

import ast
import inspect
import pathlib

import kvtier
from kvtier import _kvtier


def stub_tree() -> ast.Module:
    path = pathlib.Path(kvtier.__file__).with_name("_kvtier.pyi")
    assert path.exists(), f"{path} is missing from the package"
    return ast.parse(path.read_text())


def test_every_stubbed_name_exists_with_its_members():
    for node in stub_tree().body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            assert hasattr(_kvtier, node.name), f"stub names {node.name}, the module has no such attribute"
        if isinstance(node, ast.ClassDef):
            cls = getattr(_kvtier, node.name)
            for member in node.body:
                if isinstance(member, ast.FunctionDef) and member.name != "__init__":
                    assert hasattr(cls, member.name), f"{node.name}.{member.name} is stubbed but not bound"


def test_every_public_native_name_is_stubbed():
    stubbed = {n.name for n in stub_tree().body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    public = {n for n in dir(_kvtier) if not n.startswith("_")}
    assert public - stubbed == set()
    for name in ("Engine", "PagedKvLayout", "StoreHandle"):
        stub_cls = next(n for n in stub_tree().body if isinstance(n, ast.ClassDef) and n.name == name)
        stub_members = {m.name for m in stub_cls.body if isinstance(m, ast.FunctionDef)}
        native = {m for m, _ in inspect.getmembers(getattr(_kvtier, name)) if not m.startswith("_")}
        assert native - stub_members == set(), f"{name}: bound but not stubbed"
