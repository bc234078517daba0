import pytest
import yaml

from okdpose import grid
from okdpose.grid import ROWS, ROWS_BY_NAME, experiments_from_show, markdown_table, queue_command, table_rows
from okdpose.params import params_from_dict


def _params_for(row):
    raw: dict = {}
    for key, value in row.overrides().items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return params_from_dict(raw)


def test_every_row_is_a_valid_params_set_with_the_papers_stages():
    assert len(ROWS) == 17 and len(ROWS_BY_NAME) == 17
    for row in ROWS:
        p = _params_for(row)
        assert p.kd_stages() == row.reported_stages
    assert ROWS_BY_NAME["HRNet4-COKD-DS"].reported_stages == (2, 3, 4)
    assert _params_for(ROWS_BY_NAME["HRNet3"]).output_stages() == (3,)


def test_queue_command_values_parse_back_as_yaml():
    cmd = queue_command(ROWS_BY_NAME["HRNet4-MSOKD-DS"], prefix="g1-", extra=["train.epochs=2"])
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", "g1-HRNet4-MSOKD-DS"]
    sets = dict(s.split("=", 1) for s in cmd[7::2])
    assert yaml.safe_load(sets["loss.kld_couples"]) == [[2, 4], [3, 4]]
    assert yaml.safe_load(sets["model.multi"]) is True and yaml.safe_load(sets["loss.use_mse"]) is True
    assert sets["train.epochs"] == "2"


def _show(name, metrics, state=None):
    rev = {"rev": "abc", "name": name, "error": None,
           "data": {"metrics": {"metrics/eval.json": {"data": metrics}}, "params": {"params.yaml": {"data": {}}}}}
    executor = None if state is None else {"state": state, "name": "dvc-task"}
    return [{"rev": "workspace", "experiments": None},
            {"rev": "base", "name": "main", "experiments": [{"revs": [rev], "executor": executor}]}]


@pytest.mark.parametrize("state", ["queued", "running", "failed"])
def test_unfinished_experiments_are_not_collected(state):
    # DVC shows a queued or running experiment with its baseline's metrics: they are not its results
    metrics = {"stage4": {"AP": 0.5, "AR": 0.6, "hmPCK50": 0.7}}
    assert experiments_from_show(_show("HRNet4", metrics, state)) == {}
    assert set(experiments_from_show(_show("HRNet4", metrics, "success"))) == {"HRNet4"}


def test_table_collects_student_and_teacher_in_paper_layout():
    show = _show("HRNet4-OKD", {"stage3": {"AP": 0.5, "AR": 0.6, "hmPCK50": 0.7},
                                "stage4": {"AP": 0.8, "AR": 0.9, "hmPCK50": 0.95}})
    recs = table_rows(experiments_from_show(show))
    okd = [r for r in recs if r["row"] == "HRNet4-OKD"]
    assert [(r["stage"], r["role"], r["AP"]) for r in okd] == [(3, "student", 50.0), (4, "teacher", 80.0)]
    assert okd[1]["paper_AP"] == 93.77
    md = markdown_table(recs)
    assert "| HRNet4-OKD | 4 | (3,4) | no | 1 | 50.00 / 80.00 | 60.00 / 90.00 | 70.00 / 95.00 | 92.63 / 93.77 |" in md
    assert "| HRNet2 | 2 | - | - | 1 | – |" in md   # not run yet: a dash, never a made-up number


def test_list_prints_overrides_a_shell_reads_back(capsys):
    import shlex

    from okdpose.grid import ROWS, main

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(ROWS)
    for row, line in zip(ROWS, lines):
        words = shlex.split(line)
        assert words[0] == row.name
        sets = dict(w.split("=", 1) for w in words[2::2])
        assert words[1::2] == ["-S"] * len(row.overrides())
        assert yaml.safe_load(sets["loss.kld_couples"]) == [list(c) for c in row.couples]


def test_the_newest_run_of_a_row_is_collected_across_commits():
    old, new = ({"stage2": {"AP": v, "AR": v, "hmPCK50": v}} for v in (0.1, 0.2))
    a, b = _show("HRNet2", old), _show("HRNet2", new)
    a[1]["experiments"][0]["revs"][0]["data"]["timestamp"] = "2026-11-29T10:00:00"
    b[1]["experiments"][0]["revs"][0]["data"]["timestamp"] = "2026-11-29T11:00:00"
    assert experiments_from_show(b + a)["HRNet2"]["metrics"] == new
    assert experiments_from_show(a + b)["HRNet2"]["metrics"] == new


STATUS = """Task     Name             Created    Status
8f0ae7f  HRNet4-OKD       08:38 PM   {a}
e6299a0  HRNet4-OKD-DS    08:38 PM   {b}
ce8f232  HRNet4-MSOKD-DS  Sep 19, 2024   {c}
955449f  HRNet3-OKD-DS    06:35 PM   Failed

Worker status: 0 active, 0 idle
"""


def test_queue_counts_reads_dvc_queue_status():
    assert grid.queue_counts(STATUS.format(a="Running", b="Queued", c="Queued")) == \
        {"Running": 1, "Queued": 2, "Failed": 1}
    assert grid.queue_counts("Task     Name    Created    Status\n\nWorker status: 0 active, 0 idle\n") == {}


def test_watch_restarts_workers_that_dvc_stopped_until_the_queue_is_empty():
    # a worker stopped after its task with two still queued (treeverse/dvc#10562), then they run and finish
    states = iter([("Running", "Queued", "Queued"), ("Success", "Running", "Running"),
                   ("Success", "Running", "Success"), ("Success", "Success", "Success")])
    calls = []

    class Done:
        def __init__(self, stdout=""):
            self.stdout = stdout

    def run(cmd, **kw):
        calls.append(cmd[1:])
        if cmd[1:3] == ["queue", "status"]:
            a, b, c = next(states)
            return Done(STATUS.format(a=a, b=b, c=c))
        return Done()

    counts = grid.watch_queue(2, interval=0, run=run, sleep=lambda s: None, log=lambda s: None)
    assert counts == {"Success": 3, "Failed": 1}
    starts = [c for c in calls if c[:2] == ["queue", "start"]]
    # only while fewer than 2 run and tasks wait; -j is the total (DVC starts the numbered workers not alive)
    assert starts == [["queue", "start", "-j", "2"]]
