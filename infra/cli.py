"""``rtpipe stack``: start, stop and inspect the local Kafka/Redis/Prometheus stack.

``stages/cli.py`` mounts ``stack_app``; ``python -m infra.cli`` runs it on its own (the
Makefile's ``stack-down`` does, so it works before the package is installed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra import stack
from stages.shared.settings import Settings

stack_app = typer.Typer(
    name="stack",
    help="Local stack: Kafka (KRaft), Redis and Prometheus, under RTPIPE_HOME/run; single "
    "nodes by default, a cluster with --brokers 3 --redis-cluster.",
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


BrokersOption = Annotated[
    int | None,
    typer.Option(
        "--brokers",
        min=1,
        help="Kafka nodes: 1 is the single-node stack; 3 a KRaft quorum of combined "
        "broker/controller nodes with replication factor 3 (RTPIPE_STACK__KAFKA_BROKERS).",
    ),
]
RedisClusterOption = Annotated[
    bool | None,
    typer.Option(
        "--redis-cluster/--no-redis-cluster",
        help="A Redis Cluster of three masters with one replica each instead of one "
        "redis-server (RTPIPE_STACK__REDIS_CLUSTER).",
    ),
]

SecureOption = Annotated[
    bool | None,
    typer.Option(
        "--secure/--no-secure",
        help="Kafka on SASL_SSL (SCRAM-SHA-512) and Redis on TLS with ACL users; the CA, "
        "certificates, passwords and the clients' RTPIPE_* variables are made under "
        "run/secure/ (RTPIPE_STACK__SECURE).",
    ),
]


def _settings(
    brokers: int | None = None, redis_cluster: bool | None = None, secure: bool | None = None
) -> Settings:
    """Settings from the environment, with the cluster options of the command line on top."""
    settings = Settings()
    update: dict[str, object] = {}
    if brokers is not None:
        update["kafka_brokers"] = brokers
    if redis_cluster is not None:
        update["redis_cluster"] = redis_cluster
    if secure is not None:
        update["secure"] = secure
    if not update:
        return settings
    return settings.model_copy(update={"stack": settings.stack.model_copy(update=update)})


def _act(action: Callable[[], list[str]], done: str, nothing: str) -> None:
    """Run a stack action and say which components it acted on (``done: a, b``, or
    ``nothing``); a StackError is the command's error (exit 1)."""
    try:
        names = action()
    except stack.StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(f"{done}: {', '.join(names)}" if names else nothing)


@stack_app.command()
def up(
    only: OnlyOption = None,
    brokers: BrokersOption = None,
    redis_cluster: RedisClusterOption = None,
    secure: SecureOption = None,
) -> None:
    """Start the components that are not already healthy and wait until they are."""
    settings = _settings(brokers, redis_cluster, secure)
    _act(
        lambda: stack.up(settings, components=_components(only)),
        "started",
        "already running: nothing started",
    )
    if settings.stack.secure:
        env = stack.secure_env_file(settings)
        typer.echo(f"secure stack: the clients' settings are in {env} (set -a; . {env}; set +a)")


@stack_app.command()
def down(only: OnlyOption = None) -> None:
    """Stop the components this run dir started, every cluster node included (never a
    process it does not own)."""
    settings = Settings()
    _act(lambda: stack.down(settings, only=_components(only)), "stopped", "nothing to stop")


@stack_app.command()
def status(
    brokers: BrokersOption = None,
    redis_cluster: RedisClusterOption = None,
    secure: SecureOption = None,
) -> None:
    """Show each component's process, port and health (each node of a cluster stack)."""
    settings = _settings(brokers, redis_cluster, secure)
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
