"""Processes sharing one DuckDB store (issue 20, item 2): the fair hand-off of the file.

Each process is a separate interpreter on the same store, each with its own notebook
scope (``DURABLE_NB_SCOPE``), started together:

* ``wf``: a ``@durable`` workflow recording an effect every 100 ms (the busy notebook A);
* ``nb``: notebook-level ``@effect`` calls with new arguments every 50 ms (notebook B).

Per process it reports the effect calls made, their latency (p50/p99/max, everything the
call costs, the first one included) and how long each open of the file waited for another
process (p50/p99, and how many opens waited). The scenarios: A alone, A with one B, and
ten processes (two A, eight B). Afterwards a fresh process calls every effect again and
counts executions: a recorded effect is not executed again, so the count must be 0.

    python benchmarks/bench_sharing.py [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import durable_nb as dn

    role, seconds, period = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    executed = 0

    @dn.effect(name="bench_sharing.tick")
    def tick(i):
        global executed
        executed += 1
        return i

    lat = []

    def timed(i):
        t = time.perf_counter()
        assert tick(i) == i
        lat.append(time.perf_counter() - t)

    @dn.durable(name="bench_sharing.wf")
    async def wf(ctx, seconds, period):
        i, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            timed(i)
            i += 1
            time.sleep(period)
        return i

    print("ready", flush=True)
    sys.stdin.readline()  # go
    t0 = time.perf_counter()
    if role == "wf":
        n = dn.run(wf, seconds, period, run_id="wf-" + sys.argv[4])
    elif role == "nb":
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            timed(n)
            n += 1
            time.sleep(period)
    elif role == "replay-nb":  # call every recorded effect again, count executions
        n = int(sys.argv[4])
        for i in range(n):
            timed(i)
    else:  # replay-wf: the finished run returns its result without executing anything
        n = dn.run(wf, seconds, period, run_id="wf-" + sys.argv[4])
    elapsed = time.perf_counter() - t0
    store = dn.get_store()
    file = getattr(store, "_file", None)  # the DuckDB store's hold on its file
    waits = list(getattr(file, "waits", ()))
    opens = getattr(file, "opens", 0)
    store.close()
    print(json.dumps({"calls": n, "lat": lat, "waits": waits, "opens": opens,
                      "executed": executed,
                      "elapsed": elapsed}), flush=True)
    """
)


def _env(store: Path, scope: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DURABLE_NB_STORE": str(store),
        "DURABLE_NB_SCOPE": scope,
    }


WF_PERIOD = 0.1  # seconds between the workflow's effects
NB_PERIOD = 0.05  # seconds between the notebook's effect calls


def _period(role: str) -> float:
    return WF_PERIOD if role == "wf" else NB_PERIOD


def run_processes(
    store: Path, roles: list[tuple[str, str]], seconds: float, *, timeout: float = 300
) -> list[dict[str, Any]]:
    """Start one process per ``(role, tag)`` on ``store``, let them go together, and
    return each one's report (with ``role``, ``tag``, ``returncode`` and ``stderr``)."""
    procs = []
    for role, tag in roles:
        period = _period(role)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, role, str(seconds), str(period), tag],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(store, f"notebook-{tag}"),
            )
        )
    out = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a child did not start: {line!r} {p.communicate()[1]}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for (role, tag), p in zip(roles, procs, strict=True):
            stdout, stderr = p.communicate(timeout=timeout)
            lines = stdout.strip().splitlines()
            report = json.loads(lines[-1]) if p.returncode == 0 and lines else {}
            out.append(
                {"role": role, "tag": tag, "returncode": p.returncode, "stderr": stderr, **report}
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def replay(
    store: Path, role: str, tag: str, calls: int, seconds: float, period: float
) -> dict[str, Any]:
    """Call the effects of process ``tag`` again in a fresh process (or run its workflow
    again, with the same arguments)."""
    arg = tag if role == "wf" else str(calls)
    p = subprocess.run(
        [sys.executable, "-c", CHILD, f"replay-{role}", str(seconds), str(period), arg],
        input="go\n",
        capture_output=True,
        text=True,
        env=_env(store, f"notebook-{tag}"),
        timeout=120,
    )
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def scenario(name: str, roles: list[tuple[str, str]], seconds: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "store.duckdb"
        reports = run_processes(store, roles, seconds)
        for r in reports:
            if r["returncode"] != 0:
                raise RuntimeError(f"{name}: {r['role']} {r['tag']} failed: {r['stderr']}")
            again = replay(store, r["role"], r["tag"], r["calls"], seconds, _period(r["role"]))
            if again["calls"] != r["calls"]:
                raise RuntimeError(f"{name}: {r['tag']} replayed {again['calls']} calls")
            r["replay_executed"] = again["executed"]
        rows = []
        for r in reports:
            lat, waits = r["lat"], r["waits"]
            rows.append(
                {
                    "scenario": name,
                    "process": f"{r['role']}-{r['tag']}",
                    "calls": r["calls"],
                    "p50_ms": _pct(lat, 0.5) * 1e3,
                    "p99_ms": _pct(lat, 0.99) * 1e3,
                    "max_ms": max(lat) * 1e3 if lat else 0.0,
                    "mean_ms": sum(lat) / len(lat) * 1e3 if lat else 0.0,
                    "opens": r["opens"],
                    "waited_opens": len(waits),
                    "wait_p50_ms": _pct(waits, 0.5) * 1e3,
                    "wait_p99_ms": _pct(waits, 0.99) * 1e3,
                    "re_executed": r["replay_executed"],
                }
            )
        return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    seconds = 4.0 if quick else 20.0
    rows = scenario("A alone", [("wf", "a")], seconds)
    rows += scenario("A + B", [("wf", "a"), ("nb", "b")], seconds)
    ten = [("wf", "a1"), ("wf", "a2")] + [("nb", f"b{i}") for i in range(8)]
    rows += scenario("10 processes", ten, seconds)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | process | effect calls | call p50 | call p99 | call max | call mean "
        "| opens (waited) | wait p50 | wait p99 | re-executed on replay |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['process']} | {r['calls']} | {r['p50_ms']:.2f} ms "
            f"| {r['p99_ms']:.2f} ms | {r['max_ms']:.1f} ms | {r['mean_ms']:.2f} ms "
            f"| {r['opens']} ({r['waited_opens']}) | {r['wait_p50_ms']:.0f} ms | {r['wait_p99_ms']:.0f} ms "
            f"| {r['re_executed']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    started = time.time()
    result = run(quick="--quick" in sys.argv)
    print(table(result))
    print(
        f"\n({time.time() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
