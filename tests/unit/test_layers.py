"""Import contracts between the rooms of the code (tests/layers.toml), checked from the AST.

Every module of tsnet2 and tsnet2_operator is parsed (not imported); each `import` and
`from ... import` of our packages, anywhere in the file (functions and ``if TYPE_CHECKING:``
included), must be allowed by the importing module's layer. A failure names file:line, the
import and the rule (docs/architecture.md, "Layers"). The checker is tested on synthetic
module trees below, so a forbidden import is known to fail it.
"""

from __future__ import annotations

import ast
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "tests" / "layers.toml"


# --- the checker -------------------------------------------------------------------------


def matches(pattern: str, module: str) -> bool:
    """``"a.b.*"`` matches a.b and everything under it; ``"a.b"`` matches a.b alone."""
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return module == base or module.startswith(base + ".")
    return module == pattern


def closeness(pattern: str) -> tuple[int, int]:
    """How closely a matching pattern fits: longer first, an exact module before a package."""
    return (len(pattern.removesuffix(".*")), 0 if pattern.endswith(".*") else 1)


@dataclass
class Layer:
    """One room of the code: its modules and what it may import."""

    name: str
    modules: list[str]
    may_import: list[str]
    lazy: list[str] = field(default_factory=list)
    imported_by_all: bool = False
    why: str = ""


@dataclass
class Contracts:
    """The parsed contracts file."""

    path: Path
    packages: dict[str, Path]
    layers: list[Layer]

    @classmethod
    def load(cls, path: Path, root: Path) -> Contracts:
        """Read ``path``; package directories are relative to ``root``."""
        data = tomllib.loads(path.read_text())
        packages = {name: root / rel for name, rel in data["packages"].items()}
        layers = []
        for name, spec in data["layers"].items():
            unknown = set(spec) - {"modules", "may_import", "lazy", "imported_by_all", "why"}
            assert not unknown, f"{path}: [layers.{name}] has unknown keys {sorted(unknown)}"
            layers.append(Layer(name=name, modules=spec["modules"],
                                may_import=spec["may_import"], lazy=spec.get("lazy", []),
                                imported_by_all=spec.get("imported_by_all", False),
                                why=" ".join(spec.get("why", "").split())))
        return cls(path, packages, layers)

    def layer_of(self, module: str) -> Layer | None:
        """The layer whose pattern matches ``module`` most closely."""
        best: tuple[tuple[int, int], Layer] | None = None
        for layer in self.layers:
            for pattern in layer.modules:
                if matches(pattern, module) and (best is None or closeness(pattern) > best[0]):
                    best = (closeness(pattern), layer)
        return best[1] if best else None

    def allows(self, importer: str, target: str) -> bool:
        """Whether module ``importer`` may import module ``target`` (laziness aside)."""
        mine, theirs = self.layer_of(importer), self.layer_of(target)
        if mine is None or theirs is None:
            return False
        return (theirs is mine or theirs.imported_by_all
                or any(matches(p, target) for p in mine.may_import))


@dataclass(frozen=True)
class Import:
    """One import of one of our modules."""

    line: int
    target: str  # the module imported (None-module names resolve to their package)
    statement: str
    in_function: bool
    type_checking: bool


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of our packages: dotted name -> file."""
    found: dict[str, Path] = {}
    for name, directory in packages.items():
        for path in sorted(directory.rglob("*.py")):
            parts = [name, *path.relative_to(directory).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool, type_checking: bool,
          ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function, type_checking
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, True, type_checking)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), in_function,
                                 type_checking)
        else:
            yield from _walk(child, in_function, type_checking)


def imports_of(module: str, path: Path, modules: set[str], ours: set[str],
               ) -> Iterator[Import | tuple[int, str]]:
    """The imports of our packages in ``module``; an import of a module of ours that does
    not exist is yielded as ``(line, message)``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node, in_function, type_checking in _walk(tree, False, False):
        statement = ast.unparse(node)
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            if target.partition(".")[0] not in ours:
                continue
            if target not in modules:
                yield node.lineno, f"`{statement}`: {target} is not a module of ours"
                continue
            yield Import(node.lineno, target, statement, in_function, type_checking)


def check(contracts: Contracts, root: Path) -> list[str]:
    """Every broken contract, as ``file:line: message``; empty when all hold."""
    files = module_files(contracts.packages)
    modules, ours = set(files), set(contracts.packages)
    where = contracts.path.relative_to(root) if contracts.path.is_relative_to(root) \
        else contracts.path
    problems: list[str] = []
    for layer in contracts.layers:
        for key in ("modules", "may_import", "lazy"):
            for pattern in getattr(layer, key):
                if not any(matches(pattern, m) for m in modules):
                    problems.append(f"{where}: [layers.{layer.name}] {key}: {pattern!r} "
                                    "matches no module (a stale rule?)")
    for module, path in sorted(files.items()):
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        mine = contracts.layer_of(module)
        if mine is None:
            problems.append(f"{rel}:1: {module} belongs to no layer; add it to {where}")
            continue
        for found in imports_of(module, path, modules, ours):
            if isinstance(found, tuple):
                problems.append(f"{rel}:{found[0]}: {found[1]}")
                continue
            theirs = contracts.layer_of(found.target)
            if not contracts.allows(module, found.target):
                allowed = ", ".join(mine.may_import) or "nothing of ours"
                problems.append(
                    f"{rel}:{found.line}: `{found.statement}`: layer {mine.name!r} may not "
                    f"import {found.target} (layer {theirs.name if theirs else None!r}); "
                    f"[layers.{mine.name}] in {where} allows {allowed}"
                    + (f" ({mine.why})" if mine.why else ""))
            elif (not found.in_function and not found.type_checking
                  and any(matches(p, found.target) for p in mine.lazy)):
                problems.append(
                    f"{rel}:{found.line}: `{found.statement}`: layer {mine.name!r} must import "
                    f"{found.target} inside a function ([layers.{mine.name}] lazy in {where})")
    return problems


# --- the real tree -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contracts() -> Contracts:
    return Contracts.load(CONTRACTS, ROOT)


def test_the_code_keeps_its_import_contracts(contracts: Contracts) -> None:
    problems = check(contracts, ROOT)
    assert not problems, "broken import contracts:\n" + "\n".join(problems)


def test_every_module_is_seen(contracts: Contracts) -> None:
    # The checker looks where the code is: not a vacuous pass over an empty tree.
    files = module_files(contracts.packages)
    for module in ("tsnet2", "tsnet2.proto.control", "tsnet2.daemon.backend",
                   "tsnet2.controlclient.client", "tsnet2.control.server",
                   "tsnet2_operator.app", "tsnet2._version", "tsnet2._entry"):
        assert module in files
    backend = {i.target for i in imports_of("tsnet2.daemon.backend", files[
        "tsnet2.daemon.backend"], set(files), set(contracts.packages)) if isinstance(i, Import)}
    assert "tsnet2.controlclient" in backend and "tsnet2.node" in backend


@pytest.mark.parametrize(("importer", "target"), [
    # The rules of issue 12: proto imports nothing of ours; the client library only proto;
    # the node nothing; the daemon never the coordination server; the operator never the
    # daemon or the client library.
    ("tsnet2.proto.control", "tsnet2.client.sync"),
    ("tsnet2.proto.control", "tsnet2.traffic.records"),
    ("tsnet2.proto.control", "tsnet2"),
    ("tsnet2.client.sync", "tsnet2.daemon.server"),
    ("tsnet2.client.sync", "tsnet2.node.device"),
    ("tsnet2.client.sync", "tsnet2.traffic.log"),
    ("tsnet2.client.sync", "tsnet2.controlclient.client"),
    ("tsnet2.client.sync", "tsnet2.control.store"),
    ("tsnet2.node.device", "tsnet2.proto.control"),
    ("tsnet2.node.device", "tsnet2.daemon.backend"),
    ("tsnet2.daemon.backend", "tsnet2.control.server"),
    ("tsnet2.daemon.backend", "tsnet2.control.api"),
    ("tsnet2.daemon.backend", "tsnet2.client.sync"),
    ("tsnet2.daemon.backend", "tsnet2"),
    ("tsnet2.daemon.backend", "tsnet2.lab.tailnet"),
    ("tsnet2.controlclient.client", "tsnet2.control.api"),
    ("tsnet2_operator.app", "tsnet2.daemon.server"),
    ("tsnet2_operator.app", "tsnet2.client.sync"),
    ("tsnet2_operator.app", "tsnet2"),
    ("tsnet2.lab.tailnet", "tsnet2.daemon.server"),
    ("tsnet2.lab.tailnet", "tsnet2.control.server"),
])
def test_the_contracts_forbid(contracts: Contracts, importer: str, target: str) -> None:
    assert not contracts.allows(importer, target)


@pytest.mark.parametrize(("importer", "target"), [
    ("tsnet2.client.sync", "tsnet2.proto.control"),
    ("tsnet2.client.sync", "tsnet2._version"),
    ("tsnet2.daemon.backend", "tsnet2.controlclient"),
    ("tsnet2.daemon.backend", "tsnet2.node.device"),
    ("tsnet2.daemon.backend", "tsnet2.traffic.log"),
    ("tsnet2.daemon.backend", "tsnet2.proto.codes"),
    ("tsnet2.control.api", "tsnet2.controlclient.boundedjson"),
    ("tsnet2_operator.store", "tsnet2.control.store"),
])
def test_the_contracts_allow(contracts: Contracts, importer: str, target: str) -> None:
    assert contracts.allows(importer, target)


# --- the checker on synthetic trees --------------------------------------------------------


SYNTHETIC = """
[packages]
pkg = "pkg"

[layers.low]
modules = ["pkg.low.*"]
may_import = []
why = "the bottom"

[layers.high]
modules = ["pkg.high.*"]
may_import = ["pkg.low.*"]
lazy = ["pkg.low.heavy"]

[layers.version]
modules = ["pkg._version"]
may_import = []
imported_by_all = true

[layers.top]
modules = ["pkg"]
may_import = ["pkg.high.*"]
"""


def tree(tmp_path: Path, files: dict[str, str], contracts: str = SYNTHETIC) -> list[str]:
    """Write ``files`` (relative path -> source) and the contracts, and run the checker."""
    base = {"pkg/__init__.py": "", "pkg/_version.py": "", "pkg/low/__init__.py": "",
            "pkg/low/heavy.py": "", "pkg/high/__init__.py": ""}
    for rel, source in (base | files).items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    (tmp_path / "layers.toml").write_text(contracts)
    return check(Contracts.load(tmp_path / "layers.toml", tmp_path), tmp_path)


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    assert tree(tmp_path, {
        "pkg/low/a.py": "import os\nfrom pkg.low import heavy\nfrom . import heavy as h\n",
        "pkg/high/b.py": """
            from pkg.low.a import x
            from pkg import _version
            def f():
                from pkg.low import heavy
            """,
        "pkg/__init__.py": "from pkg.high import b\nfrom .high.b import y\n",
    }) == []


def test_a_forbidden_import_fails_with_file_line_and_rule(tmp_path: Path) -> None:
    problems = tree(tmp_path, {"pkg/low/a.py": "import json\n\nfrom pkg.high import b\n",
                               "pkg/high/b.py": ""})
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith("pkg/low/a.py:3: `from pkg.high import b`: ")
    assert "layer 'low' may not import pkg.high.b (layer 'high')" in message
    assert "[layers.low] in layers.toml allows nothing of ours (the bottom)" in message


@pytest.mark.parametrize("source", [
    "def f():\n    import pkg.high.b\n",                             # inside a function
    "class C:\n    def m(self):\n        from ..high import b\n",  # relative, in a method
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high.b import B\n",
    "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    from pkg import high\n",
    "from pkg import high as h\n",                                   # a package by name
    "try:\n    import pkg.high\nexcept ImportError:\n    pass\n",
])
def test_every_kind_of_import_counts(tmp_path: Path, source: str) -> None:
    problems = tree(tmp_path, {"pkg/low/a.py": source, "pkg/high/b.py": ""})
    assert len(problems) == 1 and "layer 'low' may not import pkg.high" in problems[0], problems


def test_the_top_package_is_its_own_module(tmp_path: Path) -> None:
    # "pkg" is pkg/__init__.py alone; importing it from a low module is importing "top".
    problems = tree(tmp_path, {"pkg/low/a.py": "import pkg\nfrom pkg import _version\n"})
    assert len(problems) == 1
    assert "pkg/low/a.py:1: `import pkg`: layer 'low' may not import pkg (layer 'top')" \
        in problems[0]


def test_lazy_imports_must_be_inside_a_function(tmp_path: Path) -> None:
    problems = tree(tmp_path, {"pkg/high/b.py": """
        from typing import TYPE_CHECKING
        from pkg.low import heavy
        if TYPE_CHECKING:
            import pkg.low.heavy
        """})
    assert problems == [
        "pkg/high/b.py:3: `from pkg.low import heavy`: layer 'high' must import pkg.low.heavy "
        "inside a function ([layers.high] lazy in layers.toml)"]


def test_missing_modules_unknown_layers_and_stale_rules_fail(tmp_path: Path) -> None:
    contracts = SYNTHETIC + '\n[layers.gone]\nmodules = ["pkg.gone.*"]\nmay_import = []\n'
    problems = tree(tmp_path, {
        "pkg/low/a.py": "from pkg.low.nothere import x\n",
        "pkg/other/__init__.py": "",
    }, contracts)
    assert problems == [
        "layers.toml: [layers.gone] modules: 'pkg.gone.*' matches no module (a stale rule?)",
        "pkg/low/a.py:1: `from pkg.low.nothere import x`: pkg.low.nothere is not a module "
        "of ours",
        "pkg/other/__init__.py:1: pkg.other belongs to no layer; add it to layers.toml",
    ]


def test_closest_pattern_wins(tmp_path: Path) -> None:
    # An exact module beats its package: pkg.low.heavy moved to its own layer that may
    # import high, while the rest of low still may not.
    contracts = SYNTHETIC + ('\n[layers.heavy]\nmodules = ["pkg.low.heavy"]\n'
                             'may_import = ["pkg.high.*"]\n')
    problems = tree(tmp_path, {"pkg/low/heavy.py": "import pkg.high\n",
                               "pkg/low/a.py": "import pkg.high\n"}, contracts)
    assert len(problems) == 1 and problems[0].startswith("pkg/low/a.py:1:")
