"""The `megatron-patch` command. Each subcommand lives in its own module that exposes
`register(subparsers)`; the module is imported only when listed here, and heavy imports
(torch, megatron) happen inside the command's run function so `--help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from megatron_patch.errors import UserError

# module path -> registers one or more subcommands
COMMAND_MODULES = (
    "megatron_patch.runtime.env_check",
    "megatron_patch.training.preflight",
    "megatron_patch.convert.mini",
    "megatron_patch.convert.cli",
    "megatron_patch.verify.cli",
    "megatron_patch.training.cli",
    "megatron_patch.training.plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-patch",
        description="Megatron-Core patch layer: models, checkpoint conversion, HF comparison, training "
        "on CPU (gloo), CUDA (nccl) and Ascend NPU (hccl).",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show the warnings megatron-core and torch print at import (hidden by default)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # command not built yet in this checkout
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_patch.runtime.console import file_size_limit_as_error, print_once_per_node, quiet_known_warnings

    argv = sys.argv[1:] if argv is None else argv
    if "--verbose" not in argv:  # decided before build_parser: the command modules may import megatron
        quiet_known_warnings()
    file_size_limit_as_error()  # else they precede a command's output and its one-line errors
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    import warnings

    with warnings.catch_warnings():
        if not args.verbose:  # megatron's import-time notes (no Apex / TE, deprecations) would bury `error:` lines
            warnings.simplefilter("ignore")
        try:
            return int(args.func(args) or 0)
        except UserError as err:
            print_once_per_node(f"error: {err}")  # under torchrun every rank fails alike
            return 2


if __name__ == "__main__":
    sys.exit(main())
