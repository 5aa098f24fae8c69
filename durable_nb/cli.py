"""The ``durable-nb`` command: a thin layer over the engine's public API.

Exit codes: 0 success, 1 an error of durable_nb (the message says what to do), 2 misuse.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from . import errors

__all__ = ["main"]


def _store(ctx: click.Context) -> Any:
    import durable_nb as dn

    url = ctx.obj.get("store") if ctx.obj else None
    return dn.set_store(url)


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    envvar="DURABLE_NB_STORE",
    default=None,
    help="Store to use: a DuckDB path, :memory: or postgresql://... "
    "(default: $DURABLE_NB_STORE or .durable_nb/store.duckdb).",
)
@click.version_option(package_name="durable_nb")
@click.pass_context
def cli(ctx: click.Context, store: str | None) -> None:
    """Inspect and steer durable_nb runs in a store."""
    ctx.ensure_object(dict)
    ctx.obj["store"] = store


@cli.command()
@click.option(
    "--status", type=click.Choice(["running", "waiting", "completed", "failed", "cancelled"])
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def runs(ctx: click.Context, status: str | None, as_json: bool) -> None:
    """List runs, newest first."""
    store = _store(ctx)
    rows = store.list_runs(status=status)
    if as_json:
        for r in rows:
            click.echo(
                json.dumps(
                    {
                        "run_id": r.run_id,
                        "workflow": r.workflow,
                        "status": r.status,
                        "created_at": r.created_at,
                        "updated_at": r.updated_at,
                    }
                )
            )
        return
    if not rows:
        click.echo("no runs")
        return
    w = max(len(r.run_id) for r in rows)
    click.echo(f"{'RUN':<{w}}  {'STATUS':<10} {'UPDATED':<19}  WORKFLOW")
    for r in rows:
        click.echo(f"{r.run_id:<{w}}  {r.status:<10} {_fmt_time(r.updated_at)}  {r.workflow}")


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run and its steps as JSON.")
@click.pass_context
def show(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Show a run: status, result or error, and its recorded steps."""
    store = _store(ctx)
    rec = store.get_run(run_id)
    if rec is None:
        raise errors.RunNotFoundError(
            f"no run {run_id!r} in the store {store.url!r}; list runs with `durable-nb runs`"
        )
    steps = store.load_effects("run/" + run_id)
    info = {
        "run_id": rec.run_id,
        "workflow": rec.workflow,
        "status": rec.status,
        "executions": rec.executions,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "detail": json.loads(rec.detail) if rec.detail else None,
        "custom_status": json.loads(rec.custom_status) if rec.custom_status else None,
        "steps": [
            {
                "seq": s.seq,
                "kind": s.kind,
                "name": s.identity,
                "args": s.detail,
                "duration_s": round(s.duration, 6),
                "error": s.is_error,
            }
            for s in steps
        ],
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"run       {rec.run_id}\nworkflow  {rec.workflow}\nstatus    {rec.status}")
    if info["detail"]:
        click.echo(f"detail    {json.dumps(info['detail'])}")
    if info["custom_status"] is not None:
        click.echo(f"custom    {json.dumps(info['custom_status'])}")
    click.echo(f"steps     {len(steps)} recorded, {rec.executions} execution(s)")
    for s in steps:
        flag = " ERROR" if s.is_error else ""
        click.echo(
            f"  {s.seq:>5}  {s.kind:<8} {s.identity}{s.detail if s.kind == 'effect' else ''}"
            f"  {s.duration * 1000:.1f} ms{flag}"
        )


@cli.command()
@click.argument("run_id")
@click.argument("name")
@click.argument("payload", required=False, default="null")
@click.pass_context
def signal(ctx: click.Context, run_id: str, name: str, payload: str) -> None:
    """Send signal NAME with a JSON PAYLOAD to a run (delivered once, in order)."""
    try:
        value = json.loads(payload)
    except ValueError as e:
        raise click.BadParameter(
            f"{payload!r} is not JSON ({e}); quote strings: '\"yes\"', or pass true / 42 / "
            "'{\"k\": 1}'",
            param_hint="PAYLOAD",
        ) from None
    import durable_nb as dn

    _store(ctx)
    dn.get_job(run_id).signal(name, value)
    click.echo(f"sent {name!r} to {run_id}")


@cli.command()
@click.argument("run_id")
@click.option("--reason", default="cancelled from the command line", show_default=True)
@click.pass_context
def cancel(ctx: click.Context, run_id: str, reason: str) -> None:
    """Cancel a run; a run that no process executes is marked cancelled at once."""
    import durable_nb as dn

    _store(ctx)
    dn.cancel(run_id, reason)
    click.echo(f"cancel requested for {run_id}")


@cli.command()
@click.argument("run_id")
@click.pass_context
def forget(ctx: click.Context, run_id: str) -> None:
    """Delete a run with its recorded steps, signals and events."""
    store = _store(ctx)
    if not store.delete_run(run_id):
        raise errors.RunNotFoundError(f"no run {run_id!r} in the store {store.url!r}")
    click.echo(f"forgot {run_id}")


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return 2
    except errors.DurableError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    finally:
        from .engine import runtime

        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
