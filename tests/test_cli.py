"""The durable-nb command: every command in-process (output parsed, exit codes, error text)
and as users run it, in a subprocess, next to a "notebook" process that uses the store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

import durable_nb as dn
from durable_nb.cli import cli, main
from durable_nb.store import RunRecord

from .helpers import ROOT

T0 = "2023-11-14T00:00+00:00"  # the FakeClock starts on 2023-11-14 22:13:20 UTC


@dn.effect
def add(a: int, b: int) -> int:
    return a + b


@dn.effect
def ratio(a: int, b: int) -> Fraction:  # no codec but pickle: a signed payload
    return Fraction(a, b)


@dn.durable(name="leaf")
async def leaf(ctx: dn.Context, n: int) -> int:
    return add(n, 1)


@dn.durable(name="adder")
async def adder(ctx: dn.Context) -> int:
    ctx.set_status({"stage": "adding"})
    r = ratio(1, 2)
    return add(1, 2) + await ctx.child(leaf, 3) + int(r * 2)


@dn.durable(name="broken")
async def broken(ctx: dn.Context) -> int:
    add(5, 5)
    raise RuntimeError("it broke")


@pytest.fixture
def store_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DuckDB store with a completed run (r1) and its child, a failed run (f1) and a run
    waiting for a signal that no process executes (w1)."""
    monkeypatch.delenv("DURABLE_NB_STORE", raising=False)
    monkeypatch.delenv("DURABLE_NB_KEY", raising=False)
    path = tmp_path / "s.duckdb"
    dn.set_store(str(path))
    assert dn.run(adder, run_id="r1") == 3 + 4 + 1
    with pytest.raises(RuntimeError):
        dn.run(broken, run_id="f1")
    store = dn.get_store()
    store.put_run(
        RunRecord(
            "w1", "approval", "waiting", 1_700_000_100.0, 1_700_000_100.0, detail='{"signal": "ok"}'
        )
    )
    store.close()
    return path


def cmd(capsys: pytest.CaptureFixture[str], path: Path | str, *args: str) -> tuple[int, str, str]:
    code = main(["--store", str(path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_runs_table_json_and_filters(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cmd(capsys, store_path, "runs")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "UPDATED", "WORKFLOW", "PARENT"]
    assert re.search(r"^r1 +completed +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  adder$", out, re.M)
    assert re.search(r"^r1/leaf-0-\w+ +completed .* leaf +r1$", out, re.M)
    assert re.search(r"^f1 +failed ", out, re.M)
    code, out, _ = cmd(capsys, store_path, "runs", "--json")
    rows = json.loads(out)
    assert len(rows) == 4
    assert {r["run_id"] for r in rows if r["parent_id"] is None} == {"r1", "f1", "w1"}
    r1 = next(r for r in rows if r["run_id"] == "r1")
    assert r1["custom_status"] == {"stage": "adding"} and r1["executions"] == 1

    def ids(*args: str) -> list[str]:
        code, out, err = cmd(capsys, store_path, "runs", "--json", *args)
        assert code == 0, err
        return sorted(r["run_id"] for r in json.loads(out))

    assert ids("--status", "failed") == ["f1"]
    assert ids("--workflow", "adder") == ["r1"]
    assert ids("--parent", "r1")[0].startswith("r1/leaf-0-")
    assert len(ids("--limit", "2")) == 2
    assert len(ids("--since", T0)) == 4
    assert ids("--until", T0) == []
    assert ids("--since", "1h") == []  # the runs are dated 2023 (fake clock)
    code, out, _ = cmd(capsys, store_path, "runs", "--status", "failed")
    assert out.splitlines()[0].split() == ["RUN", "STATUS", "UPDATED", "WORKFLOW"]
    assert cmd(capsys, store_path, "runs", "--workflow", "nothing")[1] == "no runs\n"


def test_runs_misuse_exits_2(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cmd(capsys, store_path, "runs", "--status", "done")
    assert code == 2
    assert "Invalid value for '--status': 'done' is not one of 'queued', 'running'" in err
    code, _, err = cmd(capsys, store_path, "runs", "--since", "yesterday")
    assert code == 2
    assert "Invalid value for --since: a time must be epoch seconds" in err
    code, _, err = cmd(capsys, store_path, "runs", "--limit", "0")
    assert code == 2
    code, _, err = cmd(capsys, store_path, "frobnicate")
    assert code == 2 and "No such command 'frobnicate'" in err


def test_show_and_trace(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cmd(capsys, store_path, "show", "r1")
    assert code == 0
    assert out.splitlines()[:3] == ["run       r1", "workflow  adder", "status    completed"]
    assert 'custom    {"stage": "adding"} (v1)' in out
    assert re.search(r"^children  r1/leaf-0-\w+$", out, re.M)
    assert "steps     4 recorded (4 executed, 0 replayed, 0 failed), 1 execution(s)" in out
    assert re.search(r"^ +0  status +executed  set_status\(\{\"stage\": \"adding\"\}\)", out, re.M)
    assert re.search(r"^ +2  effect +executed  tests\.test_cli\.add\(1, 2\)  \d", out, re.M)
    code, out, _ = cmd(capsys, store_path, "show", "r1", "--json")
    info = json.loads(out)
    assert info["status"] == "completed" and info["custom_status"] == {"stage": "adding"}
    assert [s["args"] for s in info["steps"] if s["kind"] == "effect"] == ["(1, 2)", "(1, 2)"]
    assert info["totals"]["steps"] == 4

    code, out, _ = cmd(capsys, store_path, "trace", "f1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "run f1  workflow broken  status failed"
    assert lines[1].split() == ["AT", "SEQ", "KIND", "STATE", "TOOK", "STEP", "NOTE"]
    assert re.search(
        r"^ *\+0\.000s +0  effect  executed +[\d.]+ ms  tests\.test_cli\.add\(5, 5\)$", out, re.M
    )
    assert re.search(r"event +failed .*error=RuntimeError\('it broke'\)$", out, re.M)
    assert lines[-1] == "1 step(s): 1 executed, 0 replayed, 0 failed; replay saved 0.000 s"
    code, out, _ = cmd(capsys, store_path, "trace", "w1", "--json")
    t = json.loads(out)
    assert set(t) == {"run", "steps", "waiting", "pending_signals", "children", "events", "totals"}
    assert t["waiting"] == [{"kind": "signal", "name": "ok"}]
    code, out, _ = cmd(capsys, store_path, "trace", "w1")
    assert out.splitlines()[1] == "waiting on signal 'ok'"

    for command in ("show", "trace", "tree"):
        code, out, err = cmd(capsys, store_path, command, "nope")
        assert (code, out) == (1, "")
        assert err == (
            f"error: no run 'nope' in the store '{store_path}'; list runs with `durable-nb runs`\n"
        )


def test_tree(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cmd(capsys, store_path, "tree", "r1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "r1  completed  adder"
    assert re.fullmatch(r"└─ r1/leaf-0-\w+  completed  leaf", lines[1])
    code, out, _ = cmd(capsys, store_path, "tree", "r1", "--json")
    tree = json.loads(out)
    assert tree["run_id"] == "r1" and [c["workflow"] for c in tree["children"]] == ["leaf"]


def test_signal_then_cancel_a_run_no_process_executes(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cmd(capsys, store_path, "signal", "w1", "ok", '{"by": "me"}')
    assert (code, out) == (0, "sent 'ok' to w1\n")
    code, out, _ = cmd(capsys, store_path, "signal", "w1", "note")  # payload defaults to null
    assert code == 0
    t = json.loads(cmd(capsys, store_path, "trace", "w1", "--json")[1])
    assert t["pending_signals"] == ["ok", "note"]
    code, _, err = cmd(capsys, store_path, "signal", "w1", "ok", "{not json")
    assert code == 2 and "is not JSON" in err
    code, _, err = cmd(capsys, store_path, "signal", "nope", "ok")
    assert code == 1 and err.startswith("error: no run 'nope' in the store")

    code, out, _ = cmd(capsys, store_path, "cancel", "w1", "--reason", "not needed")
    assert (code, out) == (0, "cancelled w1\n")
    info = json.loads(cmd(capsys, store_path, "show", "w1", "--json")[1])
    assert info["status"] == "cancelled" and info["detail"] == {"reason": "not needed"}
    code, out, _ = cmd(capsys, store_path, "cancel", "r1")
    assert (code, out) == (0, "r1 had already ended (completed); nothing to cancel\n")
    code, _, err = cmd(capsys, store_path, "cancel", "nope")
    assert code == 1 and err.startswith("error: no run 'nope'")


def test_signal_wakes_the_run_when_it_resumes(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd(capsys, store_path, "signal", "w1", "ok", "42")[0] == 0

    @dn.durable(name="approval")
    async def approval(ctx: dn.Context) -> int:
        return int(await ctx.wait_signal("ok")) + 1

    dn.set_store(str(store_path))
    assert dn.run(approval, run_id="w1") == 43
    dn.get_store().close()
    t = json.loads(cmd(capsys, store_path, "trace", "w1", "--json")[1])
    assert t["run"]["status"] == "completed" and t["pending_signals"] == []


def test_forget(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cmd(capsys, store_path, "forget", "r1")
    assert code == 0 and out == "forgot r1 and 1 child run(s)\n"
    rows = json.loads(cmd(capsys, store_path, "runs", "--json")[1])
    assert sorted(r["run_id"] for r in rows) == ["f1", "w1"]
    code, _, err = cmd(capsys, store_path, "forget", "r1")
    assert code == 1 and err.startswith("error: no run 'r1'")
    assert cmd(capsys, store_path, "forget", "f1", "--keep-children")[1] == "forgot f1\n"


def test_gc(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cmd(capsys, store_path, "gc", "--dry-run", "--json")
    dry = json.loads(out)
    assert (dry["runs"], dry["top_effects"], dry["shared_effects"]) == (3, None, 0)
    code, out, _ = cmd(capsys, store_path, "gc", "--dry-run")
    assert out.startswith("would delete 3 run(s), an unknown number of cached effect(s)")
    assert len(json.loads(cmd(capsys, store_path, "runs", "--json")[1])) == 4
    code, out, _ = cmd(capsys, store_path, "gc", "--older-than", "100000d")
    assert out.startswith("deleted 0 run(s), 0 cached effect(s) of notebooks and scripts and 0")
    code, out, _ = cmd(capsys, store_path, "gc", "--json")
    assert json.loads(out)["runs"] == 3  # the finished runs are from 2023: older than 7 days
    rows = json.loads(cmd(capsys, store_path, "runs", "--json")[1])
    assert [r["run_id"] for r in rows] == ["w1"]  # a waiting run is kept
    code, out, _ = cmd(capsys, store_path, "gc", "--status", "waiting", "--keep-effects")
    assert out.startswith("deleted 1 run(s), 0 cached effect(s)")
    code, _, err = cmd(capsys, store_path, "gc", "--older-than", "soon")
    assert code == 2 and "Invalid value for --older-than: a duration must be seconds" in err


def test_metrics(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cmd(capsys, store_path, "metrics", "--json")
    m = json.loads(out)
    assert m["runs"] == 4
    assert {k: v for k, v in m["by_status"].items() if v} == {
        "completed": 2,
        "failed": 1,
        "waiting": 1,
    }
    assert m["steps_executed"] == 6  # r1: set_status, ratio, add, child; the leaf: add; f1: add
    code, out, _ = cmd(capsys, store_path, "metrics")
    assert code == 0
    assert out.splitlines() == [
        "runs        4 (waiting 1, completed 2, failed 1)",
        "workflows   adder 1, approval 1, broken 1, leaf 1",
        "executions  3 (3 ended)",
        "steps       6 executed, 0 replayed",
        f"time        {m['spent_seconds']:.3f} s spent, {m['saved_seconds']:.3f} s saved by replay",
        "per notebook",  # the runs executed in this process, whose top scope is "test"
        f"  test  {m['by_notebook']['test']['spent_seconds']:.3f} s spent, 0.000 s saved",
    ]
    assert set(m["by_notebook"]) == {"test"} and len(m["by_run"]) == 4  # r1, its child, f1, w1


def test_export_and_import_between_stores(
    store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump = tmp_path / "dump.jsonl"
    code, out, _ = cmd(capsys, store_path, "export", "-o", str(dump))
    assert (code, out) == (
        0,
        f"exported 4 run(s), 6 effect(s), 0 signal(s), 6 event(s) to {dump}\n",
    )
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert records[0]["type"] == "header"
    assert sum(r["type"] == "run" for r in records) == 4

    code, out, err = cmd(capsys, store_path, "export", "r1")  # to stdout, with its child
    assert code == 0 and err.startswith("exported 2 run(s)")
    assert sorted(json.loads(line)["type"] for line in out.splitlines())[:1] == ["effect"]

    other = tmp_path / "other.duckdb"
    code, _, err = cmd(capsys, other, "import", str(dump))
    assert code == 1
    assert "pickled payload(s) are signed by another key than this store's" in err
    assert "nothing was imported" in err
    key = Path(str(store_path) + ".d") / "key"
    code, out, _ = cmd(capsys, other, "import", str(dump), "--source-key-file", str(key), "--json")
    assert code == 0 and json.loads(out)["runs"] == 4
    code, out, _ = cmd(capsys, other, "import", str(dump), "--source-key-file", str(key))
    assert out.startswith("imported 0 run(s) (4 already there and kept)")
    a = json.loads(cmd(capsys, store_path, "trace", "r1", "--json")[1])
    b = json.loads(cmd(capsys, other, "trace", "r1", "--json")[1])
    assert a == b
    # the imported run replays in its new store: its recorded result comes back
    dn.set_store(str(other))
    assert dn.run(adder, run_id="r1") == 8
    dn.get_store().close()

    code, _, err = cmd(capsys, other, "import", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "no file" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("hello\n")
    code, _, err = cmd(capsys, other, "import", str(bad))
    assert code == 1 and err.startswith(f"error: {bad}, line 1: not JSON")


def test_a_missing_store_is_an_error_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.duckdb"
    for args in (["runs"], ["show", "x"], ["gc"], ["metrics"], ["export"]):
        code, out, err = cmd(capsys, missing, *args)
        assert (code, out) == (1, "")
        assert err == (
            f"error: no store at '{missing}'; run the command in the folder of the notebook that "
            "uses it, or pass --store PATH (or set DURABLE_NB_STORE)\n"
        )
    assert not missing.exists()


def test_store_option_after_the_command_and_from_the_environment(
    store_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["runs", "--status", "failed", "--store", str(store_path)]) == 0
    assert re.search(r"^f1 +failed", capsys.readouterr().out, re.M)
    monkeypatch.setenv("DURABLE_NB_STORE", str(store_path))
    assert main(["show", "f1"]) == 0
    assert "status    failed" in capsys.readouterr().out


def test_every_command_has_help_and_is_in_the_guide(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "docs" / "cli.md").read_text()
    for name, command in cli.commands.items():
        assert command.help, f"command {name} has no help"
        assert f"durable-nb {name}" in readme, f"docs/cli.md does not document `durable-nb {name}`"
        assert main([name, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"Usage: durable-nb {name} ")
        if name != "install-kernel":
            assert "--store URL" in out
    assert main(["--help"]) == 0
    assert "Exit codes: 0 success, 1 an error" in capsys.readouterr().out
    section = readme.split("# Command line", 1)[1].split("\n## ", 1)[0]
    assert "Exit codes" in section


def _cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "durable_nb", "--store", str(path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_exit_codes_of_the_real_command(store_path: Path) -> None:
    ok = _cli(store_path, "show", "r1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "completed"
    missing = _cli(store_path, "show", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"error: no run 'nope' in the store '{store_path}'; list runs with `durable-nb runs`"
    )
    misuse = _cli(store_path, "runs", "--limit", "x")
    assert misuse.returncode == 2 and "Invalid value for '--limit'" in misuse.stderr


NOTEBOOK = textwrap.dedent(
    """
    import sys
    import durable_nb as dn

    @dn.effect
    def add(a, b):
        return a + b

    @dn.durable(name="nb")
    async def wf(ctx):
        return add(1, 2)

    dn.set_store(sys.argv[1])
    print("RESULT", dn.run(wf, run_id="nb1"), flush=True)
    sys.stdin.readline()  # idle, as a kernel between cells
    print("SIGNALS", [s.name for s in dn.get_store().list_signals("nb1")], flush=True)
    print("RUNS", sorted(r.run_id for r in dn.get_store().list_runs()), flush=True)
    """
)


def test_the_command_works_while_a_notebook_using_the_store_is_idle(tmp_path: Path) -> None:
    path = tmp_path / "nb.duckdb"
    script = tmp_path / "nb.py"
    script.write_text(NOTEBOOK)
    kernel = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert kernel.stdout is not None and kernel.stdin is not None
        assert kernel.stdout.readline().strip() == "RESULT 3"
        listed = _cli(path, "runs", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [r["run_id"] for r in json.loads(listed.stdout)] == ["nb1"]
        traced = _cli(path, "trace", "nb1")
        assert traced.returncode == 0, traced.stderr
        assert "tests" not in traced.stdout and "__main__.add(1, 2)" in traced.stdout
        sent = _cli(path, "signal", "nb1", "note", '"hi"')
        assert sent.returncode == 0, sent.stderr
        out, err = kernel.communicate("\n", timeout=60)
        assert "SIGNALS ['note']" in out, err
        assert "RUNS ['nb1']" in out, err
    finally:
        if kernel.poll() is None:
            kernel.kill()
            kernel.wait()


def test_move_runs_from_duckdb_to_postgres_and_back(
    store_path: Path,
    tmp_path: Path,
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A notebook's DuckDB store pushed to a team's PostgreSQL store (signed with the team's
    key), and pulled back into a fresh DuckDB store."""
    from .conftest import PG_TEST_KEY

    dump = tmp_path / "push.jsonl"
    assert cmd(capsys, store_path, "export", "-o", str(dump))[0] == 0
    local = json.loads(cmd(capsys, store_path, "trace", "r1", "--json")[1])
    monkeypatch.setenv("DURABLE_NB_KEY", PG_TEST_KEY.decode())
    pg = pg_url
    code, _, err = cmd(capsys, pg, "import", str(dump))
    assert code == 1 and "signed by another key than this store's" in err
    key = Path(str(store_path) + ".d") / "key"
    code, out, err = cmd(capsys, pg, "import", str(dump), "--source-key-file", str(key), "--json")
    assert code == 0, err
    assert json.loads(out)["runs"] == 4
    assert json.loads(cmd(capsys, pg, "trace", "r1", "--json")[1]) == local
    dn.set_store(pg_url)
    assert type(dn.get_store()).__name__ == "PostgresStore"
    assert dn.run(adder, run_id="r1") == 8  # the run's recorded result, in the shared store
    dn.get_store().close()

    pull = tmp_path / "pull.jsonl"
    assert cmd(capsys, pg, "export", "r1", "-o", str(pull))[0] == 0
    fresh = tmp_path / "fresh.duckdb"  # uses DURABLE_NB_KEY too: no source key needed
    code, out, err = cmd(capsys, fresh, "import", str(pull))
    assert code == 0, err
    assert out.startswith("imported 2 run(s) (0 already there and kept)")
    assert json.loads(cmd(capsys, fresh, "trace", "r1", "--json")[1]) == local


WAITER = textwrap.dedent(
    """
    import sys
    import durable_nb as dn

    @dn.durable(name="waiter")
    async def wf(ctx):
        try:
            print("WAITING", flush=True)
            return await ctx.wait_signal("never")
        finally:
            print("CLEANUP", flush=True)

    dn.set_store(sys.argv[1])
    try:
        dn.run(wf, run_id="live")
    except dn.RunCancelledError as e:
        print("CANCELLED", e, flush=True)
    """
)


def test_cancel_reaches_a_run_executing_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    script = tmp_path / "w.py"
    script.write_text(WAITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "WAITING"
        busy = _cli(path, "forget", "live")
        assert busy.returncode == 1
        assert busy.stderr.startswith("error: cannot delete run 'live' while it executes (")
        sent = _cli(path, "cancel", "live", "--reason", "from the CLI")
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout in (  # depending on whether the run stopped in the meantime
            "cancel requested for live; the process that executes it will stop it\n",
            "cancelled live\n",
        )
        out, err = proc.communicate(timeout=60)
        assert out.splitlines()[-2:] == [
            "CLEANUP",
            "CANCELLED run 'live' was cancelled (from the CLI); resume it from its history "
            "with dn.resume('live'), or start it again with restart=True to run it afresh",
        ], err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shown = _cli(path, "show", "live", "--json")
    assert json.loads(shown.stdout)["status"] == "cancelled"
