"""The `neurosens` command. Each subcommand lives in `neurosens/commands/<name>.py` and provides
HELP, add_arguments(parser) and run(args) -> exit code."""
import argparse
import importlib
import pkgutil
import sys

from . import commands
from .env import MissingDependency, env_flag
from .version import __version__


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield info.name.replace("_", "-"), importlib.import_module(f"{commands.__name__}.{info.name}")


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line on stderr (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog="neurosens", description="Neuron sensitivity for adversarial robustness.")
    parser.add_argument("--version", action="version", version=f"neurosens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _command_modules():
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    """Run a command. A user's error (a ValueError or OSError, such as a missing or corrupt file,
    or an optional package a chosen feature needs) ends it with ``SystemExit("neurosens <command>: <one line>")``: that line on stderr and exit
    status 1, not a traceback. Ctrl-C ends it with one line and status 130."""
    args = build_parser().parse_args(argv)
    try:
        if env_flag("NEUROSENS_KEEP_FREED_MEMORY", default=True):
            from .cpu_memory import keep_freed_memory

            keep_freed_memory()
        return args._run(args) or 0
    except (ValueError, OSError, MissingDependency) as err:
        raise SystemExit(f"neurosens {args.command}: " + " ".join(str(err).split())) from None
    except KeyboardInterrupt:
        more = "; rerun with --resume to continue from the last checkpoint" if args.command == "train" else ""
        sys.stderr.write(f"neurosens {args.command}: interrupted{more}\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
