"""``ctx.log``: a run's logging, which does not repeat on replay."""

from __future__ import annotations

import logging
from typing import Any

from .. import _hashing
from .._journal import LogDetail, detail_text
from ..errors import ArgumentTypeError
from ._state import RunState, replay

__all__ = ["RunLog"]


class RunLog:
    """``ctx.log``: logging that does not repeat on replay. Each call is a journaled step
    (``kind="log"``); a replayed call is skipped. The message goes to the ``logging``
    logger ``durable_nb.run.<workflow name>`` with ``run_id`` as an extra attribute."""

    __slots__ = ("_state",)

    def __init__(self, state: RunState) -> None:
        self._state = state

    @property
    def logger(self) -> logging.Logger:
        wf = self._state.workflow
        return logging.getLogger("durable_nb.run." + (wf.name if wf is not None else "?"))

    def log(self, level: int, msg: object, *args: Any) -> None:
        if not isinstance(level, int) or isinstance(level, bool):
            raise ArgumentTypeError(f"level must be a logging level (an int), got {level!r}")
        text = str(msg) % args if args else str(msg)
        st = self._state
        key4, seq, rec = st.step("dn.log", _hashing.hash_value((level, text)).hex())
        if rec is not None:
            replay(st, rec)
            return
        # logged before it is recorded: a crash in between repeats a line rather than lose it
        self.logger.log(level, "%s", text, extra={"run_id": st.run_id})
        detail = LogDetail(level=logging.getLevelName(level), message=text[:1000])
        st.record_value(key4, seq, None, "log", detail_text(detail))

    def debug(self, msg: object, *args: Any) -> None:
        self.log(logging.DEBUG, msg, *args)

    def info(self, msg: object, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: object, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: object, *args: Any) -> None:
        self.log(logging.ERROR, msg, *args)

    def critical(self, msg: object, *args: Any) -> None:
        self.log(logging.CRITICAL, msg, *args)
