"""The study: its config, grid, trials on Ray Tune, MLflow record, console and entry points (`python -m study.run`)."""

import sys

_before = sys.excepthook


def _one_line_for_ctrl_c(kind, value, traceback) -> None:
    """Ctrl-C that no handler took (`study.run` before its `main` sets its own, while torch, timm and Ray import:
    seconds): one line, not the traceback of whichever import it landed in. Python still exits as killed by SIGINT
    (130)."""
    if issubclass(kind, KeyboardInterrupt):
        print("\nstopped by SIGINT", file=sys.stderr)
        return
    _before(kind, value, traceback)


if sys.argv[:1] == ["-m"]:  # `python -m study.<command>` (argv[0] is "-m" while its package imports), not a library
    sys.excepthook = _one_line_for_ctrl_c
