"""The library code a ``finetail <command>`` runs, and its digest.

A training job's resume key and the workflow's rerun trigger both include the digest of the
code that computes a job's result, so editing that code never lets a checkpoint (or an old
output) written by other code stand in for a new result.

The code is found, not listed: the command's function in ``cli.py`` (``cmd_<command>``), the
finetail modules it imports, the modules those import, and so on (imports anywhere in a
module count, function-local ones included; a package's ``__init__`` counts with it). So a
new module, or an edit to the tracking module or to the command's own lines in ``cli.py``,
changes the digest of exactly the commands that reach it. The walk reads source with
:mod:`ast`: it imports nothing, neither torch nor snakemake.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

__all__ = ["code_digest", "code_files"]

PKG = Path(__file__).resolve().parent


def _module_file(pkg: Path, dotted: str) -> Path | None:
    """``finetail.training.job`` -> ``<pkg>/training/job.py`` (or the package's __init__)."""
    parts = dotted.split(".")[1:]
    base = pkg.joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _module_name(pkg: Path, file: Path) -> str:
    rel = file.relative_to(pkg).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["finetail", *parts])


def _imports(pkg: Path, file: Path, tree: ast.AST) -> set[str]:
    """Dotted finetail modules ``tree`` (the source of ``file``) imports, at any depth."""
    here = _module_name(pkg, file).split(".")
    package = here if file.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "finetail")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "finetail":
                continue
            found.add(mod)
            # `from . import distributed`: the name may be a module of its own
            found.update(f"{mod}.{a.name}" for a in node.names if _module_file(pkg, f"{mod}.{a.name}"))
    return found


def _with_parents(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _command_node(pkg: Path, command: str) -> ast.FunctionDef:
    tree = ast.parse((pkg / "cli.py").read_text())
    name = "cmd_" + command.replace("-", "_")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise ValueError(f"finetail has no command {command!r} (no {name} in {pkg / 'cli.py'})")


@lru_cache(maxsize=None)
def _files(pkg: Path, command: str) -> tuple[tuple[str, str], ...]:
    node = _command_node(pkg, command)
    todo = sorted(_imports(pkg, pkg / "cli.py", node))
    seen: dict[str, Path] = {}
    while todo:
        for dotted in _with_parents(todo.pop()):
            if dotted in seen:
                continue
            f = _module_file(pkg, dotted)
            if f is None:
                continue
            seen[dotted] = f
            todo.extend(_imports(pkg, f, ast.parse(f.read_text())))
    return tuple(sorted((str(f.relative_to(pkg)), d) for d, f in seen.items()))


def code_files(command: str, pkg: str | Path = PKG) -> list[str]:
    """The library files (relative to the package) ``finetail <command>`` runs.

    >>> "training/job.py" in code_files("train") and "report.py" not in code_files("train")
    True
    """
    return [f for f, _ in _files(Path(pkg).resolve(), command)]


def code_digest(command: str, pkg: str | Path = PKG) -> str:
    """sha256 (16 hex digits) over ``cmd_<command>``'s source in ``cli.py`` and every library
    file it reaches (:func:`code_files`).

    >>> len(code_digest("train"))
    16
    """
    pkg = Path(pkg).resolve()
    node = _command_node(pkg, command)
    lines = (pkg / "cli.py").read_text().splitlines()[node.lineno - 1 : node.end_lineno]  # whole lines
    h = hashlib.sha256("\n".join(lines).encode())
    for name, _ in _files(pkg, command):
        h.update(name.encode() + (pkg / name).read_bytes())
    return h.hexdigest()[:16]
