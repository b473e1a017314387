"""The module map of docs/design.md holds: each layer imports only the layers below it.

Every ``import`` of every module under sap_jax/ is read from its source (function-local ones
included), so a cycle cannot hide behind a deferred import.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sap_jax"

#: Lowest first; a module may import its own layer and those before it.
LAYERS = ("runtime", "structure", "tracing", "models", "method", "surgery", "train", "entry")
ENTRY_POINTS = {"main", "info", "export", "latency", "aot", "cli", "__init__"}


def layer_of(dotted: str) -> int:
    parts = dotted.split(".")
    assert parts[0] == "sap_jax", dotted
    if len(parts) == 1 or parts[1] in ENTRY_POINTS:
        return LAYERS.index("entry")
    return LAYERS.index(parts[1])


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts)


def sap_jax_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every sap_jax import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("sap_jax")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith("sap_jax"):
            if node.module == "sap_jax":  # from sap_jax import sub: the sub-package itself
                out += [(node.lineno, f"sap_jax.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: use absolute imports")
    return out


MODULES = sorted(p for p in ROOT.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    for path in MODULES:
        layer_of(module_name(path))  # raises on a module outside the map


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    me = module_name(path)
    mine = layer_of(me)
    upward = [f"line {line}: {name} ({LAYERS[layer_of(name)]})"
              for line, name in sap_jax_imports(path) if layer_of(name) > mine]
    assert not upward, f"{me} ({LAYERS[mine]}) imports layers above it: {upward}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sap_jax.train import config\n")
    assert sap_jax_imports(bad) == [(2, "sap_jax.train")]
    assert layer_of("sap_jax.train") > layer_of("sap_jax.method.cut")
