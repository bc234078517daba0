"""A stage script imports the okdpose of its own tree, not the installed (editable) one: what a
queued DVC experiment (run in a copy of the repository) needs to run the code it was queued with.
Measured without it: an edit made while a grid was queued broke 37 of its runs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOT = 'sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))'


def _bootstrap(script: Path) -> str:
    """The lines of `script` up to and including the sys.path line (imports, comments)."""
    text = script.read_text()
    assert BOOT in text, f"{script}: no sys.path bootstrap"
    return text[:text.index(BOOT) + len(BOOT)]


def test_a_copied_tree_runs_its_own_package(tmp_path):
    copy = tmp_path / "exp"
    (copy / "stages").mkdir(parents=True)
    (copy / "src" / "okdpose").mkdir(parents=True)
    (copy / "src" / "okdpose" / "__init__.py").write_text("WHERE = 'the experiment copy'\n")
    probe = _bootstrap(ROOT / "stages" / "evaluate.py") + "\nimport okdpose\nprint(okdpose.WHERE, okdpose.__file__)\n"
    (copy / "stages" / "probe.py").write_text(probe)
    for how in (["stages/probe.py"], ["-c", "import runpy; runpy.run_path('stages/probe.py', run_name='__main__')"]):
        out = subprocess.run([sys.executable, *how], cwd=copy, capture_output=True, text=True, timeout=60,
                             check=True).stdout
        assert out.startswith("the experiment copy") and str(copy) in out, (how, out)


def test_every_stage_script_bootstraps_before_importing_okdpose():
    for script in sorted((ROOT / "stages").glob("*.py")):
        head = _bootstrap(script)
        assert not re.search(r"^(from|import) okdpose", head, re.M), script
