"""The `pie-local` command line: one module per command, each with add_arguments() and run().

Command modules keep their top-level imports light and import heavy layers inside run(), so
`pie-local --help` starts fast. `pie-local` with no command opens the TUI.

Commands report failures by raising: main() prints every error the same way and picks the exit
status (the convention is in pie_local.present.problems), so no command prints its own errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pie_local.present.problems import UserError, explain

# command name -> module under pie_local.cli
COMMANDS: dict[str, str] = {
    "pull": "pull",
    "add": "add",
    "list": "list",
    "show": "show",
    "rm": "rm",
    "run": "run",
    "chat": "chat",
    "ps": "ps",
    "stop": "stop",
    "bench": "bench",
    "doctor": "doctor",
    "serve": "serve",
    "worker": "worker",
    "tui": "tui",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pie-local",
        description="A programmable inference engine for one machine. Without a command, opens the TUI.",
        epilog="examples:\n  pie-local pull qwen2.5-0.5b\n  pie-local run text-completion -- --prompt 'Once upon a time'\n"
        "  pie-local doctor\n\nRun `pie-local COMMAND --help` for a command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from pie_local import __version__

    parser.add_argument("--version", action="version", version=f"pie-local {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"pie_local.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        summary, _, details = doc.partition("\n")
        cmd = sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=details.strip() or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def fail(error: UserError) -> int:
    """Print a user error (no traceback) and return its exit status."""
    print(f"pie-local: error: {error}", file=sys.stderr)
    return error.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["tui"])
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`pie-local list | head`): stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        error = explain(exc)
        if error is None:
            raise  # not a problem the user can fix: a bug, and its traceback helps
        return fail(error)
