"""The study: its config, grid, trials on Ray Tune, MLflow record, console and entry points (`python -m study.run`)."""

import sys

_before = sys.excepthook


def _one_line_for_ctrl_c(kind, value, traceback) -> None:
    """Ctrl-C before an entry point's `main` handles signals (while torch, timm and Ray import: seconds): one line,
    not the traceback of whichever import it landed in. Python still exits as killed by SIGINT (130)."""
    if issubclass(kind, KeyboardInterrupt):
        print("\nstopped by SIGINT before anything started; nothing was run", file=sys.stderr)
        return
    _before(kind, value, traceback)


sys.excepthook = _one_line_for_ctrl_c
