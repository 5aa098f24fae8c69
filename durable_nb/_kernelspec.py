"""The "Python 3 (durable)" Jupyter kernel: IPython's kernel with ``durable_nb`` loaded at start.

The kernel is ipykernel's own; only its command line differs, by one option that loads the
extension (``%%effect``, ``%%durable``, ``%durable`` are there without ``%load_ext``). The
option is ``extra_extensions``, which adds to the extensions a user configured in their
IPython profile instead of replacing them as ``extensions`` would.

``extension/kernelspec/kernel.json`` is the same spec as a file, with ``{python}`` standing for
the interpreter; ``install`` writes it with ``sys.executable``, the Python that has
durable_nb (a test holds the file and :func:`kernel_json` together). ipykernel and
jupyter_client are imported only when installing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import (
    KernelSpecError,
)

__all__ = ["DEFAULT_NAME", "DISPLAY_NAME", "PYTHON", "install", "interpreter", "kernel_json"]

DEFAULT_NAME = "durable"
DISPLAY_NAME = "Python 3 (durable)"
PYTHON = "{python}"  # stands for the interpreter in the template file
EXTENSION_OPTION = "--IPKernelApp.extra_extensions=durable_nb"
_MISSING_EXTRA = "install the notebook extra: pip install 'durable_nb[notebook]'"


def kernel_json(python: str = PYTHON) -> dict[str, Any]:
    """The kernel.json of the spec, launching ``python`` (the template's placeholder if not
    given)."""
    return {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}", EXTENSION_OPTION],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "metadata": {"debugger": True},
    }


def interpreter() -> str:
    """The Python the installed kernel runs: this one (not resolved: a venv's python is a
    symlink, and its target is outside the venv)."""
    return os.path.abspath(sys.executable)


def install(
    *, name: str = DEFAULT_NAME, user: bool = False, prefix: str | None = None
) -> tuple[str, bool]:
    """Install the spec as kernel ``name``: for this user (``user``), under ``prefix``
    (``PREFIX/share/jupyter/kernels/NAME``), or system-wide when neither is given. An existing
    spec of that name is replaced. Returns the directory written and whether Jupyter looks
    there (a ``prefix`` may be off its path).

    The metadata is completed with the installed ipykernel's own (what it supports, such as
    the debugger or transport encryption, depends on its version), and the spec gets its logos.
    """
    python = interpreter()
    try:
        from ipykernel.kernelspec import RESOURCES, get_kernel_dict
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError as e:
        raise KernelSpecError(f"{e.name} is not installed in {python}; {_MISSING_EXTRA}") from None
    if user and prefix is not None:
        raise ValueError("choose one of user and prefix")
    spec = kernel_json(python)
    spec["metadata"] = {**spec["metadata"], **get_kernel_dict()["metadata"]}
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, name)
        os.mkdir(source)
        with open(os.path.join(source, "kernel.json"), "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=1)
            f.write("\n")
        for logo in sorted(Path(RESOURCES).glob("logo-*")):
            shutil.copy(logo, source)
        # its own logger, quiet: it warns when PREFIX is off Jupyter's path; we return that
        ksm = KernelSpecManager(log=_quiet_logger())
        try:
            dest = str(ksm.install_kernel_spec(source, name, user=user, prefix=prefix))
        except OSError as e:  # most often: system-wide, without the permission
            raise KernelSpecError(
                f"cannot write the kernel spec to {e.filename} ({e.strerror}); install it for "
                "yourself with --user, or into this environment with --sys-prefix"
            ) from None
    return dest, os.path.dirname(dest) in ksm.kernel_dirs


def _quiet_logger() -> logging.Logger:
    log = logging.getLogger("durable_nb.kernelspec")
    log.setLevel(logging.ERROR)
    return log
