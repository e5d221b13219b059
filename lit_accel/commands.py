"""``lit-accel``: the one command, ``lit-accel fit|validate|test|predict|tune|export …``.

``fit``, ``validate``, ``test`` and ``predict`` run LightningCLI (:func:`lit_accel.cli.main`);
``tune`` measures the acceleration levers on this machine (:func:`lit_accel.tune.main`);
``export`` writes serving files from a checkpoint (:func:`lit_accel.export.main`, also installed as
``lit-accel-export``). Nothing in the package imports this module: it sits above every command, so
no command imports another (an import-linter contract in pyproject.toml, checked in CI).

Example::

    lit-accel fit --config configs/cifar10.yaml
    lit-accel tune --config configs/cifar10.yaml --budget_s 120 --output tuned.yaml
    lit-accel export last -o exported
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from lit_accel import cli

__all__ = ["COMMANDS", "main", "run"]

# Each command with the line `lit-accel --help` shows for it.
COMMANDS = {
    "fit": "train, with checkpoints and TensorBoard logs under runs/",
    "validate": "evaluate a checkpoint (--ckpt_path FILE|best|last) on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "write the predictions of a checkpoint to predictions.csv",
    "tune": "measure the acceleration levers on this machine and write the fastest as a config",
    "export": "write a checkpoint as files that serve without lit_accel (also: lit-accel-export)",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lit-accel``: runs the command named by the first argument.

    Every command keeps its own exit statuses: 2 with one message for a user error (all commands);
    3 for a run the DivergenceGuard gave up on and 143 for SIGTERM/Ctrl-C, both after saving a
    checkpoint (``fit`` and the other LightningCLI commands); 143/130 for a ``tune`` stopped by
    SIGTERM/Ctrl-C. Options before the command (``--config``, ``--print_config``) are LightningCLI's.

    Args:
        args: the arguments after ``lit-accel``; ``None``: ``sys.argv[1:]``.

    Raises:
        SystemExit: with the command's exit status (2 for an unknown or missing command).
    """
    argv = list(sys.argv[1:] if args is None else args)
    command = argv[0] if argv else None
    if command in ("-h", "--help"):
        _parser().print_help()
        sys.exit(0)
    if command == "tune":
        from lit_accel.tune import main as tune_main  # imported only for `tune`: it loads tqdm

        sys.exit(tune_main(argv[1:]))
    if command == "export":
        from lit_accel.export import main as export_main

        export_main(argv[1:])
        return
    if command is None or (command not in LIGHTNING_COMMANDS and not command.startswith("-")):
        named = "no command" if command is None else f"unknown command {command!r}"
        _parser().error(f"{named}: use one of {', '.join(COMMANDS)} (lit-accel --help)")
    cli.main(argv)


def run() -> None:
    """Entry point of the ``lit-accel`` script and of ``python -m lit_accel``: :func:`main` in a
    process of its own.

    It first moves the objects the imports created (torch, Lightning, torchmetrics) to the garbage
    collector's permanent generation, so that neither later collections nor the interpreter's exit
    walk them; the exit is where it shows (BENCHMARKS.md, "Start and exit of a command"). :func:`main`
    does not, because tests and notebooks call it in a process that goes on, where frozen objects
    would never be collected.
    """
    gc.freeze()
    main()


def _parser() -> argparse.ArgumentParser:
    """The overview that ``lit-accel --help`` prints; each command parses its own arguments."""
    parser = argparse.ArgumentParser(
        prog="lit-accel",
        description="A lightweight PyTorch Lightning trainer for fast, steady image-classification training.",
        epilog="`lit-accel COMMAND --help` lists a command's options.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser
