"""The IPython extension: ``%%effect``, ``%%durable`` and ``%durable``.

``%load_ext durable_nb`` registers the magics and the ``pre_run_cell``/``post_run_cell``
hooks (occurrences of top-level effects are counted afresh for each cell; the provenance of
what each cell assigns is tracked); ``%unload_ext durable_nb`` removes them all, so
``%reload_ext`` is idempotent. This package is the only one that imports IPython:
``_magics`` holds the magics, ``_outputs`` how a cell's outputs are captured and replayed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from IPython.core.interactiveshell import InteractiveShell

from .._provenance import tracker
from ..engine import runtime
from ._magics import DurableMagics

__all__ = ["DurableMagics", "load_ipython_extension", "unload_ipython_extension"]

# ---------------------------------------------------------------------------- load / unload

_loaded: dict[int, tuple[DurableMagics, Callable[..., None], Callable[..., None]]] = {}


def _notebook_name(ip: InteractiveShell) -> str:
    path = ip.user_ns.get("__vsc_ipynb_file__") or os.environ.get("JPY_SESSION_NAME")
    return str(path) if path else "interactive"


def load_ipython_extension(ip: InteractiveShell) -> None:
    if id(ip) in _loaded:
        return
    magics = DurableMagics(ip)
    ip.register_magics(magics)

    def pre_run_cell(info: Any = None) -> None:
        runtime.top.reset()
        magics.cell_id = getattr(info, "cell_id", None)
        raw = getattr(info, "raw_cell", None)
        tracker.begin_cell((lambda: magics.plain_source(raw)) if isinstance(raw, str) else None)

    def post_run_cell(result: Any = None) -> None:
        raw = getattr(getattr(result, "info", None), "raw_cell", None)
        if isinstance(raw, str):
            source = magics.plain_source(raw)
            if source is not None:
                tracker.after_cell(source)

    ip.events.register("pre_run_cell", pre_run_cell)
    ip.events.register("post_run_cell", post_run_cell)
    tracker.attach(ip.user_ns, ip.user_ns_hidden)
    runtime.set_top_scope(_notebook_name(ip))
    _loaded[id(ip)] = (magics, pre_run_cell, post_run_cell)


def unload_ipython_extension(ip: InteractiveShell) -> None:
    entry = _loaded.pop(id(ip), None)
    if entry is None:
        return
    magics, pre, post = entry
    ip.events.unregister("pre_run_cell", pre)
    ip.events.unregister("post_run_cell", post)
    tracker.detach()
    for kind in ("cell", "line"):
        for name in list(magics.magics[kind]):
            ip.magics_manager.magics[kind].pop(name, None)
    ip.magics_manager.registry.pop(type(magics).__name__, None)
