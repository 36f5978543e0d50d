"""The ``archbench`` command: one module per subcommand (list, eval)."""

from __future__ import annotations

import argparse
import sys
import warnings

from archbench.errors import ArchbenchError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from archbench.cli import (analyze, bench, compare, eval as eval_cmd, fit_scaling, leaderboard,
                               list as list_cmd, search)

    common = _Parser(add_help=False)
    common.add_argument("--plugins", action="append", default=[], metavar="FILE.py",
                        help="a Python file that registers blocks, tasks or evaluators (repeatable)")
    parser = _Parser(prog="archbench", description="How does a network use its depth?")
    from archbench import __version__

    parser.add_argument("--version", action="version", version=f"archbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (list_cmd, eval_cmd, compare, analyze, fit_scaling, search, leaderboard, bench):
        p = sub.add_parser(module.NAME, parents=[common], help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run, trailing=getattr(module, "TRAILING", None))
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    warnings.filterwarnings("default")
    warnings.showwarning = lambda msg, *a, **k: err.print(f"warning: {msg}", markup=False, soft_wrap=True)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        args.argv = [*(sys.argv[1:] if argv is None else argv)]  # as typed, for records of the command
        # argparse leaves words after an option unparsed (`list blocks -v NAME`); a subcommand
        # whose last positional takes many words names it in TRAILING to receive them
        if extra and args.trailing and not any(e.startswith("-") for e in extra):
            getattr(args, args.trailing).extend(extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from archbench.registry import load_plugin_file

        for path in args.plugins:
            load_plugin_file(path)
        return args.run(args) or 0
    except ArchbenchError as e:
        err.print(f"archbench: error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except OSError as e:  # unwritable runs dir, full disk, ...: say which file
        err.print(f"archbench: error: {e}", markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("archbench: interrupted; finished runs are saved, rerun the same command to resume", markup=False,
                  soft_wrap=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
