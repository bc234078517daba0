"""A stage script imports the okdpose of its own tree, not the installed (editable) one: what a
queued DVC experiment (run in a copy of the repository) needs to run the code it was queued with."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_copied_tree_runs_its_own_package(tmp_path):
    copy = tmp_path / "exp"
    (copy / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "_this_tree.py", copy / "stages")
    (copy / "src" / "okdpose").mkdir(parents=True)
    (copy / "src" / "okdpose" / "__init__.py").write_text("WHERE = 'the experiment copy'\n")
    (copy / "stages" / "probe.py").write_text("import _this_tree  # noqa\nimport okdpose\nprint(okdpose.WHERE, okdpose.__file__)\n")
    out = subprocess.run([sys.executable, "stages/probe.py"], cwd=copy, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.startswith("the experiment copy") and str(copy) in out


def test_every_stage_script_imports_it_first():
    for script in sorted((ROOT / "stages").glob("*.py")):
        if script.name.startswith("_"):
            continue
        lines = [ln for ln in script.read_text().splitlines() if ln.startswith(("import ", "from "))]
        assert lines[:2] == ["from __future__ import annotations", lines[1]] and lines[1].startswith("import _this_tree"), script
