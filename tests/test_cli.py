import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from okdpose import cli
from okdpose.grid import ROWS


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: okdpose")
    for name, (_, help_text) in cli.COMMANDS.items():
        assert name in out and help_text.split()[0] in out


def test_a_subcommand_gets_its_arguments_and_its_name(capsys):
    assert cli.main(["grid", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [r.name for r in ROWS]
    with pytest.raises(SystemExit) as e:            # the tool's own --help, under `okdpose grid`
        cli.main(["grid", "queue", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: okdpose grid queue")
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_grid_table_through_the_cli(tmp_path, capsys):
    rev = {"rev": "abc", "name": "HRNet2", "error": None,
           "data": {"metrics": {"metrics/eval.json": {"data": {"stage2": {"AP": 0.5, "AR": 0.6, "hmPCK50": 0.7}}}},
                    "params": {"params.yaml": {"data": {}}}}}
    show = tmp_path / "show.json"
    show.write_text(json.dumps([{"rev": "base", "experiments": [{"revs": [rev], "executor": None}]}]))
    assert cli.main(["grid", "table", "--show-json", str(show), "--out", str(tmp_path / "grid")]) == 0
    assert "| HRNet2 | 2 | - | - | 1 | 50.00 | 60.00 | 70.00 |" in capsys.readouterr().out
    with open(tmp_path / "grid" / "table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["row"] == "HRNet2" and rows[0]["AP"] == "50.0" and rows[0]["paper_AP"] == "67.73"
    assert rows[1]["row"] == "HRNet3" and rows[1]["AP"] == ""          # not run: an empty cell


def test_the_installed_console_script():
    beside = Path(sys.executable).with_name("okdpose")          # this interpreter's environment first
    exe = str(beside) if beside.is_file() else shutil.which("okdpose")
    if exe is None:
        pytest.skip("the okdpose console script is not installed (pip install -e .)")
    out = subprocess.run([exe, "--help"], check=True, capture_output=True, text=True, timeout=60).stdout
    assert all(name in out for name in cli.COMMANDS)
    out = subprocess.run([sys.executable, "-m", "okdpose.grid", "list"], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    assert out.split()[0] == ROWS[0].name                # the module form keeps working
