"""What a cell reads, writes and changes: the static analysis behind ``%%effect`` keys and
provenance keys (guide, "In a notebook").

A cell is analysed from its source, never by running it: the names it reads before
assigning them (its inputs), the names it assigns, the variables it changes in place by an
assignment to an attribute or item (``client.base_url = ...``), the environment variables it
reads by a literal name (``os.environ["X"]``, ``os.environ.get("X")``, ``os.getenv("X")``)
and the packages it imports. Analyses are cached by source, so a cell run again costs a
dict lookup.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass

__all__ = ["Cell", "analyse", "analyse_cell", "normalized"]


class _Names(ast.NodeVisitor):
    """Names a cell reads before it assigns them (its inputs) and names it assigns."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.writes: list[str] = []
        self.mutates: list[str] = []  # roots of `x.attr = ...`, `x[k] = ...`, `del x.attr`
        self.env: list[str] = []  # environment variables read by a literal name
        self.imports: list[str] = []  # top-level packages the cell imports
        self._bound: set[str] = set()
        self._local: list[set[str]] = []
        self._in_function = 0  # > 0 inside a def or lambda body: reads happen when called
        self.immediate: set[str] = set()  # reads made while the cell runs

    def _target(self, node: ast.expr) -> None:
        """An assignment target: a name is written; `a.b[c] = ...` changes `a` in place."""
        root = node
        while isinstance(root, (ast.Attribute, ast.Subscript)):
            root = root.value
        if (
            root is not node
            and isinstance(root, ast.Name)
            and not self._local
            and root.id not in self.mutates
        ):
            self.mutates.append(root.id)
        if isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                self._target(elt.value if isinstance(elt, ast.Starred) else elt)

    def _read(self, name: str) -> None:
        if any(name in scope for scope in self._local):
            return
        if name not in self._bound:
            if name not in self.reads:
                self.reads.append(name)
            if not self._in_function:
                self.immediate.add(name)

    def _write(self, name: str) -> None:
        if self._local:
            self._local[-1].add(name)
            return
        self._bound.add(name)
        if name not in self.writes:
            self.writes.append(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._read(node.id)
        else:
            self._write(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)  # the value is read before the targets are bound
        for t in node.targets:
            self._target(t)
            self.visit(t)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self._read(node.target.id)
        self._target(node.target)
        self.visit(node.target)

    def visit_Delete(self, node: ast.Delete) -> None:
        for t in node.targets:
            self._target(t)
            self.visit(t)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        name = _env_name(node.value, node.slice)
        if name is not None and name not in self.env:
            self.env.append(name)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if (
            isinstance(f, ast.Attribute)
            and node.args
            and (
                (f.attr == "get" and _is_environ(f.value))
                or (f.attr == "getenv" and _is_os(f.value))
            )
        ):
            name = _literal(node.args[0])
            if name is not None and name not in self.env:
                self.env.append(name)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] if not node.level else []
        else:
            modules = [alias.name for alias in node.names]
        for module in modules:
            top = module.split(".")[0]
            if top and top not in self.imports:
                self.imports.append(top)
        for alias in node.names:
            if alias.name != "*":
                self._write(alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for d in getattr(node, "decorator_list", []):
            self.visit(d)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        if not isinstance(node, ast.Lambda):
            self._write(node.name)
        args = node.args
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        self._local.append(params)
        self._in_function += 1
        body = [node.body] if isinstance(node, ast.Lambda) else node.body
        for stmt in body:
            self.visit(stmt)
        self._in_function -= 1
        self._local.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        self._write(node.name)
        self._local.append(set())
        for stmt in node.body:
            self.visit(stmt)
        self._local.pop()

    def _comprehension(
        self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp
    ) -> None:
        self._local.append(set())
        for gen in node.generators:
            self.visit(gen.iter)
            self.visit(gen.target)
            for cond in gen.ifs:
                self.visit(cond)
        if isinstance(node, ast.DictComp):
            self.visit(node.key)
            self.visit(node.value)
        else:
            self.visit(node.elt)
        self._local.pop()

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension


def _is_os(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "os"


def _is_environ(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and _is_os(node.value)


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _env_name(value: ast.expr, index: ast.expr) -> str | None:
    return _literal(index) if _is_environ(value) else None


def analyse_cell(tree: ast.Module) -> tuple[list[str], list[str]]:
    """``(reads, writes)``: names read before assignment, and names the cell assigns."""
    names = _Names()
    for stmt in tree.body:
        names.visit(stmt)
    return names.reads, names.writes


def normalized(tree: ast.Module) -> str:
    """The cell's code without comments or formatting: what its key sees of its source."""
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


@dataclass(frozen=True, slots=True)
class Cell:
    """One cell's analysis (see the module docstring)."""

    tree_dump: str
    reads: tuple[str, ...]
    deferred: tuple[str, ...]  # reads only inside function bodies: made when called
    writes: tuple[str, ...]
    mutates: tuple[str, ...]
    env: tuple[str, ...]
    imports: tuple[str, ...]


@functools.lru_cache(maxsize=1024)
def analyse(source: str) -> Cell | None:
    """The analysis of a cell's (transformed) source; None when it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    names = _Names()
    for stmt in tree.body:
        names.visit(stmt)
    return Cell(
        normalized(tree),
        tuple(names.reads),
        tuple(n for n in names.reads if n not in names.immediate),
        tuple(names.writes),
        tuple(names.mutates),
        tuple(names.env),
        tuple(names.imports),
    )
