"""Long-running LLM work: tokens counted once (across a real SIGKILL and a resume), rate and
concurrency limits measured at the local OpenAI-compatible server and on the virtual clock,
Retry-After obeyed, bad limits refused."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

import durable_nb as dn
from durable_nb import trace
from durable_nb.client import Client
from durable_nb.engine._limits import parse_rate
from durable_nb.engine._usage import usage_of
from durable_nb.errors import ArgumentError, ArgumentTypeError, LimitConflictError

from . import helpers
from .helpers import spawn_python

# ---------------------------------------------------------------------- tokens, once

KILLED_AGENT = """
import os, signal, sys
from openai import OpenAI
import durable_nb as dn

dn.set_store(sys.argv[1])
llm = dn.wrap(OpenAI(base_url=sys.argv[2], api_key="x", max_retries=0), key="llm")

@dn.durable
async def agent(ctx):
    words = 0
    for i in range(6):
        msgs = [{"role": "user", "content": f"question {i} " * (i + 1)}]
        if i % 2:
            s = llm.chat.completions.create(
                model="m", messages=msgs, stream=True, stream_options={"include_usage": True}
            )
            text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        else:
            text = llm.chat.completions.create(model="m", messages=msgs).choices[0].message.content
        words += len(text.split())
        if i == 2 and not os.path.exists("killed"):
            open("killed", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return words

print("RESULT", dn.run(agent, run_id="agent"), flush=True)
"""


def _expected_tokens(llm_server: Any) -> list[tuple[int, int]]:
    """What the server bills for each of the agent's six calls: (prompt, completion)."""
    out = []
    for i in range(6):
        msgs = [{"role": "user", "content": f"question {i} " * (i + 1)}]
        u = llm_server._usage(msgs, llm_server.reply_for(msgs))
        out.append((u["prompt_tokens"], u["completion_tokens"]))
    return out


def test_tokens_are_counted_once_across_a_sigkill_a_resume_and_a_replay(tmp_path: Path) -> None:
    llm_server = helpers.llm_server()
    store_path = str(tmp_path / "s.duckdb")
    bills = _expected_tokens(llm_server)
    prompt, completion = sum(b[0] for b in bills), sum(b[1] for b in bills)
    with llm_server.LLMServer() as server:

        def agent() -> tuple[int, str, str]:
            p = spawn_python("-c", KILLED_AGENT, store_path, server.url, cwd=tmp_path)
            out, err = p.communicate(timeout=120)
            return p.returncode, out, err

        code, _, err = agent()
        assert code == -signal.SIGKILL, err
        assert server.requests == 3  # killed right after the third answer was recorded
        code, out, err = agent()  # resumed: the three recorded calls replay
        assert code == 0, err
        assert server.requests == 6
        code, out2, err = agent()  # completed: nothing is sent again
        assert code == 0, err
        assert out2 == out and server.requests == 6

    store = dn.set_store(store_path)
    t = trace.run_trace(store, "agent")
    steps = [s for s in t["steps"] if s["kind"] == "effect"]
    assert len(steps) == 6
    assert all(s["tokens"] is not None for s in steps)
    assert all(s["tokens"]["model"] == "m" for s in steps)
    # spent: each recorded call once, although calls 0-2 replayed in two later executions
    assert t["totals"]["tokens"] == {"prompt": prompt, "completion": completion}
    assert t["totals"]["tokens_by_model"] == {"m": {"prompt": prompt, "completion": completion}}
    assert [(s["tokens"]["prompt"], s["tokens"]["completion"]) for s in steps] == bills
    # the first execution recorded three calls, which the resumed one replayed (the third
    # start found the run completed and executed nothing)
    assert [s["state"] for s in steps] == ["replayed"] * 3 + ["executed"] * 3
    assert t["totals"]["tokens_saved"] == {
        "prompt": sum(b[0] for b in bills[:3]),
        "completion": sum(b[1] for b in bills[:3]),
    }
    text = trace.format_trace(t)
    assert f"tokens {prompt} prompt + {completion} completion spent" in text
    m = Client(store).metrics()
    assert m["tokens"] == {"prompt": prompt, "completion": completion}
    assert m["tokens_by_run"] == {"agent": {"prompt": prompt, "completion": completion}}
    assert m["tokens_by_model"] == {"m": {"prompt": prompt, "completion": completion}}


def test_usage_is_read_from_openai_and_anthropic_shapes_and_streamed_chunks() -> None:
    assert usage_of({"model": "gpt", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "model": "gpt",
    }
    anthropic = {"model": "claude", "usage": {"input_tokens": 10, "output_tokens": 2}}
    assert usage_of(anthropic) == {"prompt_tokens": 10, "completion_tokens": 2, "model": "claude"}
    # Anthropic streams: message_start carries the input, message_delta the cumulative output
    chunks = [
        {
            "type": "message_start",
            "message": {"model": "claude", "usage": {"input_tokens": 9, "output_tokens": 1}},
        },
        {"type": "content_block_delta", "delta": {"text": "hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 7}},
    ]
    assert usage_of(chunks) == {"prompt_tokens": 9, "completion_tokens": 7, "model": "claude"}
    assert usage_of("text") is None
    assert usage_of({"usage": None}) is None
    assert usage_of({"usage": {"prompt_tokens": "many"}}) is None


def test_a_cells_kept_responses_are_summed_per_model_each_once() -> None:
    from durable_nb.engine._usage import kept_usage_records, none_payload
    from durable_nb.store import EffectRecord

    def resp(model: str, p: int, c: int) -> dict[str, Any]:
        return {"model": model, "usage": {"prompt_tokens": p, "completion_tokens": c}}

    a, b = resp("m", 3, 4), resp("n", 10, 1)
    cell = EffectRecord("top/nb", "cell:x", "v", "h", 0, payload=none_payload(), kind="cell")
    recs = kept_usage_records(cell, [a, [a, b, "text"], {"k": resp("m", 1, 1)}, 7, None])
    assert [(r.identity, json.loads(r.detail)) for r in recs] == [
        ("dn.usage:cell:x#m", {"prompt_tokens": 4, "completion_tokens": 5, "model": "m"}),
        ("dn.usage:cell:x#n", {"prompt_tokens": 10, "completion_tokens": 1, "model": "n"}),
    ]
    assert all(r.kind == "usage" and r.key[2:] == ("v", "h", 0) for r in recs)
    assert kept_usage_records(cell, ["text", [1, 2], {"a": "b"}]) == ()


def test_an_effect_in_a_notebook_scope_records_its_usage_once(
    ip: Any,
) -> None:
    from .helpers import run

    run(ip, "import durable_nb as dn\ncalls = []")
    run(
        ip,
        "@dn.effect\n"
        "def ask(q):\n"
        "    calls.append(q)\n"
        "    return {'model': 'm', 'usage': {'prompt_tokens': 5, 'completion_tokens': 2}}",
    )
    for _ in range(3):
        run(ip, "r = ask('hi')")
    assert ip.user_ns["calls"] == ["hi"]
    store = dn.get_store()
    scope = dn.engine.runtime.top.scope_id
    usage = [r for r in store.load_effects(scope) if r.kind == "usage"]
    assert [json.loads(r.detail) for r in usage] == [
        {"prompt_tokens": 5, "completion_tokens": 2, "model": "m"}
    ]


# ---------------------------------------------------------------------- limits


def _max_in_window(starts: list[float], window: float) -> int:
    """The most starts in any half-open window [t, t + window) that begins at a start."""
    starts = sorted(starts)
    best, j = 0, 0
    for i, t in enumerate(starts):
        while starts[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_a_rate_limit_holds_in_every_sliding_window_on_the_virtual_clock(
    clock: dn.FakeClock,
) -> None:
    starts: list[float] = []

    @dn.effect(limit="virtual-rate", rate="50/s", concurrency=8)
    async def call(i: int) -> int:
        starts.append(clock.time())
        await asyncio.sleep(0)
        return i

    @dn.durable
    async def fan_out(ctx: dn.Context) -> int:
        return sum(await asyncio.gather(*(call(i) for i in range(1000))))

    assert dn.run(fan_out, run_id="fan") == sum(range(1000))
    assert len(starts) == 1000
    assert _max_in_window(starts, 1.0) == 50  # never more, and the limit is used
    assert clock.slept  # it waited, on the virtual clock
    starts.clear()
    assert dn.run(fan_out, run_id="fan") == sum(range(1000))  # a replay: no attempt, no wait
    assert starts == []


def test_a_sync_effect_obeys_the_rate_on_the_virtual_clock(clock: dn.FakeClock) -> None:
    starts: list[float] = []

    @dn.effect(limit="virtual-sync", rate="3/min")
    def call(i: int) -> int:
        starts.append(clock.time())
        return i

    assert [call(i) for i in range(10)] == list(range(10))
    assert _max_in_window(starts, 60.0) == 3


def test_gather_over_1000_prompts_never_exceeds_the_limits_at_the_server() -> None:
    """1,000 gathered calls of the real openai package: the server sees at most 8 at once and
    at most 250 start in any second (counted from its own arrival times)."""
    dn.set_clock(None)  # real waiting: the server's clock is the judge
    llm_server = helpers.llm_server()
    from openai import AsyncOpenAI

    with llm_server.LLMServer() as server:
        server.latency = 0.002
        llm = dn.wrap(
            AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0),
            key="gather-llm",
            limit="server-llm",
            concurrency=8,
            rate="250/s",
        )

        @dn.durable
        async def prompts(ctx: dn.Context) -> int:
            answers = await asyncio.gather(
                *(
                    llm.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": f"prompt {i}"}]
                    )
                    for i in range(1000)
                )
            )
            return len(answers)

        @dn.durable
        async def close(ctx: dn.Context) -> None:
            # the client's connections belong to the engine's loop: close them there
            await llm.__wrapped__.close()  # type: ignore[attr-defined]  # the proxy's

        assert dn.run(prompts, run_id="thousand") == 1000
        assert server.requests == 1000
        assert server.max_inflight <= 8
        # the server's arrival times lag the client's starts by a varying delay, which can
        # only bunch them up by that much: check windows shortened by 100 ms of slack
        assert _max_in_window(server.starts, 0.9) <= 250
        assert dn.run(prompts, run_id="thousand") == 1000  # replays: nothing sent
        assert server.requests == 1000
        dn.run(close, run_id="close")


def test_a_429_with_retry_after_is_retried_after_the_hint() -> None:
    dn.set_clock(None)
    llm_server = helpers.llm_server()
    from openai import OpenAI

    with llm_server.LLMServer() as server:
        server.reject_next, server.retry_after = 2, 0.05
        llm = dn.wrap(
            OpenAI(base_url=server.url, api_key="x", max_retries=0),
            key="429-llm",
            retry=dn.Retry(attempts=3, initial_delay=0.0),
        )

        @dn.durable
        async def one(ctx: dn.Context) -> str:
            r = llm.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            return str(r.choices[0].message.content)

        assert dn.run(one, run_id="429") in llm_server.REPLIES
        assert server.rejected == 2 and server.requests == 3
    events = [
        e for e in trace.run_trace(dn.get_store(), "429")["events"] if e["kind"] == "step_failed"
    ]
    # the schedule took the server's hint (Retry-After: 0.05) over the policy's 0 s delay
    assert [e["data"]["retry_in"] for e in events] == [0.05, 0.05]


def test_bad_limits_are_clear_errors_and_change_nothing() -> None:
    with pytest.raises(ArgumentError, match=r"^rate must be 'N/unit' .* got 'fast'$"):
        dn.effect(limit="bad", rate="fast")(lambda: None)
    with pytest.raises(ArgumentTypeError, match=r"^rate must be a str .* got 50$"):
        dn.effect(limit="bad", rate=50)(lambda: None)  # type: ignore[call-overload]
    with pytest.raises(ArgumentError, match=r"^concurrency must be an int >= 1 or None, got 0$"):
        dn.effect(limit="bad", concurrency=0)(lambda: None)
    with pytest.raises(ArgumentError, match=r"^concurrency=4 and rate=None need a limit name"):
        dn.effect(concurrency=4)(lambda: None)
    dn.effect(limit="shared-name", concurrency=2)(lambda: 1)
    dn.effect(limit="shared-name")(lambda: 2)  # named alone: uses the one defined
    with pytest.raises(
        LimitConflictError,
        match=r"^limit 'shared-name' is already defined with concurrency=2, rate=None; "
        r"got concurrency=3, rate=None\. ",
    ):
        dn.effect(limit="shared-name", concurrency=3)(lambda: 3)
    assert parse_rate("500/min") == (500, 60.0)
    assert parse_rate("10/5s") == (10, 5.0)
    assert parse_rate("2 / hour") == (2, 3600.0)


TWO_PROCESS_CALLER = """
import asyncio, os, sys, time
from openai import AsyncOpenAI
import durable_nb as dn

llm = dn.wrap(
    AsyncOpenAI(base_url=sys.argv[1], api_key="x", max_retries=0),
    key="pg-llm",
    limit="pg-shared",
    concurrency=4,
    rate="100/s",
)

@dn.durable
async def prompts(ctx, who):
    answers = await asyncio.gather(
        *(
            llm.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"{who} {i}"}]
            )
            for i in range(300)
        )
    )
    await llm.__wrapped__.close()
    return len(answers)

while not os.path.exists(sys.argv[3]):  # start together
    time.sleep(0.005)
print("RESULT", dn.run(prompts, sys.argv[2], run_id="many-" + sys.argv[2]), flush=True)
"""


def test_a_limit_holds_across_two_processes_on_the_postgresql_store(
    pg_url: str, tmp_path: Path
) -> None:
    """Two processes, 300 gathered calls each, one limit on the shared store: the server
    sees at most 4 at once and at most 100 start in any second, counted at the server."""
    llm_server = helpers.llm_server()
    go = tmp_path / "go"
    env = {"DURABLE_NB_STORE": pg_url, "DURABLE_NB_KEY": "limits-test-key-0123456789"}
    with llm_server.LLMServer() as server:
        server.latency = 0.005
        procs = [
            spawn_python("-c", TWO_PROCESS_CALLER, server.url, who, str(go), env=env)
            for who in ("a", "b")
        ]
        go.touch()
        outs = [p.communicate(timeout=180) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
            assert out.strip() == "RESULT 300", err
        assert server.requests == 600
        assert server.max_inflight <= 4
        assert _max_in_window(server.starts, 0.9) <= 100  # 100 ms of slack, as above


# ---------------------------------------------------------------------- spent vs saved

NOTEBOOK = """
import os, signal, sys
from openai import OpenAI
import durable_nb as dn

store, url, run_id = sys.argv[1:4]
dn.set_store(store)
llm = dn.wrap(OpenAI(base_url=url, api_key="x", max_retries=0), key="llm")

def ask(model, text):
    msgs = [{"role": "user", "content": text}]
    return llm.chat.completions.create(model=model, messages=msgs).choices[0].message.content

ask("small", "hello from " + run_id)  # the notebook's own call, outside any run

@dn.durable
async def agent(ctx, n):
    out = []
    for i in range(n):
        out.append(ask("large", f"step {i} of " + run_id * (i + 1)))
        if i == 1 and not os.path.exists(run_id + ".killed"):
            open(run_id + ".killed", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return len(out)

print("RESULT", dn.run(agent, 4, run_id=run_id), flush=True)
"""


def _bill(llm_server: Any, text: str) -> dict[str, int]:
    msgs = [{"role": "user", "content": text}]
    u = llm_server._usage(msgs, llm_server.reply_for(msgs))
    return {"prompt": u["prompt_tokens"], "completion": u["completion_tokens"]}


def _sum(*bills: dict[str, int]) -> dict[str, int]:
    return {k: sum(b[k] for b in bills) for k in ("prompt", "completion")}


def test_metrics_give_tokens_spent_and_saved_per_notebook_model_and_run_through_the_cli(
    tmp_path: Path,
) -> None:
    """Two notebooks (scripts with their own scope), each with a call of its own and a run
    killed after two calls, then resumed (two calls replay): `durable-nb metrics` gives what
    each notebook, model and run spent, counted once, and what replay saved."""
    from click.testing import CliRunner

    from durable_nb.cli import cli

    llm_server = helpers.llm_server()
    store_path = str(tmp_path / "s.duckdb")
    with llm_server.LLMServer() as server:
        for nb, run_id in (("nb-a", "a"), ("nb-b", "b")):
            for expected in (-signal.SIGKILL, 0):
                p = spawn_python(
                    "-c",
                    NOTEBOOK,
                    store_path,
                    server.url,
                    run_id,
                    env={"DURABLE_NB_SCOPE": nb},
                    cwd=tmp_path,
                )
                _, err = p.communicate(timeout=120)
                assert p.returncode == expected, err
        assert server.requests == 2 * (1 + 4)  # each call once: the rest replayed

    own = {r: _bill(llm_server, "hello from " + r) for r in "ab"}
    steps = {r: [_bill(llm_server, f"step {i} of " + r * (i + 1)) for i in range(4)] for r in "ab"}
    spent = {r: _sum(own[r], *steps[r]) for r in "ab"}
    saved = {r: _sum(*steps[r][:2]) for r in "ab"}  # the resumed execution replayed two calls

    result = CliRunner().invoke(cli, ["--store", store_path, "metrics", "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert m["tokens"] == _sum(spent["a"], spent["b"])
    assert m["tokens_saved"] == _sum(saved["a"], saved["b"])
    assert set(m["by_notebook"]) == {"nb-a", "nb-b"}
    for nb, r in (("nb-a", "a"), ("nb-b", "b")):
        assert m["by_notebook"][nb]["tokens"] == spent[r]
        assert m["by_notebook"][nb]["tokens_saved"] == saved[r]
        assert m["by_notebook"][nb]["spent_seconds"] > 0  # the calls took some time
        assert m["by_run"][r]["tokens"] == _sum(*steps[r])  # the run's own calls
        assert m["by_run"][r]["tokens_saved"] == saved[r]
        assert m["tokens_by_run"][r] == _sum(*steps[r])
    assert m["by_model"]["small"]["tokens"] == _sum(own["a"], own["b"])
    assert m["by_model"]["small"]["tokens_saved"] == {"prompt": 0, "completion": 0}
    assert m["by_model"]["large"]["tokens"] == _sum(*steps["a"], *steps["b"])
    assert m["by_model"]["large"]["tokens_saved"] == _sum(saved["a"], saved["b"])
    assert m["tokens_by_model"] == {k: v["tokens"] for k, v in m["by_model"].items()}

    result = CliRunner().invoke(cli, ["--store", store_path, "metrics"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    total, large = m["tokens"], m["by_model"]["large"]
    assert (
        f"tokens      {total['prompt']} prompt + {total['completion']} completion spent, "
        f"{m['tokens_saved']['prompt']} + {m['tokens_saved']['completion']} saved by replay"
    ) in lines
    assert any(
        line.startswith(
            f"  large  {large['tokens']['prompt']} prompt + {large['tokens']['completion']} "
            f"completion spent, {large['tokens_saved']['prompt']} + "
            f"{large['tokens_saved']['completion']} saved by replay; "
        )
        for line in lines
    )
    a = m["by_notebook"]["nb-a"]
    assert lines[lines.index("per notebook") + 1].startswith(
        f"  nb-a  tokens {a['tokens']['prompt']} prompt + {a['tokens']['completion']} completion "
        f"spent, {a['tokens_saved']['prompt']} + {a['tokens_saved']['completion']} saved by "
        "replay; "
    )


def test_a_continue_as_new_chain_counts_every_generations_tokens(clock: dn.FakeClock) -> None:
    """Each generation's journal goes when it continues as new; what it spent stays in the
    event that ended it, so the run's totals, its trace header, the widget and the metrics
    sum the whole chain — and a fork does not count the steps it copied again."""
    from openai import OpenAI

    from durable_nb.widgets._model import TraceModel

    llm_server = helpers.llm_server()
    with llm_server.LLMServer() as server:
        llm = dn.wrap(OpenAI(base_url=server.url, api_key="x", max_retries=0), key="llm")

        @dn.durable
        async def chain(ctx: dn.Context, gen: int) -> int:
            msgs = [{"role": "user", "content": f"generation {gen} " * (gen + 1)}]
            llm.chat.completions.create(model="m", messages=msgs)
            if gen < 2:
                ctx.continue_as_new(gen + 1)
            return gen

        assert dn.run(chain, 0, run_id="chain") == 2
        assert server.requests == 3
    bills = [_bill(llm_server, f"generation {g} " * (g + 1)) for g in range(3)]
    store = dn.get_store()
    t = trace.run_trace(store, "chain")
    assert t["run"]["generation"] == 2
    assert [s["tokens"]["prompt"] for s in t["steps"] if s["tokens"]] == [bills[2]["prompt"]]
    assert t["totals"]["tokens"] == _sum(*bills)  # the chain, not the last generation only
    assert t["totals"]["tokens_before"] == _sum(*bills[:2])
    assert t["totals"]["tokens_by_model"] == {"m": _sum(*bills)}
    total = _sum(*bills)
    assert f"tokens {total['prompt']} prompt + {total['completion']} completion spent" in (
        trace.format_trace(t)
    )
    model = TraceModel("chain")
    model.load_trace(t)
    assert (model.totals()["prompt_tokens"], model.totals()["completion_tokens"]) == (
        total["prompt"],
        total["completion"],
    )
    m = Client(store).metrics()
    assert m["by_run"]["chain"]["tokens"] == total and m["tokens"] == total

    clock.advance(10)
    fork = dn.fork("chain", from_step=1, run_id="chain-fork")  # copies the call, runs nothing
    assert fork.result(timeout=30) == 2
    m = Client(store).metrics()
    assert m["tokens"] == total  # the copied call counts for the run it was copied from
    assert m["by_run"]["chain-fork"]["tokens"] == {"prompt": 0, "completion": 0}
    assert m["by_run"]["chain-fork"]["tokens_saved"] == bills[2]  # it replayed the copy
