"""The ``durable-nb`` command: a thin layer over the engine's public API.

Exit codes: 0 success, 1 an error of durable_nb (the message says what to do), 2 misuse.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import click

from . import errors
from .trace import format_run, format_runs, run_info

__all__ = ["main"]


def _store(ctx: click.Context) -> Any:
    import durable_nb as dn

    url = ctx.obj.get("store") if ctx.obj else None
    return dn.set_store(url)


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
    rows = _store(ctx).list_runs(status=status)
    if not as_json:
        click.echo(format_runs(rows))
        return
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


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run and its steps as JSON.")
@click.pass_context
def show(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Show a run: status, custom status and its recorded steps."""
    info = run_info(_store(ctx), run_id)
    click.echo(json.dumps(info, indent=2) if as_json else format_run(info))


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


@cli.command("install-kernel")
@click.option(
    "--user", is_flag=True, help="For the current user, where any Jupyter finds it (the default)."
)
@click.option(
    "--sys-prefix",
    is_flag=True,
    help="Into this Python environment (sys.prefix), for a Jupyter installed in it.",
)
@click.option(
    "--prefix",
    type=click.Path(file_okay=False),
    help="Under PREFIX/share/jupyter/kernels (Jupyter must have PREFIX/share/jupyter on its path).",
)
@click.option(
    "--name",
    default="durable",
    show_default=True,
    help="Name of the kernel spec; an existing spec of that name is replaced.",
)
def install_kernel(user: bool, sys_prefix: bool, prefix: str | None, name: str) -> None:
    """Install the "Python 3 (durable)" Jupyter kernel: this Python with durable_nb loaded at
    start, so %%effect, %%durable and %durable work without %load_ext."""
    from . import _kernelspec

    if user + sys_prefix + (prefix is not None) > 1:
        raise click.UsageError("choose one of --user, --sys-prefix and --prefix")
    if not re.fullmatch(r"[a-zA-Z0-9._-]+", name):
        raise click.BadParameter(
            f"{name!r} is not a kernel name; use letters, digits, '-', '.' and '_'",
            param_hint="--name",
        )
    if sys_prefix:
        prefix = sys.prefix
    where, found = _kernelspec.install(name=name, user=prefix is None, prefix=prefix)
    click.echo(f"installed kernel {_kernelspec.DISPLAY_NAME!r} as {name.lower()!r} in {where}")
    click.echo(f"it runs {_kernelspec.interpreter()} with durable_nb loaded")
    if not found:
        share = os.path.dirname(os.path.dirname(where))
        click.echo(
            f"note: Jupyter does not look in {share}; add it to JUPYTER_PATH to use the kernel",
            err=True,
        )


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
