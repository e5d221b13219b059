"""What a ``lit-accel`` command costs before and after its work: parsing, and the process's exit.

Two parts, each timing two variants in alternating rounds (:mod:`lit_accel.measure`):

* ``exit``: seconds of a whole ``lit-accel fit --help`` process, started as the ``lit-accel``
  script starts it (``commands.run``: the imports' objects frozen out of the garbage collector)
  and through ``commands.main`` without that. Both import the same modules and print the same help.
* ``parse``: seconds to build and parse a ``LitAccelCLI`` in this process for a one-batch smoke
  fit, with the subcommand first (``fit --config …``: only fit's parser is built) and with a
  top-level ``--config`` first (``--config … fit``: all four subcommands' parsers).

Usage::

    python -m tools.bench command_start --rounds 7
    python -m tools.bench command_start --parts parse --rounds 1      # seconds: checks the case
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from lit_accel.measure import alternate, markdown_table, paired_ratios, spread

PARTS = ("exit", "parse")
# the lit-accel script's entry (commands.run) and the same command without the freeze (commands.main)
EXIT_VARIANTS = {
    "lit-accel (commands.run)": "from lit_accel.commands import run; run()",
    "commands.main, no freeze": "import sys; from lit_accel.commands import main; main(sys.argv[1:])",
}
SMOKE_FIT = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
]


def exit_commands(argv: Sequence[str] = ("fit", "--help")) -> dict[str, list[str]]:
    """The two processes the ``exit`` part times: one Python each, the same arguments."""
    return {name: [sys.executable, "-c", code, *argv] for name, code in EXIT_VARIANTS.items()}


def parse_arguments(configs: Sequence[str], top_level_config: str) -> dict[str, list[str]]:
    """The two argument lists the ``parse`` part gives ``LitAccelCLI``: the same fit, with the
    subcommand first, or after a top-level ``--config`` (a file with a ``fit:`` section)."""
    fit = ["fit", *(item for name in configs for item in ("--config", name)), *SMOKE_FIT]
    return {"fit … (fit's parser)": fit, "--config FILE fit … (four parsers)": ["--config", top_level_config, *fit]}


def _timed_process(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command[2][:40]}… exited with {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def _timed_cli(args: list[str]) -> float:
    from lit_accel.cli import LitAccelCLI

    output = io.StringIO()
    quiet = (contextlib.redirect_stdout(output), contextlib.redirect_stderr(output))
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder), quiet[0], quiet[1]:
        start = time.perf_counter()
        try:
            LitAccelCLI(args=args)
        except SystemExit as exit:
            raise RuntimeError(f"LitAccelCLI({args}) exited with {exit.code}:\n{output.getvalue()[-2000:]}") from None
        return time.perf_counter() - start


def _table(seconds: dict[str, list[float]]) -> str:
    names = list(seconds)
    rows = []
    for name in names:
        median_s = spread(seconds[name])
        ratio = spread(paired_ratios(seconds[name], seconds[names[0]]))
        rows.append([name, f"{median_s.median:.2f}", f"{median_s.low:.2f}-{median_s.high:.2f}", f"{ratio.median:.3f}"])
    return markdown_table(["variant", "s (median):", "range:", "time / first (median of paired):"], rows)


def main(argv: list[str] | None = None, run_process: Callable[[list[str]], float] = _timed_process) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench command_start",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--parts", default="exit,parse", help=f"comma-separated, of: {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",")]
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        parser.error(f"--parts: {', '.join(unknown)} is not a part: use {', '.join(PARTS)}")
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.rounds} rounds, alternating")
    if "exit" in parts:
        commands = exit_commands()
        seconds = alternate({name: (lambda c=c: run_process(c)) for name, c in commands.items()}, args.rounds)
        print("\n`lit-accel fit --help`, whole process:\n")
        print(_table(seconds))
    if "parse" in parts:
        with tempfile.TemporaryDirectory() as folder:
            top_level = os.path.join(folder, "top_level.yaml")
            with open(top_level, "w") as file:
                file.write("fit:\n  seed_everything: 42\n")
            argument_lists = parse_arguments(["cifar10", "smoke"], top_level)  # shipped configs, by name
            _timed_cli(next(iter(argument_lists.values())))  # warm: the first build imports what it needs
            runs = {name: (lambda a=a: _timed_cli(a)) for name, a in argument_lists.items()}
            seconds = alternate(runs, args.rounds)
        print("\n`LitAccelCLI(args)` for a one-batch smoke fit, in this process:\n")
        print(_table(seconds))


if __name__ == "__main__":
    main()
