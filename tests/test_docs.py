"""The guide's feature table (docs/workflows.md) names tests that exist (docs are checked by
tests)."""

from __future__ import annotations

import re

from .helpers import ROOT


def test_every_test_the_feature_table_names_exists() -> None:
    guide = (ROOT / "docs" / "workflows.md").read_text()
    section = guide.split("## Workflow features", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(?:tests/(test_\w+)\.py::)?(test_\w+)`", section))
    assert len(named) >= 30, "the feature table lost its tests"
    sources = {p.stem: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    for module, name in sorted(named):
        where = [sources[module]] if module else list(sources.values())
        assert any(re.search(rf"^(async )?def {name}\(", src, re.M) for src in where), (
            f"docs/workflows.md names {name!r}, which no test file defines"
        )
    for path in re.findall(r"`(tests/test_\w+\.py)", section):
        assert (ROOT / path).is_file(), path
