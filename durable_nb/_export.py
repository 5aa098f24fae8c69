"""The export file: a store's runs and cached effects as JSON lines, for ``durable-nb
export``/``import`` and :meth:`~durable_nb.client.Client.export`.

One JSON object a line: a header naming the format and its version, then each run followed
by the records it owns (its journal, key/value state and streams), its signals and events,
then the cached effects, and last (since version 2) an ``end`` record with the counts of
what came before, so a file cut short at a line boundary is refused rather than imported in
part. Payloads travel as base64 (tables as Arrow IPC); signed pickles keep their signature,
and are signed again with the importing store's key when the exporting store's key is
given. Reading checks the whole file before anything is written: every field's type, the
JSON of signal payloads, and the counts of the end record.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import IO, TYPE_CHECKING, Any

from ._arrow_ipc import ipc_bytes, read_ipc
from ._journal import RUN_STATUSES, run_of_scope, run_scopes, storable_text
from .errors import (
    ArgumentTypeError,
    ExportFormatError,
    PayloadIntegrityError,
    UnstorableValueError,
)
from .store import EffectRecord, EventRecord, RunRecord, SignalRecord, Store

if TYPE_CHECKING:
    from ._codecs import Payload, Signer

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "open_text", "read_export", "write_export"]

#: the first line of an export file names the format and its version
EXPORT_FORMAT = "durable_nb-export"
EXPORT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 files have no end record
#: JSON types a record's fields may have, by the field's declared type
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "str | None": (str, type(None)),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "RunStatus": (str,),
    "RecordKind": (str,),
    "EventKind": (str,),
}
_SIGNED_CODECS = ("pickle", "error")  # payloads whose bytes carry the store key's MAC


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_export(
    f: IO[str], store: Store, recs: Sequence[RunRecord], cached: Sequence[str]
) -> dict[str, int]:
    """Write the runs ``recs`` with everything they own, then the effects of the ``cached``
    scopes, to ``f``; returns counts of what was written."""
    counts = {"runs": 0, "effects": 0, "signals": 0, "events": 0}
    f.write(
        json.dumps(
            {
                "type": "header",
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "source": store.url,
                "exported_at": time.time(),
            }
        )
        + "\n"
    )
    for rec in recs:
        f.write(json.dumps({"type": "run", **_run_out(rec)}) + "\n")
        counts["runs"] += 1
        for scope in run_scopes(rec.run_id):
            for e in store.load_effects(scope):
                f.write(json.dumps({"type": "effect", **_effect_out(e)}) + "\n")
                counts["effects"] += 1
        for sig in store.list_signals(rec.run_id):
            f.write(json.dumps({"type": "signal", **_plain(sig)}) + "\n")
            counts["signals"] += 1
        for ev in store.load_events(rec.run_id):
            f.write(json.dumps({"type": "event", **_plain(ev)}) + "\n")
            counts["events"] += 1
    for scope in cached:
        for e in store.load_effects(scope):
            f.write(json.dumps({"type": "effect", **_effect_out(e)}) + "\n")
            counts["effects"] += 1
    f.write(json.dumps({"type": "end", **counts}) + "\n")
    return counts


def _plain(obj: SignalRecord | EventRecord) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _payload_out(p: Payload | None) -> dict[str, Any] | None:
    if p is None:
        return None
    out: dict[str, Any] = {"codec": p.codec, "data": _b64(p.data)}
    if p.table is not None:
        out["table"] = _b64(ipc_bytes(p.table))
    return out


def _run_out(rec: RunRecord) -> dict[str, Any]:
    out = {f.name: getattr(rec, f.name) for f in fields(rec)}
    for name in ("args", "result", "error"):
        out[name] = _payload_out(getattr(rec, name))
    return out


def _effect_out(rec: EffectRecord) -> dict[str, Any]:
    out = {f.name: getattr(rec, f.name) for f in fields(rec)}
    out["payload"] = _payload_out(rec.payload)
    return out


class _Parsed:
    def __init__(self) -> None:
        self.runs: list[RunRecord] = []
        self.run_effects: dict[str, list[EffectRecord]] = {}
        self.cached: list[EffectRecord] = []
        self.signals: dict[str, list[SignalRecord]] = {}
        self.events: dict[str, list[EventRecord]] = {}


def _bad(where: str, problem: str) -> ExportFormatError:
    return ExportFormatError(
        f"{where}: {problem}; the file is not a durable_nb export or is damaged — export it "
        "again with `durable-nb export`"
    )


def read_export(
    source: str | os.PathLike[str] | IO[str], signer: Signer, src_signer: Signer | None
) -> _Parsed:
    from ._codecs import CODECS, TEXT_ERROR_PREFIX, Payload  # text errors carry no pickle

    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the export"
    out = _Parsed()
    resigned = foreign = 0

    def payload(d: Any, where: str) -> Payload | None:
        nonlocal resigned, foreign
        if d is None:
            return None
        if not isinstance(d, dict) or d.get("codec") not in CODECS:
            raise _bad(where, f"a payload must be {{codec, data[, table]}}, got {d!r:.80}")
        try:
            data = base64.b64decode(d["data"], validate=True)
            table_b = base64.b64decode(d["table"], validate=True) if d.get("table") else None
        except (KeyError, TypeError, ValueError) as e:  # binascii.Error is a ValueError
            raise _bad(where, f"a payload's bytes are not base64 ({e})") from None
        if d["codec"] in _SIGNED_CODECS and not data.startswith(TEXT_ERROR_PREFIX):
            try:
                signer.verify(data)
            except PayloadIntegrityError:
                if src_signer is None:
                    foreign += 1
                else:
                    try:
                        data = signer.sign(src_signer.verify(data))
                    except PayloadIntegrityError:
                        raise PayloadIntegrityError(
                            f"{where}: a pickled payload is signed neither by this store's key "
                            "nor by the source_key given: it was tampered with or the key is "
                            "not the exporting store's; nothing was imported"
                        ) from None
                    resigned += 1
        table = None
        if table_b is not None:
            try:
                table = read_ipc(memoryview(table_b))
            except Exception as e:
                raise _bad(where, f"a table payload is not an Arrow IPC stream ({e})") from None
        return Payload(d["codec"], data, table)

    def build(cls: type[Any], d: dict[str, Any], where: str, **extra: Any) -> Any:
        names = {f.name for f in fields(cls)}
        for f in fields(cls):
            # a wrong type would reach the store and fail there (or poison its journal)
            allowed = _FIELD_TYPES.get(str(f.type))
            if allowed is None or f.name not in d:
                continue
            v = d[f.name]
            if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
                raise _bad(where, f"field {f.name!r} of a {d.get('type')} record is {v!r:.80}")
            if isinstance(v, str) and not storable_text(v):
                raise _bad(where, f"field {f.name!r} of a {d.get('type')} record is not text")
        try:
            return cls(**{k: v for k, v in d.items() if k in names and k not in extra}, **extra)
        except TypeError as e:
            raise _bad(where, f"a {d.get('type')} record lacks a field ({e})") from None

    counted = {"runs": 0, "effects": 0, "signals": 0, "events": 0}
    version: object = None
    ended = False
    with open_text(source, "r") as f:
        header_seen = False
        for lineno, line in enumerate(f, 1):
            where = f"{name}, line {lineno}"
            if not line.strip():
                continue
            if ended:
                raise _bad(where, "a record follows the end record")
            try:
                d = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise _bad(where, f"not JSON ({e})") from None
            kind = d.get("type") if isinstance(d, dict) else None
            if kind in ("run", "effect", "signal", "event"):
                counted[f"{kind}s" if kind != "effect" else "effects"] += 1
            if not header_seen:
                if kind != "header" or d.get("format") != EXPORT_FORMAT:
                    raise _bad(where, f"the first line must be the {EXPORT_FORMAT} header")
                version = d.get("version")
                if version not in _READABLE_VERSIONS or isinstance(version, bool):
                    raise ExportFormatError(
                        f"{where}: the export has format version {version!r}, this "
                        f"durable_nb reads versions {_READABLE_VERSIONS[0]}-{EXPORT_VERSION}; "
                        "import it with the durable_nb version that exported it"
                    )
                header_seen = True
            elif kind == "end" and version != 1:
                got = {k: d.get(k) for k in counted}
                if got != counted:
                    raise _bad(where, f"the end record counts {got}, the file holds {counted}")
                ended = True
            elif kind == "run":
                rec = build(
                    RunRecord,
                    d,
                    where,
                    args=payload(d.get("args"), where),
                    result=payload(d.get("result"), where),
                    error=payload(d.get("error"), where),
                )
                if rec.status not in RUN_STATUSES:
                    raise _bad(where, f"unknown run status {rec.status!r}")
                out.runs.append(rec)
            elif kind == "effect":
                eff = build(EffectRecord, d, where, payload=payload(d.get("payload"), where))
                if eff.payload is None:
                    raise _bad(where, "an effect record has no payload")
                rid = run_of_scope(eff.scope)
                if rid is not None:
                    out.run_effects.setdefault(rid, []).append(eff)
                else:
                    out.cached.append(eff)
            elif kind == "signal":
                sig = build(SignalRecord, d, where)
                try:
                    json.loads(sig.payload)
                except (ValueError, RecursionError):
                    raise _bad(
                        where, f"a signal's payload is not JSON: {sig.payload!r:.80}"
                    ) from None
                out.signals.setdefault(sig.run_id, []).append(sig)
            elif kind == "event":
                ev = build(EventRecord, d, where)
                out.events.setdefault(ev.run_id, []).append(ev)
            else:
                raise _bad(where, f"unknown record type {kind!r}")
        if not header_seen:
            raise _bad(name, "it is empty")
        if version != 1 and not ended:
            raise _bad(name, "it has no end record: it was cut short")
    known = {r.run_id for r in out.runs}
    for rid in [*out.run_effects, *out.signals, *out.events]:
        if rid not in known:
            raise _bad(name, f"it has records of run {rid!r} but not the run itself")
    if foreign and not signer.can_sign:
        raise UnstorableValueError(
            f"{name}: {foreign} pickled payload(s) cannot be stored: the target store has no "
            "signing key for pickles; set DURABLE_NB_KEY (the team's key) for it, then import "
            "again with --source-key-file / source_key=; nothing was imported"
        )
    if foreign:
        raise PayloadIntegrityError(
            f"{name}: {foreign} pickled payload(s) are signed by another key than this "
            "store's; pass the exporting store's key (source_key=..., or `durable-nb import "
            "--source-key-file PATH`; a DuckDB store keeps it in <store>.d/key unless "
            "DURABLE_NB_KEY is set), or give both stores the same DURABLE_NB_KEY; nothing was "
            "imported"
        )
    return out


@contextmanager
def open_text(target: str | os.PathLike[str] | IO[str], mode: str) -> Iterator[IO[str]]:
    if isinstance(target, (str, os.PathLike)):
        with open(target, mode, encoding="utf-8") as f:
            yield f
    elif isinstance(target, io.TextIOBase) or hasattr(target, "write" if mode == "w" else "read"):
        yield target
    else:
        raise ArgumentTypeError(
            f"expected a path or a text file, got {target!r}; pass a path or open(path, {mode!r})"
        )
