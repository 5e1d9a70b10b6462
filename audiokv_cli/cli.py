"""The `audiokv` command line: a thin typer layer; every command's work lives in the library."""

from __future__ import annotations

import functools
import os
from typing import Callable

import typer

from audiokv_cli import __version__
from audiokv_cli.commands.common import console
from audiokv_cli.commands.bench import bench
from audiokv_cli.commands.infer import infer
from audiokv_cli.commands.models import models
from audiokv_cli.errors import AudiokvError

app = typer.Typer(
    name="audiokv",
    help="KV-cache eviction for audio-language models: profile audio-critical heads, run compressed inference, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"audiokv {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """KV-cache eviction for audio-language models."""


def user_errors(command: Callable) -> Callable:
    """Library errors become one red line and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AudiokvError as error:
            console.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _register(name: str, command: Callable) -> None:
    app.command(name, no_args_is_help=True)(user_errors(command))


_register("infer", infer)
_register("bench", bench)
app.command("models")(user_errors(models))

try:
    from audiokv_cli.commands import profile as _profile
except ImportError:  # pragma: no cover - profiling commands not installed in this build
    _profile = None
if _profile is not None:
    _register("profile", _profile.profile)
    _register("probe-set", _profile.probe_set)
    _register("inspect", _profile.inspect)
    _register("merge", _profile.merge)

try:
    from audiokv_cli.commands import evaluate as _evaluate
except ImportError:  # pragma: no cover
    _evaluate = None
if _evaluate is not None:
    _register("eval", _evaluate.evaluate)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
