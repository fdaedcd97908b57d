"""``optim-service``: serve and migrate here; ``runs`` and ``checkpoints`` talk to a running service."""

from __future__ import annotations

import logging

import typer
from alembic import command

from optim_client.cli import checkpoints_app, runs_app

from .db import alembic_config
from .settings import Settings

cli = typer.Typer(help="optim-service: the optimizer of a training run, hosted.", no_args_is_help=True)
cli.add_typer(runs_app, name="runs")
cli.add_typer(checkpoints_app, name="checkpoints")


@cli.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    log_level: str = typer.Option("info"),
) -> None:
    """Start the HTTP service (the database must be at the latest migration: see `migrate`)."""
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=30,
    )


@cli.command()
def migrate(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Upgrade the database (OPTIM_DATABASE_URL) to the latest schema."""
    settings = Settings()
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    from .db import make_engine

    make_engine(settings).dispose()  # creates the SQLite file with its page size before Alembic touches it
    command.upgrade(alembic_config(settings.database_url), revision)
    typer.echo(f"database at {revision}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
