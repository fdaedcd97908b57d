"""``optim-service``: serve and migrate here; ``runs`` and ``checkpoints`` talk to a running service."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import typer

from optim_client.cli import checkpoints_app, runs_app

from . import allocator, logs, respawn
from .settings import Settings

if TYPE_CHECKING:
    import uvicorn

cli = typer.Typer(help="optim-service: the optimizer of a training run, hosted.", no_args_is_help=True)
cli.add_typer(runs_app, name="runs")
cli.add_typer(checkpoints_app, name="checkpoints")


@cli.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    log_level: str = typer.Option(None, help="debug, info, warning, error (default OPTIM_LOG_LEVEL, info)."),
) -> None:
    """Start the HTTP service (the database must be at the latest migration: see `migrate`)."""
    import uvicorn

    from .app import create_app
    from .protocol import BodyProtocol

    settings = Settings()
    level = log_level or settings.log_level
    logs.configure(level, settings.log_format)
    if settings.tune_allocator:
        allocator.tune()
    config = uvicorn.Config(
        create_app(settings, host=host, live_answers=True),
        host=host,
        port=port,
        log_level=level,
        log_config=None,  # uvicorn's loggers go through ours (logs.configure)
        access_log=False,  # the service writes one line per request itself (logs.RequestLog)
        loop="uvloop",
        http=BodyProtocol,  # httptools, without uvicorn's two copies of each request body (service/protocol.py)
        timeout_graceful_shutdown=30,
    )
    if not settings.restart_after_crash:
        raise typer.Exit(_serve(config))
    config.load()  # uvicorn's protocol and loop modules, imported here once rather than by each serving process
    respawn.exit_like(respawn.serve(config.bind_socket(), lambda sock: _serve(config, [sock])))


def _serve(config: uvicorn.Config, sockets: list[socket.socket] | None = None) -> int:
    """Serve until stopped; 3 (uvicorn's code for it) if the server did not start."""
    import uvicorn

    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    return 0 if server.started else 3


@cli.command()
def migrate(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Upgrade the database (OPTIM_DATABASE_URL) to the latest schema."""
    from .storage import migrate as upgrade

    rebuilt = upgrade(Settings(), revision)
    typer.echo(f"database at {revision}")
    if rebuilt:
        typer.echo(f"SQLite pages: {rebuilt[0]} -> {rebuilt[1]} bytes (the file was rebuilt: blob writes are ~3x faster)")


keys_app = typer.Typer(help="API keys (stored hashed; a key is shown once).", no_args_is_help=True)
cli.add_typer(keys_app, name="keys")


def _database() -> Any:
    from .storage import Database, make_engine

    return Database(make_engine(Settings()))


@keys_app.command("create")
def keys_create(tenant: str = typer.Option(..., "--tenant", help="The tenant the key acts as.")) -> None:
    """Create an API key for a tenant and print it (it is not shown again)."""
    from .auth import create_key

    with _database().write("creating an API key") as repo:
        try:
            key = create_key(repo, tenant)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """Every key: tenant, prefix, created, revoked."""
    with _database().read("listing API keys") as repo:
        for k in repo.api_keys():
            state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
            typer.echo(f"{k.tenant}\t{k.prefix}\t{k.created_at}\t{state}")


@keys_app.command("revoke")
def keys_revoke(prefix: str) -> None:
    """Revoke the key that starts with PREFIX (as `keys list` shows it)."""
    with _database().write("revoking API keys") as repo:
        count = repo.revoke_api_keys(prefix)
    typer.echo(f"revoked {count} key(s)")
    if not count:
        raise typer.Exit(1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
