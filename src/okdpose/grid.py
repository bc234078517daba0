"""The original paper's experiment grid as queued DVC experiments, and its Table 1 from the results.

    okdpose grid list                      # rows and the -S overrides each one sets
    okdpose grid queue --seeds 3 [--rows ...] [-S train.epochs=4] [--start -j 2]
    dvc queue start -j 2 && dvc queue status   # (what --start does) run the queue
    okdpose grid watch -j 2                # restart workers DVC stopped early and collect finished runs
    okdpose grid collect                   # finished experiments -> results/grid/runs/<row>-s<seed>/ (commit it)
    okdpose grid table [--out results/grid]   # mean ± sd over seeds, paired intervals, energy, plot

Each queued experiment is one (row, seed): `-n <row>-s<seed>`, `-S train.seed=<seed>` and
`-S tracking.grid_row=<row>` (MLflow tags grid.row / grid.seed), run through `evaluate` only
(explain and export are not what the grid compares). `collect` copies what a finished experiment
produced (metrics, COCO results per stage) out of DVC into plain files under results/grid/runs/,
so the grid survives the experiment refs (which a clone does not have) and a grid split over
several sessions adds up; `table` reads only those files.

(`python -m okdpose.grid ...` is the same command.)

Rows follow Cacciatore et al. 2025, Table 1 (DESIGN.md §5), plus the temperature variants of the
original experiment files (T = 2, 5, 10 for the (3, 4) couple). Everything a row does not set
(data, width, epochs, kld_weight, ...) comes from params.yaml, so the grid runs at CPU scale on
the built-in data by default and at paper scale with the paper preset.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence



@dataclass(frozen=True)
class GridRow:
    name: str
    n_stage: int
    couples: tuple[tuple[int, int], ...] = ()
    deep_supervision: bool = False
    temperature: float = 1.0
    paper: dict[str, tuple[float, ...]] | None = None   # Table 1 values (%), student(s) / teacher

    def overrides(self) -> dict[str, Any]:
        """params.yaml keys this row sets (`dvc exp run -S key=value`)."""
        kd = bool(self.couples)
        return {
            "model.n_stage": self.n_stage,
            "model.multi": kd,
            "loss.use_kld": kd,
            "loss.use_mse": self.deep_supervision,
            "loss.kld_couples": [list(c) for c in self.couples],
            "loss.temperature": self.temperature,
        }

    @property
    def reported_stages(self) -> tuple[int, ...]:
        """Stages the paper reports: those in KD couples (students then teacher), else the last."""
        if not self.couples:
            return (self.n_stage,)
        return tuple(sorted({s for c in self.couples for s in c}))


def _p(ap: Sequence[float], ar: Sequence[float], pck: Sequence[float]) -> dict[str, tuple[float, ...]]:
    return {"AP": tuple(ap), "AR": tuple(ar), "hmPCK50": tuple(pck)}


ROWS: tuple[GridRow, ...] = (
    GridRow("HRNet2", 2, paper=_p([67.73], [74.09], [71.44])),
    GridRow("HRNet3", 3, paper=_p([91.54], [94.27], [86.66])),
    GridRow("HRNet4", 4, paper=_p([94.17], [95.08], [88.14])),
    GridRow("HRNet3-OKD", 3, ((2, 3),), paper=_p([74.17, 76.27], [78.08, 81.43], [73.55, 77.21])),
    GridRow("HRNet3-OKD-DS", 3, ((2, 3),), True, paper=_p([72.45, 74.75], [77.80, 80.05], [78.59, 79.98])),
    GridRow("HRNet4-OKD", 4, ((3, 4),), paper=_p([92.63, 93.77], [94.91, 95.62], [87.24, 88.02])),
    GridRow("HRNet4-OKD-DS", 4, ((3, 4),), True, paper=_p([93.58, 95.13], [95.51, 96.22], [88.42, 88.96])),
    GridRow("HRNet4-MSOKD", 4, ((2, 4), (3, 4)),
            paper=_p([70.71, 93.28, 93.30], [75.82, 95.02, 94.88], [74.57, 87.30, 87.24])),
    GridRow("HRNet4-MSOKD-DS", 4, ((2, 4), (3, 4)), True,
            paper=_p([68.81, 92.03, 93.39], [75.79, 94.32, 95.10], [73.98, 86.36, 86.95])),
    GridRow("HRNet4-COKD", 4, ((2, 3), (3, 4)),
            paper=_p([62.34, 69.23, 77.43], [66.22, 74.19, 82.54], [70.79, 75.08, 78.28])),
    GridRow("HRNet4-COKD-DS", 4, ((2, 3), (3, 4)), True,
            paper=_p([74.82, 79.51, 81.52], [78.55, 83.36, 85.33], [74.37, 77.85, 77.74])),
) + tuple(
    GridRow(f"HRNet4-OKD{'-DS' if ds else ''}-T{t}", 4, ((3, 4),), ds, float(t))
    for ds in (False, True) for t in (2, 5, 10)
)
ROWS_BY_NAME = {r.name: r for r in ROWS}


# --------------------------------------------------------------------------- queueing

def _yaml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


GRID_TARGET = "evaluate"      # the last stage a grid run needs


def run_name(row: GridRow, seed: int, prefix: str = "") -> str:
    return f"{prefix}{row.name}-s{seed}"


def queue_command(row: GridRow, prefix: str = "", extra: Sequence[str] = (), seed: int = 0,
                  target: Optional[str] = GRID_TARGET) -> list[str]:
    """The `dvc exp run --queue` command line for one (row, seed) (extra: more `key=value` overrides)."""
    cmd = ["dvc", "exp", "run", "--queue", "-n", run_name(row, seed, prefix)]
    overrides = {**row.overrides(), "train.seed": seed, "tracking.grid_row": row.name}
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={_yaml_value(value)}"]
    for kv in extra:
        cmd += ["-S", kv]
    return cmd + ([target] if target else [])


def select_rows(names: Iterable[str] | None) -> list[GridRow]:
    if not names:
        return list(ROWS)
    unknown = [n for n in names if n not in ROWS_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown grid row(s) {unknown}; choose from {list(ROWS_BY_NAME)}")
    return [ROWS_BY_NAME[n] for n in names]


# --------------------------------------------------------------------------- CLI

def queue_tasks(status: str) -> list[tuple[str, str, str]]:
    """`dvc queue status` text -> [(task id, experiment name, status)] (Queued, Running, Success, ...)."""
    tasks: list[tuple[str, str, str]] = []
    lines = status.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.split()[:2] == ["Task", "Name"]), len(lines))
    for line in lines[start:]:
        if not line.strip() or line.startswith("Worker status"):
            break
        fields = line.split()
        tasks.append((fields[0], fields[1] if len(fields) > 2 else "", fields[-1]))
    return tasks


def queue_counts(status: str) -> dict[str, int]:
    """`dvc queue status` text -> {status: number of tasks}."""
    counts: dict[str, int] = {}
    for _, _, state in queue_tasks(status):
        counts[state] = counts.get(state, 0) + 1
    return counts


def live_experiment_revs(proc: Path = Path("/proc")) -> Optional[set[str]]:
    """Full revs of the experiments whose `dvc exp exec-run --infofile .../<rev>.run` process is alive
    on this machine (None where `proc` cannot be read: then nothing is called stale). Processes, not
    `dvc queue status`'s "Worker status" line: it said "0 active" while a task was training."""
    if not proc.is_dir():
        return None
    revs: set[str] = set()
    for entry in proc.glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:          # the process ended meanwhile, or is not ours to read
            continue
        if b"exec-run" in args:
            revs |= {Path(a.decode(errors="replace")).stem for a in args if a.endswith(b".run")}
    return revs


def stale_running(status: str, live: Optional[set[str]]) -> list[tuple[str, str]]:
    """[(task id, name)] of the tasks marked Running whose experiment process is gone (`live`: from
    `live_experiment_revs`; None = unknown, nothing is stale): left by a session that ended mid-run,
    DVC never updates them, and they would block `watch` and `--skip-collected`."""
    if live is None:
        return []
    return [(task, name) for task, name, state in queue_tasks(status)
            if state == "Running" and not any(rev.startswith(task) for rev in live)]


def pending_names(run: Any = subprocess.run, live: Any = live_experiment_revs) -> set[str]:
    """Names of the experiments DVC's queue holds as Queued or really Running (not `stale_running`;
    empty if it cannot say): queueing a name twice would run it twice, as DVC accepts duplicates."""
    try:
        out = run(["dvc", "queue", "status"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    stale = {task for task, _ in stale_running(out, live())}
    return {name for task, name, state in queue_tasks(out) if state in ("Queued", "Running") and task not in stale}


def worker_env(threads: Optional[int]) -> Optional[dict[str, str]]:
    """The environment `dvc queue start` passes on to its workers (and their stage commands):
    `threads` intra-op threads per experiment (1 per worker with -j 2 uses 2 cores best)."""
    if not threads:
        return None
    import os
    n = str(threads)
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def start_queue(jobs: int, threads: Optional[int], run: Any = subprocess.run) -> None:
    run(["dvc", "queue", "start", "-j", str(jobs)], check=True, env=worker_env(threads))


def watch_queue(jobs: int, interval: float = 60.0, run: Any = subprocess.run, sleep: Any = time.sleep,
                log: Any = print, threads: Optional[int] = None, on_check: Any = None,
                live: Any = live_experiment_revs) -> dict[str, int]:
    """Keep `jobs` experiments running until nothing is queued: DVC's queue workers can stop while
    tasks are still queued (treeverse/dvc#10562), which left most of an overnight grid unrun. Every
    `interval` s, when fewer than `jobs` tasks run and some are queued, `dvc queue start -j jobs`
    (DVC numbers its workers 1..jobs and starts only those not alive); `on_check()` runs at every
    check (the grid collects its finished runs there). -> the final counts."""
    warned: set[str] = set()
    suspects: set[str] = set()
    while True:
        status = run(["dvc", "queue", "status"], check=True, capture_output=True, text=True).stdout
        counts = queue_counts(status)
        if on_check is not None:
            on_check()
        # stale only when so at two checks in a row: a task just taken is Running before its process starts
        now = stale_running(status, live())
        stale = [(task, name) for task, name in now if task in suspects]
        suspects = {task for task, _ in now}
        if {task for task, _ in stale} - warned:
            log(f"grid watch: {', '.join(n for _, n in stale)} marked Running but no experiment process is alive "
                f"(left by a session that ended): not counted as running; clear with `dvc queue kill "
                f"{' '.join(t for t, _ in stale)}` and queue them again with `okdpose grid queue --skip-collected ...`")
            warned |= {task for task, _ in stale}
        running, queued = counts.get("Running", 0) - len(stale), counts.get("Queued", 0)
        if not running and not queued:
            log(f"grid watch: queue empty ({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'no tasks'})")
            return counts
        if running < jobs and queued:
            log(f"grid watch: {running} running, {queued} queued: restarting workers (dvc queue start -j {jobs})")
            start_queue(jobs, threads, run)
        sleep(interval)


def _at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low (argparse names the option and exits 2 otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (0 would poll dvc without pause, inf never)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 < value < 86400):
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return value


def main(argv: Sequence[str] | None = None, prog: str = "python -m okdpose.grid") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the rows and their overrides")
    q = sub.add_parser("queue", help="queue rows x seeds as DVC experiments")
    q.add_argument("--rows", nargs="*", help="row names (default: all)")
    q.add_argument("--seeds", type=int, default=1, help="seeds per row: train.seed = first .. first+N-1")
    q.add_argument("--first-seed", type=int, default=0)
    q.add_argument("--prefix", default="", help="prefix for experiment names (to queue the grid twice)")
    q.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra params override for every row, e.g. -S train.epochs=4")
    q.add_argument("--all-stages", action="store_true",
                   help=f"run the whole pipeline (default: up to {GRID_TARGET}; explain/export are not compared)")
    q.add_argument("--skip-collected", type=Path, metavar="OUT", nargs="?", const=Path("results/grid"),
                   help="do not queue (row, seed) runs already in OUT/runs (default results/grid)")
    q.add_argument("--start", action="store_true", help="start the queue after adding (dvc queue start)")
    q.add_argument("-j", "--jobs", type=_at_least(1), default=2, help="parallel workers for --start")
    q.add_argument("--threads", type=_at_least(0), default=1, help="intra-op threads per worker (0: torch's default)")
    q.add_argument("--watch", action="store_true",
                   help="with --start: stay until the queue is empty, restarting stopped workers (see watch)")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    w = sub.add_parser("watch", help="keep -j experiments running until the queue is empty (DVC workers can "
                                     "stop early, treeverse/dvc#10562), collecting finished runs")
    w.add_argument("-j", "--jobs", type=_at_least(1), default=2)
    w.add_argument("--threads", type=_at_least(0), default=1, help="intra-op threads per worker (0: torch's default)")
    w.add_argument("--interval", type=_seconds, default=60.0, help="seconds between checks")
    w.add_argument("--out", default="results/grid", type=Path)
    c = sub.add_parser("collect", help="copy finished grid experiments into OUT/runs/ (plain files to commit)")
    c.add_argument("--prefix", default="")
    c.add_argument("--out", default="results/grid", type=Path)
    t = sub.add_parser("table", help="collect, then the grid's table: mean ± sd over seeds, paired bootstrap "
                                     "intervals, energy (markdown, CSV, PNG)")
    t.add_argument("--out", default="results/grid", type=Path)
    t.add_argument("--no-collect", action="store_true", help="only the files already in OUT/runs")
    t.add_argument("--replicates", type=_at_least(1), default=1000, help="bootstrap replicates")
    t.add_argument("--seed", type=_at_least(0), default=0, help="bootstrap random seed")
    args = ap.parse_args(argv)

    if args.cmd == "list":
        for row in ROWS:
            print(f"{row.name:<20} " + " ".join(f"-S {shlex.quote(f'{k}={_yaml_value(v)}')}"
                                                for k, v in row.overrides().items()))   # pasteable in a shell
        return 0
    if args.cmd == "queue":
        if args.seeds < 1:
            raise SystemExit("--seeds must be >= 1")
        done = set()
        if args.skip_collected:
            done = {p.name for p in (args.skip_collected / "runs").glob("*") if (p / "meta.json").is_file()}
        pending = pending_names()
        target = None if args.all_stages else GRID_TARGET
        for seed in range(args.first_seed, args.first_seed + args.seeds):   # seed-major: every row gets seed 0 first
            for row in select_rows(args.rows):
                name = run_name(row, seed, args.prefix)
                if name in done:
                    continue
                if name in pending:
                    print(f"{name}: already queued or running (dvc queue status), not queued again")
                    continue
                cmd = queue_command(row, args.prefix, args.set_param, seed=seed, target=target)
                print(" ".join(shlex.quote(c) for c in cmd))
                if not args.dry_run:
                    subprocess.run(cmd, check=True)
        if args.start and not args.dry_run:
            start_queue(args.jobs, args.threads)
            if args.watch:
                _watch(args.jobs, args.threads, 60.0, Path("results/grid"))
        return 0
    if args.cmd == "watch":
        _watch(args.jobs, args.threads, args.interval, args.out)
        return 0
    from okdpose.grid_runs import collect

    if args.cmd == "collect":
        written = collect(Path("."), args.out, args.prefix)
        print(f"grid collect: {len(written)} new run(s) in {args.out / 'runs'}")
        return 0
    if not args.no_collect:
        collect(Path("."), args.out)
    from okdpose.grid_stats import GridDataError, summarize_grid

    if not any((args.out / "runs").glob("*/meta.json")):
        print(f"no collected grid runs in {args.out / 'runs'}: run the grid (okdpose grid queue --seeds 3 --start "
              f"--watch) or `okdpose grid collect` after it", file=sys.stderr)
        return 1
    try:
        summary = summarize_grid(args.out, args.out, replicates=args.replicates, seed=args.seed,
                                 progress=lambda m: print(m, file=sys.stderr))
    except GridDataError as e:
        print(f"grid table: {e}", file=sys.stderr)
        return 1
    print(Path(summary["files"]["table_md"]).read_text())
    print(f"wrote {', '.join(summary['files'].values())} ({summary['runs']} runs, {summary['timing']['seconds']} s)")
    return 0


def _watch(jobs: int, threads: Optional[int], interval: float, out: Path) -> None:
    from okdpose.grid_runs import collect

    watch_queue(jobs, interval, threads=threads, on_check=lambda: collect(Path("."), out))
    collect(Path("."), out)


if __name__ == "__main__":
    sys.exit(main())
