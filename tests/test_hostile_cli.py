"""Hostile command lines and magic lines run, or are refused without a traceback (the CLI:
exit code 1 or 2; magics: IPython's ``UsageError`` or one of durable_nb's errors), and a
refused one leaves the store as it was; on DuckDB and on PostgreSQL (issue 20, item 6; what
the properties share: ``hostile.py``)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.store import Store
from durable_nb.store._duckdb import DuckDBStore

from .conftest import PG_TEST_KEY
from .hostile import PROFILE, STORE_KINDS, count, entry, exported, fingerprint, own_error, timed

CLI_COMMANDS = [
    "runs",
    "show",
    "trace",
    "tree",
    "signal",
    "cancel",
    "resume",
    "fork",
    "forget",
    "gc",
    "export",
    "import",
    "metrics",
]
#: never generated: options that import modules (--app), write where they are told (-o,
#: --store with a path of the generator's choosing), or commands that serve forever
#: (worker) or install files outside the test's folder (install-kernel)
_UNSAFE = {"--app", "-o", "--output", "--store", "worker", "install-kernel"}
CLI_TOKENS = st.sampled_from(
    [
        "--json",
        "--status",
        "--limit",
        "--since",
        "--older-than",
        "--dry-run",
        "--reason",
        "--from-step",
        "--run-id",
        "--keep-runs",
        "--replace",
        "--scope",
        "--help",
        "-x",
        "--",
        "0",
        "-1",
        "1e999",
        "nan",
        "7d",
        "cli-run",
        "{}",
        "[1,",
        "\x00",
        "",
    ]
) | st.text(max_size=12)
CLI_ARGV = st.tuples(
    st.sampled_from(CLI_COMMANDS) | st.text(max_size=8), st.lists(CLI_TOKENS, max_size=5)
)


@pytest.mark.parametrize("store_pair", STORE_KINDS, indirect=True)
def test_cli_arguments_run_or_are_refused_without_a_traceback(
    store_pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    from durable_nb.cli import main

    writer, reader = store_pair
    name = entry("CLI arguments", writer)
    job = dn.start(exported, 1, run_id="cli-run")
    job.signal("go", 1)
    job.result(timeout=30)
    if isinstance(writer, DuckDBStore):
        url = str(writer.path)
    else:  # the command's store signs with the key of the test's stores
        url = writer.url  # type: ignore[attr-defined]
        monkeypatch.setenv("DURABLE_NB_KEY", PG_TEST_KEY.decode())
    writer.close()
    runtime._store = None

    @PROFILE
    @given(CLI_ARGV)
    def check(argv_parts: tuple[str, list[str]]) -> None:
        argv = [argv_parts[0], *argv_parts[1]]
        if any(a in _UNSAFE or a.startswith(("--app", "--store", "--output")) for a in argv):
            return
        before = fingerprint(reader)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--store", url, *argv])
        text = out.getvalue() + err.getvalue()
        assert code in (0, 1, 2), (argv, code, text)
        assert "Traceback" not in text, (argv, text)
        if code != 0:
            assert fingerprint(reader) == before, f"{argv!r} failed but changed the store"
            count(name, "refused")
        else:
            count(name, "stored")

    with timed(name):
        check()


MAGIC_LINES = st.tuples(
    st.sampled_from(["runs", "show", "signal", "cancel", "forget", "cache", "why", ""])
    | st.text(max_size=8),
    st.lists(CLI_TOKENS | st.sampled_from(["magic-run", "'x y'", '"', "\\", "clear"]), max_size=4),
)


@pytest.mark.parametrize("store_pair", STORE_KINDS, indirect=True)
def test_magic_arguments_run_or_are_refused_with_a_usage_error(
    store_pair: tuple[Store, Store], ip: Any
) -> None:
    from IPython.core.error import UsageError

    store = store_pair[0]
    name = entry("magic arguments", store)
    job = dn.start(exported, 1, run_id="magic-run")
    job.signal("go", 1)
    job.result(timeout=30)

    def state() -> Any:
        return [
            (r.run_id, r.status, r.updated_at, len(store.list_signals(r.run_id)))
            for r in store.list_runs()
        ]

    @PROFILE
    @given(MAGIC_LINES, st.sampled_from(["durable", "effect", "durable-cell"]))
    def check(parts: tuple[str, list[str]], magic: str) -> None:
        line = " ".join([parts[0], *parts[1]])
        if line.split()[:1] == ["store"] or (magic != "durable" and line.strip()):
            line = " ".join(parts[1])  # %durable store would change the store under the test
        before = state()
        try:
            if magic == "durable":
                ip.run_line_magic("durable", line)
            else:
                cell = "effect" if magic == "effect" else "durable"
                ip.run_cell_magic(cell, line, "magic_y = 1\n")
        except UsageError:
            assert state() == before, f"%{magic} {line!r} was refused but changed the store"
            count(name, "refused")
        except Exception as e:
            assert own_error(e), f"%{magic} {line!r} raised {e!r}"
            assert state() == before
            count(name, "refused")
        else:
            count(name, "stored")

    with timed(name):
        check()
