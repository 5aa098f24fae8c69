"""How a record becomes a row and back: one column order for every table-backed store.

The DuckDB and PostgreSQL stores keep the same columns in the same order; they differ only
in where a payload's Arrow table goes (DuckDB: a table of its own, named in the row;
PostgreSQL: the table's IPC stream in the row). So each payload takes three columns
``(codec, data, table)``, and the store says what its ``table`` column holds: it passes the
value to write, and a ``read_payload(codec, data, table)`` that turns the three back into
a :class:`~durable_nb._codecs.Payload`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._protocol import EffectRecord, EventRecord, RunRecord, SignalRecord

if TYPE_CHECKING:
    from .._codecs import Payload

__all__ = [
    "EFFECT_COLUMNS",
    "EVENT_COLUMNS",
    "RUN_COLUMNS",
    "RUN_PAYLOADS",
    "RUN_TABLE_COLUMNS",
    "SIGNAL_COLUMNS",
    "ReadPayload",
    "effect_from_row",
    "effect_row",
    "event_row",
    "run_from_row",
    "run_row",
    "signal_row",
]

#: ``(codec, data, table column)`` -> the payload, or ``None`` for an absent one
ReadPayload = Callable[[Any, Any, Any], "Payload | None"]

# fmt: off
#: the columns of an effect row (``table`` is what the store keeps of the payload's table)
EFFECT_COLUMNS = (
    "scope", "identity", "version", "input_hash", "occurrence", "codec", "data", "table",
    "is_error", "kind", "seq", "started_at", "duration", "detail",
)
RUN_COLUMNS = (
    "run_id", "workflow", "status", "created_at", "updated_at",
    "args_codec", "args_data", "args_table", "result_codec", "result_data", "result_table",
    "error_codec", "error_data", "error_table",
    "custom_status", "status_version", "parent_id", "executions", "detail",
    "input_hash", "code_version", "generation", "version",
)
SIGNAL_COLUMNS = ("run_id", "signal_id", "name", "payload", "sent_at")
EVENT_COLUMNS = ("run_id", "event_id", "ts", "kind", "data")
# fmt: on
#: a run's payloads, in row order
RUN_PAYLOADS = ("args", "result", "error")
#: positions in a run row of the table columns of its args, result and error
RUN_TABLE_COLUMNS = (7, 10, 13)


def effect_row(rec: EffectRecord, table: Any) -> tuple[Any, ...]:
    """The row of an effect record; ``table`` is what goes in the table column."""
    p = rec.payload
    return (
        rec.scope,
        rec.identity,
        rec.version,
        rec.input_hash,
        rec.occurrence,
        p.codec,
        p.data,
        table if p.table is not None else None,
        rec.is_error,
        rec.kind,
        rec.seq,
        rec.started_at,
        rec.duration,
        rec.detail,
    )


def effect_from_row(r: Sequence[Any], read_payload: ReadPayload) -> EffectRecord:
    payload = read_payload(r[5], r[6], r[7])
    assert payload is not None  # an effect always has one
    return EffectRecord(
        scope=r[0],
        identity=r[1],
        version=r[2],
        input_hash=r[3],
        occurrence=r[4],
        payload=payload,
        is_error=r[8],
        kind=r[9],
        seq=r[10],
        started_at=r[11],
        duration=r[12],
        detail=r[13],
    )


def _payload_cols(p: Payload | None, table: Any) -> tuple[Any, Any, Any]:
    if p is None:
        return (None, None, None)
    return (p.codec, p.data, table if p.table is not None else None)


def run_row(run: RunRecord, tables: Sequence[Any]) -> tuple[Any, ...]:
    """The row of a run; ``tables`` holds the table column of its args, result and error."""
    return (
        run.run_id,
        run.workflow,
        run.status,
        run.created_at,
        run.updated_at,
        *_payload_cols(run.args, tables[0]),
        *_payload_cols(run.result, tables[1]),
        *_payload_cols(run.error, tables[2]),
        run.custom_status,
        run.status_version,
        run.parent_id,
        run.executions,
        run.detail,
        run.input_hash,
        run.code_version,
        run.generation,
        run.version,
    )


def run_from_row(r: Sequence[Any], read_payload: ReadPayload) -> RunRecord:
    return RunRecord(
        run_id=r[0],
        workflow=r[1],
        status=r[2],
        created_at=r[3],
        updated_at=r[4],
        args=read_payload(r[5], r[6], r[7]),
        result=read_payload(r[8], r[9], r[10]),
        error=read_payload(r[11], r[12], r[13]),
        custom_status=r[14],
        status_version=r[15],
        parent_id=r[16],
        executions=r[17],
        detail=r[18],
        input_hash=r[19],
        code_version=r[20],
        generation=r[21],
        version=r[22],
    )


def signal_row(s: SignalRecord) -> tuple[Any, ...]:
    return (s.run_id, s.signal_id, s.name, s.payload, s.sent_at)


def signal_from_row(r: Sequence[Any]) -> SignalRecord:
    return SignalRecord(*r)


def event_row(e: EventRecord) -> tuple[Any, ...]:
    return (e.run_id, e.event_id, e.ts, e.kind, e.data)


def event_from_row(r: Sequence[Any]) -> EventRecord:
    return EventRecord(*r)
