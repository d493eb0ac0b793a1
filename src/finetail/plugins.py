"""Plugins: a researcher's own training loss, post-hoc correction or transferability score,
run beside the built-ins without editing finetail.

Three kinds, each a small contract (README: *Bring your own method*):

``loss`` (entry-point group ``finetail.losses``)
    ``callable(counts, **params) -> torch.nn.Module``. ``counts``: ``(C,)`` int64 tensor, the
    training images of each class (each >= 1). The module's ``forward(logits, targets)``
    takes float32 logits ``(B, C)`` and int64 labels ``(B,)`` and returns a scalar (a 0-d
    tensor). The model predicts with the softmax of its plain logits (as balanced softmax
    does), so post-hoc corrections and the calibration error treat it as a softmax model.
    The callable may carry ``head = "normed"`` (a class attribute, or an attribute of the
    function) for a cosine head without bias, as LDAM's (:class:`finetail.models.NormedLinear`);
    the default is ``"linear"``. The loss's own parameters, if any, are not trained.
``posthoc`` (group ``finetail.posthoc``)
    ``callable(logits, counts, **params) -> logits``: the trained cell's test logits
    ``(N, C)`` float32 and its training counts ``(C,)`` int64 in, corrected logits ``(N, C)``
    out. It may also declare any of the keywords :data:`POSTHOC_EXTRAS` and then gets them:
    ``features`` (the test images' penultimate features, ``(N, D)``), ``weight`` and ``bias``
    (the head's, ``(C, D)`` and ``(C,)`` or None) and ``holdout`` (:class:`Holdout`: logits,
    labels and features of the training images the cell kept out of training, the way
    ``tau: auto`` chooses tau; the cells' recipe needs ``holdout`` > 0).
``score`` (group ``finetail.scores``)
    ``callable(features, labels) -> float``, or ``callable(features, labels, probs=...)``
    when it declares ``probs``: the target's training images' features ``(N, D)`` float64
    under the source network, their labels ``(N,)`` int64 and the source network's softmax
    over its own classes ``(N, C_s)`` float64. Higher must mean better, as for every score
    of :mod:`finetail.transferability`.

A plugin is named by an installed package's entry point (``importlib.metadata``, as pytest
and Snakemake find theirs) or by ``module:callable`` (a dotted module and attribute), found
on ``sys.path`` (``PYTHONPATH``) or, after it, in the folders of :data:`PATH_ENV` (the
workflow puts the study file's folder there). :func:`locate` finds where a plugin's code lies
without importing it, :func:`source_files` which files it runs and :func:`plugin_digest`
their digest: the module's file, its packages' ``__init__`` files and every module they
import (found with :mod:`ast`, imports at any depth) that lies under the same folder of the
search path. The workflow puts that digest into the job's code digest, so editing the plugin
reruns exactly the jobs that run it. :func:`load` imports it and :func:`check_signature`
checks the study's parameters against the callable's signature, before any job runs.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import Any, NamedTuple

from .errors import UserError

__all__ = [
    "GROUPS",
    "PATH_ENV",
    "POSTHOC_EXTRAS",
    "REF_PATTERN",
    "Holdout",
    "Plugin",
    "PluginError",
    "Target",
    "check_signature",
    "files_digest",
    "load",
    "locate",
    "plugin_digest",
    "search_path",
    "source_files",
]

GROUPS = {"loss": "finetail.losses", "posthoc": "finetail.posthoc", "score": "finetail.scores"}
"""The entry-point group of each kind of plugin."""

PATH_ENV = "FINETAIL_PLUGIN_PATH"
"""Folders (``os.pathsep``-separated) searched for ``module:callable`` plugins after ``sys.path``."""

POSTHOC_EXTRAS = ("features", "weight", "bias", "holdout")
"""Keywords a post-hoc plugin may declare to receive them from finetail (never study parameters)."""

# module:callable (dotted both sides) or an entry point's name
REF_PATTERN = r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*|[A-Za-z0-9][A-Za-z0-9_.+-]*)$"
_CALLED_AS = {"loss": "callable(counts, **params)", "posthoc": "callable(logits, counts, **params)",
              "score": "callable(features, labels) or callable(features, labels, probs=...)"}
_FIXED = {"loss": ("counts",), "posthoc": ("logits", "counts"), "score": ("features", "labels")}


class PluginError(UserError):
    """A plugin that cannot be found, imported or called as its kind's contract says."""


class Holdout(NamedTuple):
    """What a post-hoc plugin that declares ``holdout`` gets: the cell's held-out training
    images' logits ``(H, C)``, labels ``(H,)`` and penultimate features ``(H, D)``."""

    logits: Any
    labels: Any
    features: Any


@dataclass(frozen=True)
class Target:
    """Where a plugin's callable lives (found without importing it)."""

    ref: str  # as the study names it: "pkg.mod:fn" or an entry point's name
    module: str  # dotted module name
    attr: str  # attribute path in the module ("fn", "Class.make")
    entry_point: str | None = None  # "group:name" when named by an entry point
    distribution: str | None = None  # the installed distribution that provides it, if any
    version: str | None = None


def search_path(extra: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Where ``module:callable`` plugins are looked for: ``sys.path``, then ``extra``, then
    the folders of :data:`PATH_ENV`."""
    env = [p for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
    out: list[str] = []
    for p in [*sys.path, *map(str, extra), *env]:
        if p not in out:
            out.append(p)
    return out


def _check_kind(kind: str) -> str:
    if kind not in GROUPS:
        raise ValueError(f"plugin kind must be one of {sorted(GROUPS)}, got {kind!r}")
    return GROUPS[kind]


def locate(kind: str, ref: str) -> Target:
    """The module and attribute ``ref`` names: ``module:callable`` as written, or the entry
    point called ``ref`` in ``kind``'s group (:data:`GROUPS`) with its distribution and version.

    Raises :class:`PluginError` for a malformed name, an entry point no installed package
    provides (naming those that are), or one that two packages provide.
    """
    group = _check_kind(kind)
    if not isinstance(ref, str) or not re.fullmatch(REF_PATTERN, ref):
        raise PluginError(f"{kind} plugin {ref!r}: name an installed entry point ({group}) or module:callable")
    if ":" in ref:
        module, attr = ref.split(":", 1)
        dist = _distribution_of(module)
        return Target(ref, module, attr, None, *dist)
    eps = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == ref]
    if not eps:
        names = sorted({ep.name for ep in importlib.metadata.entry_points(group=group)})
        raise PluginError(f"{kind} plugin {ref!r}: no installed package has an entry point {ref!r} in group {group} "
                          f"({'it has ' + ', '.join(names) if names else 'none is installed'}); install the package "
                          "(pip install -e <folder>) or name the code as module:callable")
    if len({(ep.value, getattr(ep.dist, 'name', None)) for ep in eps}) > 1:
        raise PluginError(f"{kind} plugin {ref!r}: entry point {ref!r} of group {group} is provided by several "
                          f"packages ({', '.join(sorted({str(getattr(ep.dist, 'name', '?')) for ep in eps}))})")
    ep = eps[0]
    if not ep.attr:
        raise PluginError(f"{kind} plugin {ref!r}: entry point {ep.value!r} names a module, not a callable "
                          "(write it as module:callable)")
    dist = getattr(ep, "dist", None)
    return Target(ref, ep.module, ep.attr, f"{group}:{ref}", dist.name if dist else None,
                  dist.version if dist else None)


def _distribution_of(module: str) -> tuple[str | None, str | None]:
    """The installed distribution that provides ``module``'s top-level package, if any."""
    top = module.split(".")[0]
    names = importlib.metadata.packages_distributions().get(top) or []
    if not names:
        return None, None
    try:
        return names[0], importlib.metadata.version(names[0])
    except importlib.metadata.PackageNotFoundError:
        return names[0], None


# --------------------------------------------------------------------------- source files
def _find_chain(module: str, search: Sequence[str], meta: bool = False) -> list[ModuleSpec] | None:
    """The specs of ``module`` and its parent packages, found without importing anything:
    the top-level module on ``search``, or (``meta``) by the interpreter's finders, such as
    the one an editable install (``pip install -e``) adds; submodules in their package's folders."""
    parts = module.split(".")
    spec = PathFinder.find_spec(parts[0], list(search))
    if spec is None and meta:
        try:
            spec = importlib.util.find_spec(parts[0])  # a top-level name: imports nothing
        except (ImportError, ValueError):
            spec = None
    chain = [spec]
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
        chain.append(spec)
    return None if spec is None else chain


def _origin(spec: ModuleSpec) -> Path | None:
    return Path(spec.origin) if spec.origin and spec.has_location and Path(spec.origin).is_file() else None


def _root(spec: ModuleSpec) -> Path:
    """The search-path folder a top-level module was found in."""
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve().parent
    return Path(spec.origin).resolve().parent


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names ``tree`` (the source of ``module``) imports, at any depth."""
    here = module.split(".")
    package = here if is_package else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod:
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    return found


def source_files(module: str, search: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """The files ``module`` runs: its own, its packages' ``__init__`` files and every module
    they import that is the plugin's own (its top-level package's) or, outside an installed
    packages folder (``site-packages``), lies beside it in the same search-path folder; never
    the standard library, another installed package or finetail. As ``(path relative to that
    folder, absolute path)``, sorted.

    Raises :class:`PluginError` when ``module`` is not found on ``search`` (default:
    :func:`search_path`) nor by the interpreter's finders (an editable install's).
    """
    search = search_path() if search is None else list(search)
    chain = _find_chain(module, search, meta=True)
    if chain is None or _origin(chain[-1]) is None and not chain[-1].submodule_search_locations:
        beyond = [p for p in search if p and p not in sys.path]
        raise PluginError(f"module {module!r} is not on sys.path (PYTHONPATH)"
                          + (f" nor in {', '.join(beyond)}" if beyond else "")
                          + f" (a study file's folder is searched too, and {PATH_ENV})")
    root = _root(chain[0])
    own = module.split(".")[0]
    installed = root.name in ("site-packages", "dist-packages")
    files: dict[Path, str] = {}
    todo = [module]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if name in seen or (top != own and (installed or top == "finetail")):
            continue
        seen.add(name)
        specs = _find_chain(name, [str(root)])
        if specs is None:
            continue
        for i, spec in enumerate(specs):
            f = _origin(spec)
            if f is None or not f.resolve().is_relative_to(root) or f.resolve() in files:
                continue
            files[f.resolve()] = f.resolve().relative_to(root).as_posix()
            if f.suffix == ".py":
                dotted = ".".join(name.split(".")[: i + 1])
                tree = ast.parse(f.read_bytes(), filename=str(f))
                todo.extend(_imports(tree, dotted, f.name == "__init__.py"))
    return sorted(((rel, path) for path, rel in files.items()), key=lambda t: t[0])


def files_digest(files: Iterable[tuple[str, str | Path]]) -> str:
    """sha256 (16 hex digits) over each ``(relative name, path)``'s name and bytes, in order.

    >>> files_digest([]) == hashlib.sha256().hexdigest()[:16]
    True
    """
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()[:16]


def plugin_digest(kind: str, ref: str, search: Sequence[str] | None = None) -> str:
    """The digest of the code plugin ``ref`` runs (:func:`source_files`), without importing it:
    what the workflow adds to the code digest of each job that runs the plugin."""
    return files_digest(source_files(locate(kind, ref).module, search))


# --------------------------------------------------------------------------- loading
@dataclass
class Plugin:
    """A loaded plugin: its callable, where it came from and the digest of its code."""

    kind: str
    target: Target
    fn: Any
    files: list[tuple[str, Path]] = field(default_factory=list)
    digest: str = ""

    @property
    def ref(self) -> str:
        return self.target.ref

    @property
    def head(self) -> str:
        """A loss plugin's head: ``"linear"`` unless the callable says ``head = "normed"``."""
        head = getattr(self.fn, "head", "linear")
        if head not in ("linear", "normed"):
            raise PluginError(f"loss plugin {self.ref!r}: head must be 'linear' or 'normed', got {head!r}")
        return head

    def label(self) -> str:
        """``plugin <ref>, <distribution> <version>, code <digest>`` (no distribution when it is
        not installed)."""
        t = self.target
        return f"plugin {t.ref}, " + (f"{t.distribution} {t.version}, " if t.distribution else "") + f"code {self.digest}"

    def info(self) -> dict[str, Any]:
        """What a run records of its plugin (``metrics.json``'s ``plugin``, the MLflow tags)."""
        t = self.target
        return {"kind": self.kind, "ref": t.ref, "module": t.module, "callable": t.attr,
                "entry_point": t.entry_point, "distribution": t.distribution, "version": t.version,
                "digest": self.digest, "files": [[rel, str(path)] for rel, path in self.files]}


def _purge_stale(module: str, origin: Path | None) -> None:
    """Forget an imported ``module`` (and its submodules) loaded from another file than
    ``origin``: two study folders may each hold a ``plugins.py``."""
    mod = sys.modules.get(module)
    if mod is None or origin is None:
        return
    f = getattr(mod, "__file__", None)
    if f is not None and Path(f).resolve() != origin.resolve():
        for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
            del sys.modules[name]


def load(kind: str, ref: str, search: Sequence[str] | None = None) -> Plugin:
    """Import the plugin ``ref`` of ``kind`` and return it with its code's digest.

    Raises :class:`PluginError` in one line: the module is not found or fails to import (with
    the exception's own message), or has no such callable, or it is not callable.
    """
    target = locate(kind, ref)
    search = search_path() if search is None else list(search)
    try:
        files = source_files(target.module, search)
    except PluginError as e:
        raise PluginError(f"{kind} plugin {ref!r}: {e}") from None
    except (SyntaxError, UnicodeDecodeError) as e:
        raise PluginError(f"{kind} plugin {ref!r}: module {target.module!r} does not import: "
                          f"{type(e).__name__}: {e}") from None
    chain = _find_chain(target.module, search, meta=True)
    origin = _origin(chain[-1]) if chain else None
    _purge_stale(target.module, origin)
    added = [p for p in search if p not in sys.path]
    sys.path.extend(added)  # for the import only: sys.path's own folders come first
    try:
        module = importlib.import_module(target.module)
    except Exception as e:  # a plugin's import may raise anything; report it in one line
        raise PluginError(f"{kind} plugin {ref!r}: module {target.module!r} does not import: "
                          f"{type(e).__name__}: {e}") from None
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    obj: Any = module
    for part in target.attr.split("."):
        if not hasattr(obj, part):
            have = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[:12]
            raise PluginError(f"{kind} plugin {ref!r}: module {target.module!r} has no {target.attr!r} "
                              f"(it has {', '.join(have) or 'no public callable'})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{kind} plugin {ref!r}: {target.module}:{target.attr} is a {type(obj).__name__}, "
                          f"not a callable; a {kind} plugin is {_CALLED_AS[kind]}")
    return Plugin(kind, target, obj, files, files_digest(files))


def _signature(plugin: Plugin) -> inspect.Signature:
    try:
        return inspect.signature(plugin.fn)
    except (TypeError, ValueError):
        raise PluginError(f"{plugin.kind} plugin {plugin.ref!r}: its signature cannot be read; a {plugin.kind} "
                          f"plugin is {_CALLED_AS[plugin.kind]}") from None


def check_signature(plugin: Plugin, params: dict | None = None, where: str = "") -> dict[str, bool]:
    """Check that ``plugin`` can be called as its kind's contract says with the study's
    ``params`` (losses and corrections; a score takes none), and return which optional
    keywords it declares: ``probs`` (scores) and :data:`POSTHOC_EXTRAS` (corrections).

    Raises :class:`PluginError` in one line naming the plugin, the parameters it takes, and
    the unknown and missing keys, or why it cannot be called so.
    """
    params = dict(params or {})
    kind = plugin.kind
    prefix = f"{where}: " if where else ""
    sig = _signature(plugin)
    ps = list(sig.parameters.values())
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in ps)
    var_kw = any(p.kind == p.VAR_KEYWORD for p in ps)
    fixed = _FIXED[kind]
    if len(positional) < len(fixed) and not var_pos:
        raise PluginError(f"{prefix}{kind} plugin {plugin.ref!r} has the signature {sig}: it takes "
                          f"{len(positional)} positional argument(s), but a {kind} plugin is {_CALLED_AS[kind]}")
    named = [p for p in positional[len(fixed):] if p.kind != p.POSITIONAL_ONLY]
    named += [p for p in ps if p.kind == p.KEYWORD_ONLY]
    extras = {"probs"} if kind == "score" else set(POSTHOC_EXTRAS) if kind == "posthoc" else set()
    declared = {p.name: True for p in named if p.name in extras}
    takes = [p.name for p in named if p.name not in extras]
    fixed_names = {p.name for p in positional[: len(fixed)]} | set(fixed)
    if kind == "score" and params:
        raise PluginError(f"{prefix}a score plugin takes no parameters, got {sorted(params)}")
    reserved = sorted(k for k in params if k in extras or k in fixed_names)
    unknown = sorted(k for k in params if k not in takes and k not in reserved and not var_kw)
    missing = [p.name for p in named if p.default is p.empty and p.name not in params and p.name not in extras]
    if reserved or unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown {unknown}")
        if missing:
            parts.append(f"missing {missing}")
        if reserved:
            parts.append(f"{reserved} {'is' if len(reserved) == 1 else 'are'} given by finetail, not the study")
        takes_words = ", ".join(takes) + (", **kwargs" if var_kw else "") or "no parameters"
        raise PluginError(f"{prefix}{kind} plugin {plugin.ref!r} takes {takes_words}; " + "; ".join(parts)
                          + (" (a score's signature must be (features, labels[, probs]))" if kind == "score" else ""))
    if kind == "score" and var_kw:
        declared["probs"] = True
    return declared
