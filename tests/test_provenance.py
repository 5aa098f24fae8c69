"""Provenance keys and miss explanations, through ``run_cell`` the way users hit them."""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import durable_nb as dn
from durable_nb import _hashing
from durable_nb.engine import runtime
from durable_nb.errors import UnhashableInputError

from .helpers import restart, run

# A client in the way an SDK builds one: it holds a lock, so it has no content hash.
CLIENT_CLASS = """
import threading
class Client:
    def __init__(self, base_url):
        self.base_url = base_url
        self._lock = threading.Lock()
    def ask(self, q):
        tick(q)
        return f"{self.base_url}: {q}"
"""
MAKE = 'client = Client("http://a")'
ASK = "%%effect\nanswer = client.ask('hi')\nprint(answer)\n"


def notes(out: str) -> list[str]:
    return re.findall(r"^\[durable_nb\] running this cell again: (.*)$", out, re.M)


def test_a_cell_using_a_client_made_by_a_cell_is_cached_across_restarts(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, CLIENT_CLASS)
    run(ip, MAKE)
    with _no_warnings():
        run(ip, ASK)
        run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi"]
    restart(ip)  # a fresh kernel runs the same cells: same provenance, so it replays
    run(ip, CLIENT_CLASS)
    run(ip, MAKE)
    capsys.readouterr()
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi"]
    assert ip.user_ns["answer"] == "http://a: hi"
    assert "replayed this cell" in capsys.readouterr().out


def test_changing_the_defining_cell_rekeys_the_cells_that_use_the_value(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, CLIENT_CLASS)
    run(ip, MAKE)
    run(ip, ASK)
    run(ip, 'client = Client("http://b")')  # another base_url
    capsys.readouterr()
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi", "hi"]
    assert notes(capsys.readouterr().out) == [
        AnyMatch(r"^input 'client' \(Client\) changed: provenance [0-9a-f]{8} → [0-9a-f]{8}$")
    ]
    run(ip, MAKE)  # back to the first: its record replays
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi", "hi"]
    # recursively: the URL comes from a cell of its own
    run(ip, 'URL = "http://a"')
    run(ip, "client = Client(URL)")
    run(ip, ASK)
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi", "hi", "hi"]
    run(ip, 'URL = "http://c"')
    run(ip, "client = Client(URL)")
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi", "hi", "hi", "hi"]


def test_an_in_place_change_rekeys_the_value_a_method_call_does_not(
    ip: InteractiveShell,
) -> None:
    run(ip, CLIENT_CLASS)
    run(ip, MAKE)
    run(ip, ASK)
    run(ip, 'client.base_url = "http://z"')
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi", "hi"]
    assert ip.user_ns["answer"] == "http://z: hi"
    run(ip, "client.__init__('http://y')")  # not seen: the documented limit
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi", "hi"]


def test_environment_read_by_name_is_part_of_the_key(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DNB_TEST_URL", "http://a")
    run(ip, CLIENT_CLASS)
    make = 'import os\nclient = Client(os.environ["DNB_TEST_URL"])'
    run(ip, make)
    run(ip, ASK)
    run(ip, make)
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi"]
    monkeypatch.setenv("DNB_TEST_URL", "http://b")
    run(ip, make)
    run(ip, ASK)
    assert ip.user_ns["calls"] == ["hi", "hi"]
    # a %%effect cell that reads the environment itself is keyed by it too
    cell = "%%effect\nimport os\ntick(os.getenv('DNB_TEST_URL'))\n"
    run(ip, cell)
    run(ip, cell)
    monkeypatch.setenv("DNB_TEST_URL", "http://c")
    run(ip, cell)
    assert ip.user_ns["calls"] == ["hi", "hi", "http://b", "http://c"]


def test_a_database_connection_is_keyed_by_its_cell(ip: InteractiveShell, tmp_path: Any) -> None:
    make = f"import sqlite3\ncon = sqlite3.connect({str(tmp_path / 'a.db')!r})"
    run(ip, make)
    run(ip, "con.execute('create table t (x)'); con.execute('insert into t values (7)')")
    cell = "%%effect\nrows = con.execute('select x from t').fetchall()\ntick(rows)\n"
    with _no_warnings():
        run(ip, cell)
        run(ip, cell)
    assert ip.user_ns["calls"] == [[(7,)]]
    run(ip, make.replace("a.db", "b.db"))  # another database: another key
    run(ip, "con.execute('create table t (x)')")
    run(ip, cell)
    assert ip.user_ns["calls"] == [[(7,)], []]


def test_a_value_with_neither_key_warns_naming_the_chain(ip: InteractiveShell) -> None:
    ip.user_ns["pushed"] = threading.Lock()  # put there by no cell
    run(ip, "guard = [pushed]")
    with pytest.warns(
        UserWarning,
        match=r"^%%effect: variable 'guard' has no content hash and no provenance \(the cell "
        r"that assigned it read 'pushed', which has none: no cell of this kernel assigned it",
    ):
        run(ip, "%%effect\ntick(len(guard))\n")


def test_effect_arguments_that_are_namespace_objects_use_their_provenance(
    ip: InteractiveShell,
) -> None:
    run(ip, CLIENT_CLASS)
    run(ip, MAKE)
    run(ip, "import durable_nb as dn\n@dn.effect\ndef ask(c, q):\n    return c.ask(q)\n")
    run(ip, "a = ask(client, 'x')")
    run(ip, "a = ask(client, 'x')")
    assert ip.user_ns["calls"] == ["x"]
    run(ip, 'client = Client("http://b")')
    run(ip, "a = ask(client, 'x')")
    assert ip.user_ns["calls"] == ["x", "x"]


def test_a_module_global_is_keyed_by_its_module_outside_a_notebook() -> None:
    import json

    lock = threading.Lock()
    json._durable_nb_test_lock = lock  # type: ignore[attr-defined]
    try:
        digest = _hashing.hash_value({"l": lock})
        assert digest == _hashing.hash_value({"l": lock})
    finally:
        del json._durable_nb_test_lock  # type: ignore[attr-defined]
    with pytest.raises(UnhashableInputError, match=r"^cannot hash value: value\['l'\] is"):
        _hashing.hash_value({"l": threading.Lock()})  # a local: no provenance


# ------------------------------------------------------------------ explanations


def test_the_note_says_which_input_changed_and_what_the_edit_was(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = "%%effect\ny = x * 2\ntick(y)\n"
    run(ip, "x = 1")
    run(ip, cell)
    assert notes(capsys.readouterr().out) == []  # a first run needs no note
    run(ip, "x = 2")
    run(ip, cell)
    assert notes(capsys.readouterr().out) == [
        AnyMatch(r"^input 'x' \(int\) changed: content [0-9a-f]{8} → [0-9a-f]{8}$")
    ]
    run(ip, 'x = "2"')
    run(ip, cell)
    assert notes(capsys.readouterr().out) == ["input 'x' (str) changed: type int → str"]
    ip.run_cell(cell.replace("x * 2", "x * 3"), cell_id="c1")
    ip.run_cell(cell.replace("x * 2", "x * 4"), cell_id="c1")
    assert notes(capsys.readouterr().out) == ["the code changed: -y = x * 3 | +y = x * 4"]
    run(ip, cell.replace("%%effect", "%%effect --force"))
    assert notes(capsys.readouterr().out) == ["--force was given"]


def test_durable_why_explains_cells_after_a_restart(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError, match=r"^no %%effect cell has run in this kernel yet"):
        run(ip, "%durable why")
    cell = "%%effect --name double\ny = x * 2\ntick(y)\n"
    run(ip, "x = 1")
    run(ip, cell)
    run(ip, "%durable why")
    assert capsys.readouterr().out.endswith("executed: first run of this cell\n")
    run(ip, cell)
    run(ip, "%durable why double")
    assert re.search(
        r"replayed the run of .*: nothing it reads changed\n$", capsys.readouterr().out
    )
    run(ip, "x = 5")
    run(ip, cell)
    # a restart: the explanation comes from the store
    run(ip, "%unload_ext durable_nb")
    run(ip, "%load_ext durable_nb")
    restart(ip)
    capsys.readouterr()
    run(ip, "%durable why double")
    assert re.fullmatch(
        r"executed: input 'x' \(int\) changed: content [0-9a-f]{8} → [0-9a-f]{8}\n",
        capsys.readouterr().out,
    )
    with pytest.raises(UsageError, match=r"^nothing called 'nope' ran in this notebook"):
        run(ip, "%durable why nope")


def test_durable_why_explains_effects_and_run_steps(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str], clock: dn.FakeClock
) -> None:
    run(ip, "import durable_nb as dn\n@dn.effect\ndef double(v):\n    return v * 2\n")
    run(ip, "double(1)")
    run(ip, "%durable why double")
    assert re.search(r"double executed at .*: first call", capsys.readouterr().out)
    run(ip, "double(2)")
    run(ip, "%durable why double")
    assert re.search(
        r": its arguments changed \(input [0-9a-f]{8} → [0-9a-f]{8}\): before \(1\), now \(2\)\n$",
        capsys.readouterr().out,
    )
    run(ip, "n = 3")  # read by the run, not part of its code: the same run id when it changes
    run(ip, "%%durable r1\na = await ctx.run(double, n)\n")
    run(ip, "%durable why r1 0")
    assert re.search(
        r"^step 0 \(__main__\.double\) of r1: executed: first call with this key in this run",
        capsys.readouterr().out,
        re.M,
    )
    run(ip, "n = 4")
    clock.advance(60)  # the explanation compares with the step recorded before it
    run(ip, "%%durable r1\na = await ctx.run(double, n)\n")
    run(ip, "%durable why r1 double")
    assert re.search(
        r"of r1: executed: its arguments changed \(input [0-9a-f]{8} → [0-9a-f]{8}\): "
        r"before \(3\), now \(4\)\n$",
        capsys.readouterr().out,
    )
    with pytest.raises(UsageError, match=r"^'r1' is a run; name one of its steps"):
        run(ip, "%durable why r1")
    with pytest.raises(UsageError, match=r"^run 'r1' has no step '9'"):
        run(ip, "%durable why r1 9")


# ------------------------------------------------------------------ helpers


class AnyMatch(str):
    """Equal to any string the pattern matches (for list comparisons)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.search(str(self), other) is not None

    __hash__ = str.__hash__


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


_ = (dn, runtime)
