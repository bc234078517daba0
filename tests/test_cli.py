import csv
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
    from test_grid_stats import make_gt, make_run, noisy, stages_of, write_gt

    out = tmp_path / "grid"
    assert cli.main(["grid", "table", "--no-collect", "--out", str(out)]) == 1      # nothing collected yet
    assert "okdpose grid queue --seeds 3" in capsys.readouterr().err
    gt = make_gt()
    write_gt(out, gt)
    for seed in (0, 1):
        make_run(out, gt, "HRNet2", seed, stages_of("HRNet2", noisy(gt, 6.0, seed)))
        make_run(out, gt, "HRNet3-OKD", seed, stages_of("HRNet3-OKD", noisy(gt, 2.0, 10 + seed)))
    assert cli.main(["grid", "table", "--no-collect", "--out", str(out), "--replicates", "50"]) == 0
    printed = capsys.readouterr().out
    assert "HRNet3-OKD" in printed and "HRNet2" in printed
    with open(out / "comparisons.csv", newline="") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    student = rows["HRNet3-OKD s2 vs HRNet2 s2"]
    assert student["n_a"] == student["n_b"] == "2" and float(student["diff"]) > 0
    assert float(student["lo"]) <= float(student["diff"]) <= float(student["hi"])
    assert (out / "ap_per_stage.png").stat().st_size > 1000


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
