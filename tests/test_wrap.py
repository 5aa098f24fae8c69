"""``dn.wrap``: method calls of a wrapped object are effects, in cells and in runs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

import durable_nb as dn
from durable_nb.errors import ArgumentError, ArgumentTypeError, UnhashableInputError

from . import helpers
from .helpers import restart, run

SDK = """
import threading
import durable_nb as dn

class Completions:
    def __init__(self, owner):
        self._owner = owner
    def create(self, model, messages, stream=False):
        tick(messages[-1])
        text = f"{self._owner.base_url}/{model}: {messages[-1]}"
        if stream:
            return (word for word in text.split("/"))
        return {"text": text}
    async def acreate(self, model, messages):
        tick(("async", messages[-1]))
        return {"text": messages[-1]}

class Chat:
    def __init__(self, owner):
        self.completions = Completions(owner)

class Client:
    def __init__(self, base_url):
        self.base_url = base_url
        self._lock = threading.Lock()
        self.chat = Chat(self)
    def flaky(self, n):
        tick(("flaky", n))
        if len(calls) < n:
            raise ConnectionError("try again")
        return "ok"
"""


def test_method_calls_of_a_wrapped_client_replay_after_a_restart(ip: InteractiveShell) -> None:
    run(ip, SDK)
    run(ip, 'client = dn.wrap(Client("http://a"))')
    ask = "r = client.chat.completions.create('m', ['hi'])"
    run(ip, ask)
    run(ip, ask)
    assert ip.user_ns["r"] == {"text": "http://a/m: hi"}
    assert ip.user_ns["calls"] == ["hi"]
    assert ip.user_ns["client"].base_url == "http://a"  # attributes pass through
    assert isinstance(ip.user_ns["client"].__wrapped__, ip.user_ns["Client"])
    restart(ip)
    run(ip, SDK)
    run(ip, 'client = dn.wrap(Client("http://a"))')
    run(ip, ask)
    assert ip.user_ns["calls"] == ["hi"]
    run(ip, "r = client.chat.completions.create('m', ['other'])")  # other arguments
    run(ip, 'client = dn.wrap(Client("http://b"))')  # another client: another key
    run(ip, ask)
    assert ip.user_ns["calls"] == ["hi", "other", "hi"]
    assert ip.user_ns["r"] == {"text": "http://b/m: hi"}


def test_streamed_and_async_calls_replay(ip: InteractiveShell) -> None:
    run(ip, SDK)
    run(ip, 'client = dn.wrap(Client("http://a"))')
    cell = "words = [w for w in client.chat.completions.create('m', ['s'], stream=True)]"
    run(ip, cell)
    run(ip, cell)
    assert ip.user_ns["words"] == ["http:", "", "a", "m: s"]
    assert ip.user_ns["calls"] == ["s"]
    cell = "a = await client.chat.completions.acreate('m', ['x'])"
    run(ip, cell)
    run(ip, cell)
    assert ip.user_ns["a"] == {"text": "x"}
    assert ip.user_ns["calls"] == ["s", ("async", "x")]


def test_wrapped_calls_in_effect_cells_and_runs(ip: InteractiveShell) -> None:
    run(ip, SDK)
    run(ip, 'client = dn.wrap(Client("http://a"))')
    cell = "%%effect\nr = client.chat.completions.create('m', ['e'])\n"
    run(ip, cell)
    run(ip, cell)
    assert ip.user_ns["calls"] == ["e"]
    durable = "%%durable wrapped\nr = client.chat.completions.create('m', ['d'])\nr['text']\n"
    assert run(ip, durable) == "http://a/m: d"
    restart(ip)
    run(ip, SDK)
    run(ip, 'client = dn.wrap(Client("http://a"))')
    assert run(ip, durable) == "http://a/m: d"
    assert ip.user_ns["calls"] == ["e", "d"]
    steps = [r.identity for r in dn.get_store().load_effects("run/wrapped")]
    assert steps == ["wrap:__main__.Client.chat.completions.create"]


def test_effect_options_apply(ip: InteractiveShell) -> None:
    run(ip, SDK)
    run(ip, 'client = dn.wrap(Client("http://a"), retry=dn.Retry(attempts=3, initial_delay=0))')
    assert run(ip, "client.flaky(3)") == "ok"
    assert ip.user_ns["calls"] == [("flaky", 3)] * 3
    run(ip, "client.flaky(3)")
    assert len(ip.user_ns["calls"]) == 3


def test_wrap_without_provenance_needs_a_key() -> None:
    class Client:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def get(self, x: int) -> int:
            return x * 2

    w = dn.wrap(Client())
    with pytest.raises(UnhashableInputError, match=r"^dn\.wrap: .* has no content hash and no "):
        w.get(1)
    assert dn.wrap(Client(), key="my-client").get(2) == 4


def test_wrap_misuse_is_a_clear_error() -> None:
    with pytest.raises(ArgumentTypeError, match=r"^dn\.wrap needs an object with methods"):
        dn.wrap(3)
    with pytest.raises(ArgumentTypeError, match=r"^key must be a non-empty str, got ''"):
        dn.wrap(threading.Event(), key="")
    with pytest.raises(ArgumentError, match=r"is wrapped already"):
        dn.wrap(dn.wrap(threading.Event(), key="e"))
    with pytest.raises(ArgumentError, match=r"^timeout must be a number of seconds"):
        dn.wrap(threading.Event(), key="e", timeout="soon")  # type: ignore[arg-type]


def test_the_real_openai_package_against_the_local_server(
    ip: InteractiveShell, tmp_path: Path
) -> None:
    llm_server = helpers.llm_server()
    with llm_server.LLMServer() as server:
        ip.user_ns["URL"] = server.url  # pushed: a str has a content hash
        make = "from openai import OpenAI\nllm = dn.wrap(OpenAI(base_url=URL, api_key='x'))"
        plain = (
            "r = llm.chat.completions.create(model='m', "
            "messages=[{'role': 'user', 'content': 'hi'}])"
        )
        streamed = (
            "s = llm.chat.completions.create(model='m', messages=[{'role': 'user', "
            "'content': 'go'}], stream=True, stream_options={'include_usage': True})\n"
            "text = ''.join(c.choices[0].delta.content or '' for c in s if c.choices)\n"
            "usage = [c.usage for c in s if c.usage][0]"
        )
        effect = (  # the case: a client made by a cell, used by a %%effect cell
            "%%effect\n"
            "e = raw.chat.completions.create(model='m', messages=[{'role': 'user', "
            "'content': 'cell'}])\n"
        )
        for _ in range(2):
            restart(ip)
            ip.user_ns["URL"] = server.url
            run(ip, "import durable_nb as dn")
            run(ip, make)
            run(ip, plain)
            run(ip, streamed)
            run(ip, "raw = OpenAI(base_url=URL, api_key='x')")
            run(ip, effect)
        assert server.paths == {"/v1/chat/completions": 3}
        ns: dict[str, Any] = ip.user_ns
        assert ns["r"].usage.total_tokens > 0
        assert ns["text"] == llm_server.reply_for([{"role": "user", "content": "go"}])
        assert ns["usage"].completion_tokens == len(ns["text"].split())
        assert ns["e"].choices[0].message.content


def test_a_client_wrapped_and_used_in_one_cell_is_keyed_by_that_cell(
    ip: InteractiveShell,
) -> None:
    run(ip, SDK)
    cell = "c = dn.wrap(Client('http://a'))\nr = c.chat.completions.create('m', ['one'])"
    run(ip, cell)
    restart(ip)
    run(ip, SDK)
    run(ip, cell)
    assert ip.user_ns["calls"] == ["one"]


def test_an_httpx_style_client_replays_its_responses(ip: InteractiveShell) -> None:
    llm_server = helpers.llm_server()
    with llm_server.LLMServer() as server:
        ip.user_ns["URL"] = server.url
        run(ip, "import httpx, durable_nb as dn\nhttp = dn.wrap(httpx.Client())")
        for _ in range(2):
            run(ip, "r = http.get(URL + '/models')")
        assert ip.user_ns["r"].json()["data"][0]["id"] == llm_server.MODEL
        assert server.requests == 1
        run(ip, "http.__wrapped__.close()")  # the object itself: closing is no effect
