"""The trace as static HTML: what nbconvert and GitHub show where the live widget cannot run.

Inline styles only (renderers that strip ``<style>`` keep them) and no script. Runs of
replayed steps fold into one line, and a very long run shows its first and last rows, so
the picture stays small whatever the run's length.
"""

from __future__ import annotations

from collections.abc import Iterator
from html import escape

from ._messages import RunInfo, StepRow, Totals, Waiting

__all__ = ["COLOURS", "fold_rows", "static_html"]

#: state -> (background, text); the front-end's stylesheet uses the same colours
COLOURS: dict[str, tuple[str, str]] = {
    "executed": ("#2e7d32", "#ffffff"),
    "replayed": ("#1565c0", "#ffffff"),
    "running": ("#f9a825", "#000000"),
    "waiting": ("#8e24aa", "#ffffff"),
    "failed": ("#c62828", "#ffffff"),
}
_STATUS_COLOURS = {
    "completed": "executed",
    "running": "running",
    "waiting": "waiting",
    "failed": "failed",
    "cancelled": "failed",
    "interrupted": "failed",
}
FOLD_AT = 8  # this many consecutive replayed steps or more fold into one line
HEAD, TAIL = 150, 50  # rows shown of a very long run


def fold_rows(rows: list[StepRow]) -> Iterator[StepRow | tuple[int, int, float]]:
    """The rows, with each run of ``FOLD_AT`` or more replayed steps as
    ``(first index, count, seconds saved)``."""
    i, n = 0, len(rows)
    while i < n:
        j = i
        while j < n and rows[j]["state"] == "replayed":
            j += 1
        if j - i >= FOLD_AT:
            yield (i, j - i, sum(r["duration"] for r in rows[i:j]))
            i = j
            continue
        yield from rows[i : max(j, i + 1)]
        i = max(j, i + 1)


def _ms(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def _badge(state: str, text: str | None = None) -> str:
    bg, fg = COLOURS.get(state, ("#757575", "#ffffff"))
    return (
        f'<span style="background:{bg};color:{fg};border-radius:3px;padding:0 5px;'
        f'font-size:11px">{escape(text or state)}</span>'
    )


def _row_html(row: StepRow, longest: float) -> str:
    bg, _ = COLOURS.get(row["state"], ("#757575", ""))
    width = 0.0 if longest <= 0 else max(1.0, 100.0 * row["duration"] / longest)
    bar = f'<div style="background:{bg};height:8px;width:{width:.1f}%;opacity:.7"></div>'
    extra = escape(row["error"] or row["args"])
    return (
        f'<tr data-state="{row["state"]}"><td style="color:#757575;text-align:right">'
        f"{row['seq'] if row['seq'] >= 0 else ''}</td>"
        f"<td>{_badge(row['state'])}</td>"
        f'<td title="{escape(row["name"])}"><code>{escape(row["label"])}</code>'
        f' <span style="color:#757575">{extra[:120]}</span></td>'
        f'<td style="width:25%">{bar}</td>'
        f'<td style="text-align:right;white-space:nowrap">{_ms(row["duration"])}</td></tr>'
    )


def static_html(run: RunInfo, rows: list[StepRow], totals: Totals, waiting: list[Waiting]) -> str:
    """A self-contained HTML picture of the run's timeline."""
    status = run["status"]
    head = (
        f"<b>run</b> <code>{escape(run['run_id'])}</code> "
        f"{_badge(_STATUS_COLOURS.get(status, 'running'), status)}"
    )
    if run["detail"]:
        head += f' <span style="color:#555">{escape(run["detail"])}</span>'
    summary = (
        f"{totals['steps']} steps · {totals['executed']} executed · "
        f"{totals['replayed']} replayed · {totals['failed']} failed · "
        f"saved {_ms(totals['saved_seconds'])}"
    )
    longest = max((r["duration"] for r in rows), default=0.0)
    items = list(fold_rows(rows))
    hidden = 0
    if len(items) > HEAD + TAIL:
        hidden = len(items) - HEAD - TAIL
        items = [*items[:HEAD], *items[-TAIL:]]
    body: list[str] = []
    for k, item in enumerate(items):
        if hidden and k == HEAD:
            body.append(
                f'<tr><td></td><td colspan="4" style="color:#757575">… {hidden} more lines '
                "(open the notebook to see them all)</td></tr>"
            )
        if isinstance(item, tuple):
            _, count, saved = item
            body.append(
                f'<tr data-state="replayed"><td></td><td>{_badge("replayed")}</td>'
                f'<td colspan="2">{count} replayed steps</td>'
                f'<td style="text-align:right;white-space:nowrap">saved {_ms(saved)}</td></tr>'
            )
        else:
            body.append(_row_html(item, longest))
    waits = "".join(
        f"<li>waiting for signal <code>{escape(w['name'])}</code></li>"
        if w["kind"] == "signal"
        else f"<li>waiting until {escape(w['until'])}</li>"
        for w in waiting
    )
    return (
        '<div class="durable-nb-trace" style="font-family:sans-serif;font-size:12px">'
        f"<div>{head}</div><div style='color:#555;margin:2px 0 4px'>{summary}</div>"
        + (f"<ul style='margin:2px 0'>{waits}</ul>" if waits else "")
        + '<table style="border-collapse:collapse;width:100%">'
        + "".join(body)
        + "</table></div>"
    )
