"""`vit-scaling COMMAND [ARGS]`: the project's commands under one name, each exactly its `python -m` form.

`pip install -e .` installs the `vit-scaling` script; `python -m study.cli` is the same without it. A command's
arguments go to its module's `main` untouched, so `vit-scaling run --help` is `python -m study.run --help`.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn


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


def exit_now(code: int) -> NoReturn:
    """`sys.exit(code)` for a command's `__main__`, less the interpreter's teardown.

    A command that ran a study holds ~900k objects (torch, timm, Ray, MLflow, pandas); tearing the interpreter down
    collects them module by module: 5-7 s after the command's last line on a 2-core AVX2 EPYC, ~8% of a smoke
    study, and the end-to-end tests start ~70 such commands. Everything of the teardown that can reach a file or
    another process runs first, in `sys.exit`'s order: the threads that are not daemons are joined
    (`concurrent.futures`' pools told to finish first), the `atexit` handlers run (logging's flush,
    multiprocessing's children, Ray's, MLflow's, `weakref.finalize`'s temporary folders), then the standard
    streams are flushed. Skipped: the modules' garbage collection and the C extensions' finalizers.
    """
    threading._shutdown()  # noqa: SLF001  (what the interpreter runs first on exit: futures' pools, then the joins)
    atexit._run_exitfuncs()  # noqa: SLF001  (and then this; os._exit below runs neither)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (a closed pipe) or a closed stream: nothing can reach it now
            pass
    os._exit(code)


def console() -> NoReturn:
    """The `vit-scaling` script (`[project.scripts]`): `main`, then `exit_now`."""
    exit_now(main())


if __name__ == "__main__":
    console()
