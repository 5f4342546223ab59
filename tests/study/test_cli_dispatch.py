"""`vit-scaling COMMAND` (study/cli.py): each command is its module's `main` with the same arguments."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from study import cli
from tests.conftest import ROOT, run_cli


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_is_its_modules_main(name, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's --help
        cli.main([name, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {cli.COMMANDS[name].module} ")


def test_suggest_is_study_run_with_suggest(monkeypatch):
    from study import run

    seen = []
    monkeypatch.setattr(run, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["suggest", "--grid", "g.yaml", "--budget", "10"]) == 0
    assert seen == [["--suggest", "--grid", "g.yaml", "--budget", "10"]]


def test_run_dry_runs_a_grid_as_python_m_study_run_does(capsys):
    assert cli.main(["run", "--grid", str(ROOT / "configs" / "smoke.yaml"), "--dry-run", "seeds=[0, 1]"]) == 0
    out = capsys.readouterr().out
    assert "8 trials" in out and len(re.findall(r"^ViT-Pico/4\s+[\d,]+\s+\d+\s", out, re.M)) == 4  # grid rows


def test_help_lists_every_command_in_whole_sentences_and_an_unknown_one_is_one_line(cache_dir):
    proc = run_cli(["-m", "study.cli", "--help"], cache_dir)
    assert proc.returncode == 0
    for name, command in cli.COMMANDS.items():
        assert f"  {name} " in proc.stdout and command.help.endswith(".") and command.help in proc.stdout
    proc = run_cli(["-m", "study.cli", "runn", "--grid", "g.yaml"], cache_dir)
    assert (proc.returncode, proc.stderr) == (2, "error: unknown command 'runn'; commands: run, suggest, report, "
                                                 "compare, mlflow-source\n")


def test_every_command_runs_as_its_own_module_too(cache_dir, tmp_path):
    """`python -m study.suggest` (the module a reader of the code finds) is `study.run --suggest`, not a silent
    exit 0; the other commands' modules have their own entry points."""
    proc = run_cli(["-m", "study.suggest", "--grid", "configs/smoke.yaml", "--out", str(tmp_path)], cache_dir)
    assert (proc.returncode, proc.stderr) == (2, "error: --suggest: no ViT/BiT pair measured on one evaluation yet; "
                                                 "run the grid first\n")
    for module in {c.module for c in cli.COMMANDS.values()}:
        assert "\nif __name__ == \"__main__\":" in (ROOT / f"{module.replace('.', '/')}.py").read_text(), module


# What `exit_now` keeps of `sys.exit`: a non-daemon thread, a pool never shut down, an atexit handler, a temporary
# folder left to its finalizer, and output still in the buffers of piped streams (lost to a bare `os._exit`).
EXITS = '''
import atexit, concurrent.futures, sys, tempfile, threading, time
from pathlib import Path
from study.cli import exit_now

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("joined"))).start()
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(lambda: (time.sleep(0.5), (out / "future").write_text("done")))
kept = tempfile.TemporaryDirectory(dir=out)
(out / "tmp").write_text(kept.name)
print("to stdout", end="")
print("to stderr", end="", file=sys.stderr)
exit_now(3)
'''


def test_exit_now_finishes_what_sys_exit_would_before_it_skips_the_teardown(tmp_path):
    proc = subprocess.run([sys.executable, "-c", EXITS, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "to stdout", "to stderr")
    assert {f: (tmp_path / f).read_text() for f in ("atexit", "thread", "future")} == {
        "atexit": "ran", "thread": "joined", "future": "done"}
    assert not Path((tmp_path / "tmp").read_text()).exists()  # weakref.finalize's atexit removed it


def test_the_installed_script_is_the_dispatcher(cache_dir):
    """`pip install -e .` writes `vit-scaling` beside the interpreter (.ci/run installs afresh, so it runs there)."""
    assert 'vit-scaling = "study.cli:console"' in (ROOT / "pyproject.toml").read_text()
    script = os.path.join(os.path.dirname(sys.executable), "vit-scaling")
    if not os.path.exists(script):
        pytest.skip(f"{script} is not installed: this environment was installed before [project.scripts] named it "
                    "(pip install -e . adds it)")
    proc = run_cli([script, "--help"], cache_dir)  # run_cli prefixes the interpreter: the script is Python
    assert proc.returncode == 0 and "mlflow-source" in proc.stdout
