"""The `audiokv` command line: a thin typer layer; every command's work lives in the library."""

from __future__ import annotations

import functools
import warnings
import os
import sys
from typing import Callable

import typer
from typer.core import TyperGroup

from audiokv_cli import __version__
from audiokv_cli.commands.common import console
from audiokv_cli.commands.bench import bench
from audiokv_cli.commands.infer import infer
from audiokv_cli.commands.models import models
from audiokv_cli.errors import AudiokvError

# typer may vendor click: take its exception classes from typer's own hierarchy rather than importing click.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, an unknown option) as one line on stderr with exit code 2, like every
    other error, instead of click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERROR as error:
            if type(error).__name__ == "NoArgsIsHelpError" and error.ctx is not None:  # bare command: its help
                print(error.ctx.get_help())
                sys.exit(error.exit_code)
            command = f" {error.ctx.info_name}" if error.ctx and error.ctx.parent else ""
            print(f"error: {error.format_message()} (see audiokv{command} --help)", file=sys.stderr)
            sys.exit(error.exit_code)
        except _CLICK_EXCEPTION as error:
            print(f"error: {error.format_message()}", file=sys.stderr)
            sys.exit(error.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
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


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """audiokv's own warnings about the user's input (a truncated file, a budget past the merge cliff) as one yellow
    line, not Python's two."""
    from audiokv_cli.errors import AudiokvWarning

    if issubclass(category, AudiokvWarning):
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def user_errors(command: Callable) -> Callable:
    """Library errors become one red line and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _one_line_warning
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
