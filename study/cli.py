"""`vit-scaling COMMAND [ARGS]`: the project's commands under one name, each exactly its `python -m` form.

`pip install -e .` installs the `vit-scaling` script; `python -m study.cli` is the same without it. A command's
arguments go to its module's `main` untouched, so `vit-scaling run --help` is `python -m study.run --help`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # its `python -m` module, whose main(argv) runs it
    help: str  # one whole sentence
    prefix: tuple[str, ...] = ()  # arguments put before the user's (a mode of the module)


COMMANDS = {
    "run": Command("study.run", "Run, resume or extend a study, or check and price it with --dry-run."),
    "suggest": Command("study.run", "Rank the grid points that would most narrow the crossover interval per "
                                    "GPU-hour.", ("--suggest",)),
    "report": Command("analysis.report", "Write the report (fits, crossovers, figures) of a results CSV."),
    "compare": Command("study.compare", "Put several studies (results CSVs, output folders, MLflow experiments) "
                                        "in one report."),
    "mlflow-source": Command("study.mlflow_source", "Rebuild a study's results table and report from its MLflow "
                                                    "store alone."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {c.help}\n  {'':<{width}}  = python -m {c.module} {' '.join(c.prefix)}".rstrip()
             for name, c in COMMANDS.items()]
    return ("usage: vit-scaling COMMAND [ARGS]\n\nThe project's commands under one name, each exactly its python -m "
            "form with the same arguments.\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`vit-scaling COMMAND --help` describes a command's arguments.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command '{argv[0]}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(command.module).main([*command.prefix, *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
