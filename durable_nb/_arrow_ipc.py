"""Arrow IPC streams: the one way a table becomes bytes and back.

Used where a table cannot stay a table: the codecs (values DuckDB cannot hold natively,
dictionaries), the PostgreSQL store (tables kept in ``bytea`` columns), export files, and
the hasher (columns of types it has no layout walk for). An IPC stream restores every
Arrow type exactly.
"""

from __future__ import annotations

from typing import Any, cast

__all__ = ["ipc_buffer", "ipc_bytes", "read_ipc"]


def ipc_buffer(data: Any) -> Any:
    """A ``pyarrow.Buffer`` holding ``data`` (a Table or a RecordBatch) as one IPC stream."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return sink.getvalue()


def ipc_bytes(data: Any) -> bytes:
    """``data`` (a Table or a RecordBatch) as the bytes of one IPC stream."""
    return cast(bytes, ipc_buffer(data).to_pybytes())


def read_ipc(data: bytes | memoryview) -> Any:
    """The ``pyarrow.Table`` an IPC stream holds."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
