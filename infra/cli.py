"""``rtpipe stack``: start, stop and inspect the local Kafka/Redis/Prometheus stack.

``stages/cli.py`` mounts ``stack_app``; ``python -m infra.cli`` runs it on its own (the
Makefile's ``stack-down`` does, so it works before the package is installed).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra import stack
from stages.shared.settings import Settings

stack_app = typer.Typer(
    name="stack",
    help="Local single-machine stack: Kafka (KRaft), Redis and Prometheus, under RTPIPE_HOME/run.",
    no_args_is_help=True,
)

OnlyOption = Annotated[
    str | None,
    typer.Option(
        "--only",
        help=f"Comma-separated components, among: {','.join(stack.COMPONENTS)} (default: all).",
    ),
]


def _components(only: str | None) -> list[str]:
    if only is None:
        return list(stack.COMPONENTS)
    return [part.strip() for part in only.split(",") if part.strip()]


def _fail(exc: stack.StackError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=1)


@stack_app.command()
def up(only: OnlyOption = None) -> None:
    """Start the components that are not already healthy and wait until they are."""
    settings = Settings()
    try:
        started = stack.up(settings, components=_components(only))
    except stack.StackError as exc:
        raise _fail(exc) from exc
    typer.echo(f"started: {', '.join(started)}" if started else "already running: nothing started")


@stack_app.command()
def down(only: OnlyOption = None) -> None:
    """Stop the components this run dir started (never a process it does not own)."""
    settings = Settings()
    try:
        stopped = stack.down(settings, only=_components(only))
    except stack.StackError as exc:
        raise _fail(exc) from exc
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")


@stack_app.command()
def status() -> None:
    """Show each component's process, port and health."""
    settings = Settings()
    table = Table(title=f"rtpipe stack ({settings.run_dir})")
    for column in ("component", "running", "pid", "port", "healthy", "log"):
        table.add_column(column)
    for st in stack.status(settings).values():
        table.add_row(
            st.name,
            "yes" if st.running else "no",
            str(st.pid) if st.pid is not None else "-",
            str(st.port),
            "[green]yes[/green]" if st.healthy else "[red]no[/red]",
            str(st.log),
        )
    Console().print(table)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stack_app()
