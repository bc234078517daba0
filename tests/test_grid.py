import pytest
import yaml

from okdpose import grid
from okdpose.grid import ROWS, ROWS_BY_NAME, queue_command
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
    cmd = queue_command(ROWS_BY_NAME["HRNet4-MSOKD-DS"], prefix="g1-", extra=["train.epochs=2"], seed=2)
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", "g1-HRNet4-MSOKD-DS-s2"]
    assert cmd[-1] == "evaluate"                       # explain / export are not part of a grid run
    sets = dict(s.split("=", 1) for s in cmd[7:-1:2])
    assert yaml.safe_load(sets["loss.kld_couples"]) == [[2, 4], [3, 4]]
    assert yaml.safe_load(sets["model.multi"]) is True and yaml.safe_load(sets["loss.use_mse"]) is True
    assert yaml.safe_load(sets["train.seed"]) == 2 and yaml.safe_load(sets["tracking.grid_row"]) == "HRNet4-MSOKD-DS"
    assert sets["train.epochs"] == "2"
    assert queue_command(ROWS_BY_NAME["HRNet2"], target=None)[-1] != "evaluate"


def test_queue_is_seed_major_and_skips_collected_and_pending_runs(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs" / "HRNet3-s0").mkdir(parents=True)
    (tmp_path / "runs" / "HRNet3-s0" / "meta.json").write_text("{}")
    monkeypatch.setattr(grid, "pending_names", lambda: {"HRNet2-s1"})   # queued by an earlier session
    assert grid.main(["queue", "--seeds", "2", "--rows", "HRNet2", "HRNet3", "--dry-run",
                      "--skip-collected", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[5] for line in lines if line.startswith("dvc ")] == ["HRNet2-s0", "HRNet3-s1"]
    assert [line for line in lines if not line.startswith("dvc ")] == \
        ["HRNet2-s1: already queued or running (dvc queue status), not queued again"]
    with pytest.raises(SystemExit):
        grid.main(["queue", "--seeds", "0", "--dry-run"])


@pytest.mark.parametrize("argv, words", [
    (["table", "--replicates", "0"], ["--replicates", "0 is below 1"]),
    (["table", "--replicates", "many"], ["--replicates", "'many' is not an integer"]),
    (["table", "--seed", "-1"], ["--seed", "-1 is below 0"]),
    (["watch", "--interval", "0"], ["--interval", "between 0 and 86400"]),
    (["watch", "--interval", "nan"], ["--interval", "between 0 and 86400"]),
    (["watch", "-j", "0"], ["--jobs", "0 is below 1"]),
    (["queue", "--threads", "-1", "--dry-run"], ["--threads", "-1 is below 0"]),
])
def test_impossible_options_are_refused_by_name_before_any_work(argv, words, capsys):
    """Before: --replicates 0 and --seed -1 were tracebacks after the runs were read, --interval 0
    polled dvc without a pause."""
    with pytest.raises(SystemExit) as err:
        grid.main(argv)
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "Traceback" not in msg and all(w in msg for w in words), msg


def test_workers_get_one_thread_each_by_default():
    env = grid.worker_env(1)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert grid.worker_env(0) is None                   # torch's default


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


def test_pending_names_are_the_queued_and_running_tasks():
    import subprocess

    class Done:
        stdout = STATUS.format(a="Running", b="Success", c="Queued")

    alive = {"8f0ae7f0d2c44e0f8f0ae7f0d2c44e0f8f0ae7f0"}               # HRNet4-OKD's experiment process runs
    assert grid.pending_names(lambda *a, **k: Done(), live=lambda: alive) == {"HRNet4-OKD", "HRNet4-MSOKD-DS"}
    assert grid.pending_names(lambda *a, **k: Done(), live=lambda: set()) == {"HRNet4-MSOKD-DS"}   # stale
    assert grid.pending_names(lambda *a, **k: Done(), live=lambda: None) == {"HRNet4-OKD", "HRNet4-MSOKD-DS"}

    def fails(*a, **k):
        raise subprocess.CalledProcessError(1, a[0])

    assert grid.pending_names(fails, live=lambda: None) == set()    # no DVC repo / no queue: nothing pending


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
            active = (a, b, c).count("Running")           # a worker runs each running task
            return Done(STATUS.format(a=a, b=b, c=c).replace("0 active", f"{active} active"))
        return Done()

    checks = []
    counts = grid.watch_queue(2, interval=0, run=run, sleep=lambda s: None, log=lambda s: None,
                              on_check=lambda: checks.append(1), live=lambda: None)
    assert counts == {"Success": 3, "Failed": 1}
    assert len(checks) == 4                    # finished runs are collected at every check, the last one too
    starts = [c for c in calls if c[:2] == ["queue", "start"]]
    # only while fewer than 2 run and tasks wait; -j is the total (DVC starts the numbered workers not alive)
    assert starts == [["queue", "start", "-j", "2"]]


def test_live_experiments_are_read_from_their_exec_run_processes(tmp_path):
    def proc(pid, *args):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")

    rev = "f3c13d317ca86d968fdc41aa3fd1a5f23b4d56b4"
    proc("31394", "/venv/bin/python", "/venv/bin/dvc", "exp", "exec-run", "--infofile",
         f"/repo/.dvc/tmp/exps/run/{rev}/{rev}.run")
    proc("31402", "python", "stages/train_okd.py")
    proc("13312", "/venv/bin/python", "/venv/bin/dvc", "exp", "queue-worker", "dvc-exp-cde9b5-2@localhost")
    (tmp_path / "999").mkdir()                          # a process that ended while being read: no cmdline
    assert grid.live_experiment_revs(tmp_path) == {rev}
    assert grid.live_experiment_revs(tmp_path / "absent") is None


def test_running_tasks_whose_process_is_gone_are_stale_not_running():
    # a session ended mid-grid: its two tasks stay "Running"; they must not block the queue. DVC's
    # "Worker status" is no evidence either way: it said "0 active" while a task was training.
    stale = STATUS.format(a="Running", b="Running", c="Queued")
    okd_alive = {"8f0ae7f" + "0" * 33}
    assert grid.stale_running(stale, set()) == [("8f0ae7f", "HRNet4-OKD"), ("e6299a0", "HRNet4-OKD-DS")]
    assert grid.stale_running(stale, okd_alive) == [("e6299a0", "HRNet4-OKD-DS")]
    assert grid.stale_running(stale, None) == []        # no /proc: nothing is called stale

    class Done:
        def __init__(self, stdout=""):
            self.stdout = stdout

    assert grid.pending_names(lambda *a, **k: Done(stale), live=lambda: set()) == {"HRNet4-MSOKD-DS"}
    # stale at two checks in a row (a task just taken is Running before its process starts)
    states = iter([stale, stale, STATUS.format(a="Running", b="Running", c="Running"),
                   STATUS.format(a="Running", b="Running", c="Success")])   # the last: nothing runs any more
    lives = iter([set(), set(), {"ce8f232" + "0" * 33}, set()])
    calls, logs = [], []

    def run(cmd, **kw):
        calls.append(cmd[1:])
        return Done(next(states)) if cmd[1:3] == ["queue", "status"] else Done()

    counts = grid.watch_queue(2, interval=0, run=run, sleep=lambda s: None, log=logs.append, live=lambda: next(lives))
    assert counts["Running"] == 2                      # returns: only stale tasks are left
    assert [c for c in calls if c[:2] == ["queue", "start"]] == [["queue", "start", "-j", "2"]]
    warnings = [m for m in logs if "no experiment process" in m]
    assert len(warnings) == 1 and "dvc queue kill 8f0ae7f e6299a0" in warnings[0]
