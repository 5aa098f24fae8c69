"""Hatch build hook: put the trace widget's front-end bundle into the wheel and the sdist.

The bundle (``durable_nb/static/trace_widget.js``) is built from ``extension/widget`` with
npm and is git-ignored. In a clone the hook builds it when it is missing or older than its
sources; building from an sdist (which carries the bundle, not the sources) uses it as is.
Editable installs skip the hook: ``scripts/setup.sh`` builds the bundle for them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BUNDLE = Path("durable_nb") / "static" / "trace_widget.js"
SOURCES = Path("extension") / "widget"


def _newest(folder: Path) -> float:
    files = [p for p in (folder / "src").rglob("*") if p.is_file()]
    files += [folder / "package.json", folder / "package-lock.json"]
    return max((p.stat().st_mtime for p in files if p.exists()), default=0.0)


class WidgetBundleHook(BuildHookInterface):  # type: ignore[type-arg]  # generic in hatchling
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        root = Path(self.root)
        bundle, sources = root / BUNDLE, root / SOURCES
        stale = not bundle.exists() or (
            sources.is_dir() and _newest(sources) > bundle.stat().st_mtime
        )
        if stale and sources.is_dir():
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError(
                    f"building durable_nb needs npm (Node.js 18+) to build the widget bundle "
                    f"{BUNDLE} from {SOURCES}; install Node.js, or build from an sdist, which "
                    "carries the bundle"
                )
            if not (sources / "node_modules").is_dir():
                subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=sources, check=True)
            subprocess.run([npm, "run", "build"], cwd=sources, check=True)
        if not bundle.exists():
            raise RuntimeError(
                f"the widget bundle {BUNDLE} is missing and there are no sources to build it "
                f"from ({SOURCES}); build from a clone or an sdist of durable_nb"
            )
        build_data.setdefault("artifacts", []).append(BUNDLE.as_posix())
