"""Run the examples of one guide page, in order, in one namespace (as a reader would type
them into one kernel): ``python docs_runner.py BLOCKS.json``.

``python`` blocks are executed as plain Python (``exec``); ``ipython`` blocks as notebook
cells, through a real IPython shell with ``%load_ext durable_nb``, so the magics run too.
A local OpenAI-compatible server (``notebooks/llm_server.py``) is started first and named
by ``OPENAI_BASE_URL``/``OPENAI_API_KEY``, so examples that use the ``openai`` package run
against it. The first failing block is reported with its page and line; exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    blocks = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, str(ROOT / "notebooks"))
    import llm_server

    server = llm_server.start()
    os.environ["OPENAI_BASE_URL"] = server.url
    os.environ["OPENAI_API_KEY"] = "unused"

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "durable_nb")
    ns = shell.user_ns
    for block in blocks:
        where, lang, code = block["where"], block["lang"], block["code"]
        print(f"--- {where} ({lang})", flush=True)
        if lang == "python":
            try:
                exec(compile(code, where, "exec"), ns)
            except BaseException:
                traceback.print_exc()
                print(f"FAILED: {where}", flush=True)
                return 1
        else:
            result = shell.run_cell(code, store_history=True)
            if not result.success:
                print(f"FAILED: {where}: {result.error_before_exec or result.error_in_exec!r}")
                return 1
    print(f"requests served by the local LLM server: {server.requests}")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
