"""The import rules the tree is built on (common/__init__.py states them):

- `actors/` and `learner/` use `common/`, never each other nor the `dvi` CLI; `common/` uses none
  of the three;
- inside `common/`, each subpackage imports only the ones it is allowed (`ALLOWED`);
- no module outside `common/transport/redis/` imports redis-py.

Every import counts, also those inside functions (parsed with `ast`, not executed)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALLOWED = {
    "common.core": {"common.core"},
    "common.model": {"common.core", "common.model"},
    "common.decoding": {"common.core", "common.model", "common.decoding"},
    "common.transport": {"common.core", "common.transport"},
    "common.observe": {"common.core", "common.observe"},
    "common.runtime": {"common"},
}
TOP_LEVEL_FORBIDDEN = {"actors": {"learner", "dvi"}, "learner": {"actors", "dvi"}, "common": {"actors", "learner", "dvi"}}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path, module: str | None = None) -> set[str]:
    """Every module `path` (named `module`, default: by its place in the tree) imports: absolute
    names, relative imports resolved."""
    module = module or module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)  # `from common import x`
    return found


def package_files(*tops: str) -> list[pathlib.Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def owner(module: str) -> str | None:
    """The `ALLOWED` key a common module belongs to (None for `common` itself)."""
    for key in sorted(ALLOWED, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    return None


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("top", sorted(TOP_LEVEL_FORBIDDEN))
def test_top_level_packages_import_one_way(top):
    bad = [(module_name(p), name) for p in package_files(top) for name in imports(p)
           if any(within(name, f) for f in TOP_LEVEL_FORBIDDEN[top])]
    assert not bad, bad


def common_violations(modules: list[tuple[str, pathlib.Path]]) -> list[tuple[str, str]]:
    """(module, what it imports against `ALLOWED`) for every (module name, file) given."""
    bad = []
    for module, path in modules:
        mine = owner(module)
        if mine is None:
            continue
        for name in imports(path, module):
            if within(name, "common") and name != "common" and owner(name) is not None:
                if not any(within(owner(name), allowed) for allowed in ALLOWED[mine]):
                    bad.append((module, name))
    return bad


def test_common_subpackages_import_only_what_they_may():
    bad = common_violations([(module_name(p), p) for p in package_files("common")])
    assert not bad, bad


def test_every_common_module_belongs_to_a_subpackage():
    loose = [module_name(p) for p in package_files("common") if owner(module_name(p)) is None and module_name(p) != "common"]
    assert not loose, loose


def test_only_the_redis_implementation_imports_redis():
    bad = [module_name(p) for p in package_files("common", "actors", "learner", "dvi")
           if not within(module_name(p), "common.transport.redis")
           and any(within(name, "redis") for name in imports(p))]
    assert not bad, bad


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: a core module that imports the model side (also inside a function, or
    relatively) is reported; one that imports core is not."""
    probe = tmp_path / "probe.py"
    probe.write_text("from common.core import types\n\ndef f():\n    from ..model import split\n"
                     "    import common.decoding.speculative\n")
    bad = common_violations([("common.core.probe", probe)])
    assert sorted(name for _, name in bad) == ["common.decoding.speculative", "common.model", "common.model.split"]
