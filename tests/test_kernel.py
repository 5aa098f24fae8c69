"""The "Python 3 (durable)" kernel, and the magics in real kernels driven through jupyter_client.

Each kernel is a real ipykernel process started from the installed spec, with its working
directory in the test's tmp dir, so its store is ``<tmp>/.durable_nb/store.duckdb``. Waits are
bounded by generous timeouts; nothing depends on how fast the machine is.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from durable_nb import _kernelspec

from .helpers import ROOT

TIMEOUT = 60.0  # per start and per execute: generous, a loaded CI machine is slow


# ---------------------------------------------------------------------------- harness


@dataclass
class Executed:
    """What one execute_request produced, from its reply and its iopub messages."""

    status: str = ""
    stdout: str = ""
    stderr: str = ""
    result: dict[str, Any] | None = None  # execute_result data
    displays: list[dict[str, Any]] = field(default_factory=list)
    ename: str = ""
    evalue: str = ""

    @property
    def text(self) -> str | None:
        return None if self.result is None else str(self.result["text/plain"])


def collect(kc: BlockingKernelClient, msg_id: str, timeout: float = TIMEOUT) -> Executed:
    """Wait for the request to finish (its kernel goes idle) and gather what it printed."""
    out = Executed()
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise TimeoutError(f"no idle status within {timeout} s") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                out.stdout += content["text"]
            else:
                out.stderr += content["text"]
        elif kind == "execute_result":
            out.result = content["data"]
        elif kind == "display_data":
            out.displays.append(content["data"])
        elif kind == "error":
            out.ename, out.evalue = content["ename"], content["evalue"]
        elif kind == "status" and content["execution_state"] == "idle":
            break
    while True:
        reply = kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.01))
        if reply["parent_header"].get("msg_id") == msg_id:
            content = reply["content"]
            out.status = content["status"]
            if out.status == "error":  # a UsageError is in the reply only (no error message)
                out.ename, out.evalue = content["ename"], content["evalue"]
            return out


def execute(kc: BlockingKernelClient, code: str, *, ok: bool = True) -> Executed:
    out = collect(kc, kc.execute(code))
    if ok:
        assert out.status == "ok", f"{out.ename}: {out.evalue}\n{out.stderr}"
    return out


def kernel_env() -> dict[str, str]:
    """The test process's environment, without what would move the kernel's store or scope."""
    drop = {"DURABLE_NB_STORE", "JPY_SESSION_NAME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextmanager
def kernel(
    kernels_dir: Path, cwd: Path, name: str = _kernelspec.DEFAULT_NAME
) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A kernel from the spec ``name`` found in ``kernels_dir``, always shut down."""
    ksm = KernelSpecManager(kernel_dirs=[str(kernels_dir)])
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    kc: BlockingKernelClient | None = None
    try:
        km.start_kernel(cwd=str(cwd), env=kernel_env())
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=TIMEOUT)
        yield km, kc
    finally:
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)  # also after SIGKILL: it cleans up what is left
        else:
            km.cleanup_resources()  # it did not start: its connection file, if written


@pytest.fixture(scope="module")
def kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spec installed once for the module, under a tmp prefix."""
    prefix = tmp_path_factory.mktemp("prefix")
    where, _ = _kernelspec.install(prefix=str(prefix))
    return Path(where).parent


# ---------------------------------------------------------------------------- the spec


def test_the_template_file_and_the_package_agree() -> None:
    template = json.loads((ROOT / "extension" / "kernelspec" / "kernel.json").read_text())
    assert template == _kernelspec.kernel_json()
    assert template["display_name"] == "Python 3 (durable)"
    assert template["argv"][0] == "{python}"


def test_install_kernel_then_a_kernel_from_it_has_the_magics(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    out = subprocess.run(
        [sys.executable, "-m", "durable_nb", "install-kernel", "--prefix", str(prefix)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    spec_dir = prefix / "share" / "jupyter" / "kernels" / "durable"
    assert out.stdout.splitlines()[0] == (
        f"installed kernel 'Python 3 (durable)' as 'durable' in {spec_dir}"
    )
    assert "add it to JUPYTER_PATH" in out.stderr  # a tmp prefix is off Jupyter's path
    from ipykernel.kernelspec import get_kernel_dict

    installed = json.loads((spec_dir / "kernel.json").read_text())
    expected = _kernelspec.kernel_json(os.path.abspath(sys.executable))
    assert installed == {**expected, "metadata": get_kernel_dict()["metadata"]}
    assert (spec_dir / "logo-64x64.png").is_file()

    work = tmp_path / "work"
    work.mkdir()
    with kernel(spec_dir.parent, work) as (km, kc):
        assert Path(km.kernel_spec.resource_dir) == spec_dir
        shown = execute(kc, "%durable store")  # no %load_ext: the spec loaded the extension
        store = work / ".durable_nb" / "store.duckdb"
        assert shown.stdout == f"durable_nb store: {store}\n"
        loaded = execute(kc, "sorted(get_ipython().extension_manager.loaded)")
        assert "'durable_nb'" in (loaded.text or "")


def test_install_kernel_places_the_spec_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from durable_nb.cli import main

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user"))  # where --user writes
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))  # where --sys-prefix writes
    cases = [
        ([], tmp_path / "user" / "kernels" / "durable"),  # --user is the default
        (["--user", "--name", "Durable-2"], tmp_path / "user" / "kernels" / "durable-2"),
        (["--sys-prefix"], tmp_path / "env" / "share" / "jupyter" / "kernels" / "durable"),
        (
            ["--prefix", str(tmp_path / "p")],
            tmp_path / "p" / "share" / "jupyter" / "kernels" / "durable",
        ),
    ]
    for args, spec_dir in cases:
        assert main(["install-kernel", *args]) == 0
        assert capsys.readouterr().out.splitlines()[0].endswith(f"' in {spec_dir}")
        spec = json.loads((spec_dir / "kernel.json").read_text())
        assert spec["argv"][0] == os.path.abspath(sys.executable)
    assert main(["install-kernel"]) == 0  # again: replaces the spec, no error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "--prefix", "x"], "choose one of --user, --sys-prefix and --prefix"),
        (["--sys-prefix", "--prefix", "x"], "choose one of --user, --sys-prefix and --prefix"),
        (["--prefix", "x", "--name", "my kernel"], "'my kernel' is not a kernel name"),
    ],
)
def test_install_kernel_misuse_exits_2_and_installs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from durable_nb.cli import main

    assert main(["install-kernel", *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the test's cwd: no ./x was created


def test_install_kernel_without_jupyter_says_to_install_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['jupyter_client'] = None  # as if it were not installed\n"
        "from durable_nb.cli import main\n"
        f"sys.exit(main(['install-kernel', '--prefix', {str(tmp_path / 'p')!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 1
    assert out.stderr == (
        f"error: jupyter_client is not installed in {os.path.abspath(sys.executable)}; "
        "install the notebook extra: pip install 'durable_nb[notebook]'\n"
    )
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------- the magics


SETUP = """LOG = {log!r}
x = 21

def note(line):
    with open(LOG, "a") as f:
        f.write(line + "\\n")
"""

EFFECT_CELL = """%%effect
note("effect ran")
y = [x, x * 2]
print("y is", y)
y[1] + 0.5
"""

DURABLE_CELL = """%%durable restart-demo
import durable_nb as dn

@dn.effect
def double(v):
    note(f"durable {v}")
    return 2 * v

parts = [double(v) for v in range(3)]
print("parts", parts)
sum(parts) + x
"""


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_cells_do_not_execute_again_after_a_kernel_restart_and_show_the_same(
    kernels_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.txt"
    show = "print(repr(y), repr(parts))"
    with kernel(kernels_dir, tmp_path) as (km, kc):
        execute(kc, SETUP.format(log=str(log)))
        effect_before, durable_before = execute(kc, EFFECT_CELL), execute(kc, DURABLE_CELL)
        assert execute(kc, show).stdout == "[21, 42] [0, 2, 4]\n"
        assert lines(log) == ["effect ran", "durable 0", "durable 1", "durable 2"]
        km.restart_kernel()
        kc.wait_for_ready(timeout=TIMEOUT)
        assert execute(kc, "'y' in globals()").text == "False"  # a new process indeed
        execute(kc, SETUP.format(log=str(log)))
        effect_after, durable_after = execute(kc, EFFECT_CELL), execute(kc, DURABLE_CELL)
        # the names are back: the %%effect cell's restored, the %%durable cell's replayed
        assert execute(kc, show).stdout == "[21, 42] [0, 2, 4]\n"
    assert lines(log) == ["effect ran", "durable 0", "durable 1", "durable 2"]  # nothing reran
    assert effect_before.stdout == "y is [21, 42]\n"
    assert effect_before.text == effect_after.text == "42.5"
    first, note_line = effect_after.stdout.splitlines()  # its output again, then a note
    assert first == "y is [21, 42]"
    assert re.fullmatch(
        r"\[durable_nb\] replayed this cell \(recorded [-\d]+ [:\d]+\); skipped \d+\.\d\d s of work",
        note_line,
    )
    assert durable_before.stdout == durable_after.stdout == "parts [0, 2, 4]\n"
    assert durable_before.text == durable_after.text == "27"


SIX_STEPS = """%%durable six-steps
import asyncio
import durable_nb as dn

@dn.effect
async def step(i):
    note(f"exec {i}")
    await asyncio.sleep(0.3)  # a slow step: the kernel dies while one is in flight
    return i * i

total = 0
for i in range(6):
    total += await step(i)
print("total", total)
total
"""


def start_and_wait_for_lines(
    kc: BlockingKernelClient, code: str, log: Path, n: int, timeout: float = TIMEOUT
) -> str:
    """Send ``code`` and return once ``log`` has ``n`` lines; fails fast if the cell ends."""
    msg_id = kc.execute(code)
    deadline = time.monotonic() + timeout
    while len(lines(log)) < n:
        assert time.monotonic() < deadline, f"the log has {lines(log)} after {timeout} s"
        try:  # waiting on iopub doubles as the poll interval
            msg = kc.get_iopub_msg(timeout=0.02)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            ended = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
            assert not ended, f"the cell ended early: {msg}; log: {lines(log)}"
    return msg_id


def assert_each_step_ran_once(log: Path, in_flight: int) -> None:
    """Every step executed exactly once, except the one in flight when the kernel stopped,
    which may have executed twice (it never returned, so it was not recorded)."""
    counts = Counter(lines(log))
    assert set(counts) == {f"exec {i}" for i in range(6)}, counts
    for i in range(6):
        assert counts[f"exec {i}"] == 1 or (i == in_flight and counts[f"exec {i}"] == 2), counts


def test_a_durable_cell_resumes_in_a_new_kernel_after_sigkill(
    kernels_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.txt"
    with kernel(kernels_dir, tmp_path) as (km, kc):
        execute(kc, SETUP.format(log=str(log)))
        start_and_wait_for_lines(kc, SIX_STEPS, log, 3)
        pid = km.provisioner.pid  # the kernel process itself (ipykernel_launcher does not fork)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        while km.is_alive():
            assert time.monotonic() < deadline, "the kernel survived SIGKILL"
            time.sleep(0.01)
    at_kill = lines(log)
    assert 3 <= len(at_kill) < 6, at_kill  # killed mid-run
    with kernel(kernels_dir, tmp_path) as (km, kc):  # a new kernel, the same store
        execute(kc, SETUP.format(log=str(log)))
        resumed = execute(kc, SIX_STEPS)
        assert resumed.text == "55"
        assert resumed.stdout == "total 55\n"
        assert execute(kc, "total, i").text == "(55, 5)"
        runs = execute(kc, "%durable runs").stdout
        assert re.search(r"^six-steps +completed ", runs, re.M), runs
    assert_each_step_ran_once(log, in_flight=len(at_kill) - 1)


def test_an_interrupted_durable_cell_resumes_in_the_same_kernel(
    kernels_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.txt"
    with kernel(kernels_dir, tmp_path) as (km, kc):
        execute(kc, SETUP.format(log=str(log)))
        msg_id = start_and_wait_for_lines(kc, SIX_STEPS, log, 3)
        km.interrupt_kernel()  # Ctrl-C, or the stop button
        stopped = collect(kc, msg_id)
        assert (stopped.status, stopped.ename) == ("error", "KeyboardInterrupt")
        # Ctrl-C returns at once while the run's task is cancelled on the engine's loop: wait
        # for the engine to let go of the run, or the rerun would join the dying job
        execute(kc, "from durable_nb.engine import runtime")
        deadline = time.monotonic() + TIMEOUT
        while execute(kc, "'six-steps' in runtime.jobs").text != "False":
            assert time.monotonic() < deadline, "the interrupted run never stopped"
        at_interrupt = lines(log)
        assert 3 <= len(at_interrupt) < 6, at_interrupt
        # marked interrupted (no worker takes it over), resumable here
        status = execute(kc, "runtime.store.get_run('six-steps').status")
        assert status.text == "'interrupted'"
        resumed = execute(kc, SIX_STEPS)
        assert resumed.text == "55"
    assert_each_step_ran_once(log, in_flight=len(at_interrupt) - 1)


def test_an_interrupted_durable_cell_resumes_by_its_run_id(
    kernels_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.txt"
    with kernel(kernels_dir, tmp_path) as (km, kc):
        execute(kc, SETUP.format(log=str(log)))
        msg_id = start_and_wait_for_lines(kc, SIX_STEPS, log, 3)
        km.interrupt_kernel()
        stopped = collect(kc, msg_id)
        assert (stopped.status, stopped.ename) == ("error", "KeyboardInterrupt")
        execute(kc, "from durable_nb.engine import runtime")
        deadline = time.monotonic() + TIMEOUT
        while execute(kc, "runtime.store.get_run('six-steps').status").text != "'interrupted'":
            assert time.monotonic() < deadline, "the interrupted run was never marked interrupted"
        at_interrupt = lines(log)
        resumed = execute(kc, "import durable_nb as dn\nawait dn.resume('six-steps').wait()")
        assert resumed.text == "55"
        assert execute(kc, "total").text == "55"  # the cell's names landed in the namespace
    assert_each_step_ran_once(log, in_flight=len(at_interrupt) - 1)


def test_bad_input_is_a_usage_error_and_the_kernel_goes_on(
    kernels_dir: Path, tmp_path: Path
) -> None:
    with kernel(kernels_dir, tmp_path) as (_, kc):
        missing = execute(kc, "%durable show nope", ok=False)
        assert (missing.status, missing.ename) == ("error", "UsageError")
        assert missing.evalue.startswith("no run 'nope' in the store ")
        assert missing.stderr == f"UsageError: {missing.evalue}\n"  # shown without a traceback
        returns = execute(kc, "%%durable\nreturn 5\n", ok=False)
        assert (returns.status, returns.ename) == ("error", "UsageError")
        assert returns.evalue.startswith("a %%durable cell cannot `return` at top level")
        assert execute(kc, "%durable runs").stdout == "no runs\n"  # nothing was recorded


def test_an_uncacheable_cell_warns_each_time_it_runs(kernels_dir: Path, tmp_path: Path) -> None:
    cell = "%%effect\nimport threading\nlock = threading.Lock()\n"
    with kernel(kernels_dir, tmp_path) as (_, kc):
        for _ in range(2):
            out = execute(kc, cell)
            assert "%%effect: variable 'lock' (lock) cannot be stored" in out.stderr
