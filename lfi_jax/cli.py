"""One command-line convention for every entry point.

    def main(argv: list[str]) -> int | None:
        parser = argparse.ArgumentParser(prog="python -m lfi_jax.train")
        add_config_flags(parser)
        parser.add_argument("--workdir", required=True)
        args = parser.parse_args(argv)
        config = config_from_args(args)
        ...

    if __name__ == "__main__":
        run_cli(main)

`run_cli(main_fn, argv=None)` calls `main_fn(argv)` with the arguments after the program name
(`--debug` removed) and exits with its return value (None = 0). A user error (`UserError`,
ValueError, KeyError, FileNotFoundError, NotADirectoryError, ...) ends with ONE line
`error: <message>` on stderr and exit code 2; any other exception is a bug and prints its
traceback (exit 1); `--debug` (or LFI_DEBUG=1) prints the traceback for user errors too.
Ctrl-C ends with a one-line note and exit code 130 (`interrupt_note` says what was kept).
argparse's own usage errors keep argparse's form (usage line, `error:` line, exit 2).

Config flags (`add_config_flags`, `config_from_args`):

    --config=configs/demo.py:ivit,runlocal      a config file and its argument (or a bundled
                                                config's name: --config=demo:ivit)
    --config.total_steps=200                    an override of one key (also --config.a.b 200)
    --config.data.eval_splits="('val',)"        a tuple, as a Python literal (mind the quotes) ...
    --config.data.eval_splits=val,test          ... or the comma form (one value: one element)

Overrides apply in order after the file's `get_config`; an unknown key fails with one line naming
it and the nearest valid keys, a value of the wrong type with one line naming the key. See
`lfi_jax.config` for the coercion rules.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from lfi_jax import hostmem
from lfi_jax.config import load_config_file, set_key, split_config_spec
from lfi_jax.errors import UserError

USER_ERRORS = (
    UserError,
    ValueError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)
EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130

_OVERRIDES_DEST = "config_overrides"
_OVERRIDE_FLAG = "--config_override"  # what "--config.a.b=v" becomes inside argparse


def error_message(exc: BaseException) -> str:
    """The exception's message on one line (a KeyError's message without its quotes)."""
    if isinstance(exc, KeyError) and not isinstance(exc, UserError) and len(exc.args) == 1:
        text = str(exc.args[0])
    else:
        text = str(exc)
    if not text:
        text = type(exc).__name__
    elif isinstance(exc, KeyError) and not isinstance(exc, UserError) and " " not in text:
        text = f"KeyError: {text!r}"  # a bare key: say what it is
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _clear_progress_line(stream) -> None:
    # A progress bar may have left the cursor mid-line after a carriage return.
    try:
        if stream.isatty():
            stream.write("\r\x1b[K")
    except (AttributeError, ValueError):
        pass


def run_cli(
    main_fn: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    interrupt_note: str | Callable[[], str] | None = None,
    exit: bool = True,
) -> int:
    """Runs `main_fn(argv)` under the convention above; exits (or returns the code if exit=False).

    `argv`: the arguments after the program name (default sys.argv[1:]). `interrupt_note`: the
    one line printed after Ctrl-C (a string, or a function called then), default "interrupted".
    """
    if argv is None:  # the process's own command line, not a call with arguments from Python code
        hostmem.maybe_reexec()  # huge pages for XLA's CPU buffers (may replace this process)
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("LFI_DEBUG", "") not in ("", "0")
    if "--debug" in args:
        debug = True
        args = [a for a in args if a != "--debug"]
    try:
        result = main_fn(args)
        code = 0 if result is None else int(result)
    except SystemExit as e:  # argparse's usage errors, sys.exit() in main_fn
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BUG)
        if e.code is not None and not isinstance(e.code, int):
            print(f"error: {e.code}", file=sys.stderr)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        note = interrupt_note() if callable(interrupt_note) else interrupt_note
        _clear_progress_line(sys.stderr)
        print(f"interrupted{': ' + note if note else ''}", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    except USER_ERRORS as e:
        _clear_progress_line(sys.stderr)
        if debug:
            traceback.print_exc()
        print(f"error: {error_message(e)}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    except Exception:
        _clear_progress_line(sys.stderr)
        traceback.print_exc()
        code = EXIT_BUG
    sys.stdout.flush()
    if exit:
        sys.exit(code)
    return code


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Lists `--debug` in the parser's help (run_cli removes it before the parser sees it)."""
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")


# --------------------------------------------------------------------------- config flags


def _rewrite_overrides(argv: Sequence[str]) -> list[str]:
    """"--config.a.b=v" / "--config.a.b v" -> "--config_override a.b=v" (up to a "--")."""
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item == "--":
            out.extend(items[i:])
            break
        if item.startswith("--config."):
            key, eq, value = item[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(items) or items[i + 1].startswith("--"):
                    raise UserError(f"override --config.{key} has no value (write --config.{key}=VALUE)")
                value = items[i + 1]
                i += 1
            if not key:
                raise UserError(f"override {item!r} names no key (write --config.a.b=VALUE)")
            out.extend([_OVERRIDE_FLAG, f"{key}={value}"])
        else:
            out.append(item)
        i += 1
    return out


def add_config_flags(parser: argparse.ArgumentParser, *, required: bool = True, default: str | None = None) -> None:
    """Adds `--config=FILE[:ARG]` and `--config.a.b=VALUE` overrides (repeatable) to `parser`.

    The parser's `parse_known_args` (and so `parse_args`) is wrapped to route every
    `--config.`-prefixed item to the overrides, which `config_from_args` applies in order.
    """
    parser.add_argument(
        "--config",
        required=required and default is None,
        default=default,
        help="config file and its argument: configs/NAME.py[:ARG] (or NAME[:ARG] for a bundled config); "
        "override keys with --config.a.b=VALUE (tuples: --config.data.eval_splits=val,test or \"('val',)\")",
    )
    parser.add_argument(_OVERRIDE_FLAG, dest=_OVERRIDES_DEST, action="append", default=[], help=argparse.SUPPRESS)
    if getattr(parser, "_lfi_config_flags", False):
        return
    inner = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        return inner(_rewrite_overrides(sys.argv[1:] if args is None else args), namespace)

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    parser._lfi_config_flags = True  # type: ignore[attr-defined]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str] | Sequence[tuple[str, Any]]) -> None:
    """Applies "a.b=value" strings (or (key, value) pairs) in order via `set_key`; an unknown
    key or bad value is one line naming it and the flag it came from."""
    for item in overrides:
        key, value = item.split("=", 1) if isinstance(item, str) else item
        try:
            set_key(config, key, value)
        except UserError as e:
            raise type(e)(f"{e} (from --config.{key}={value})") from None


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """--set KEY=VALUE items as {key: value text} (the main jobs' and the experiment runner's
    every-run overrides)."""
    sets = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        sets[key.strip()] = value
    return sets


def config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config `--config` names, with the `--config.a.b=...` overrides applied in order."""
    overrides = getattr(args, _OVERRIDES_DEST, None) or []
    if not getattr(args, "config", None):
        if overrides:
            raise UserError(f"--config.{overrides[0].split('=', 1)[0]} given without --config=FILE")
        raise UserError("no --config given (e.g. --config=configs/demo.py:ivit)")
    path, arg = split_config_spec(args.config)
    config = load_config_file(path, arg)
    apply_overrides(config, overrides)
    return config


__all__ = [
    "parse_sets",
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "USER_ERRORS",
    "add_config_flags",
    "add_debug_flag",
    "apply_overrides",
    "config_from_args",
    "error_message",
    "run_cli",
]
