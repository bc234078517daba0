"""MLflow tracking with a no-op fallback; the only module that imports mlflow (lazily).

    tracker = Tracker.from_params(params.tracking)
    with tracker.run(run_id=None) as run:        # new run, or resume one by id
        run.log_params(params.flat())
        run.log_metrics({"stage4.AP": 0.71}, step=epoch)
        run.log_artifact("metrics/train.json")
    run.id                                       # None when tracking is off

Store: sqlite `mlflow.db` and artifacts in `mlruns/` at the repository root, taken from
`DVC_ROOT` (set by DVC for stage commands, also under `dvc exp run --temp/--queue`, whose cwd is
a temporary copy), else the git root of the cwd, else the cwd. `MLFLOW_TRACKING_URI`, when set,
takes precedence (e.g. a tracking server). Tracking is off with `tracking.enabled: false` or
`OKDPOSE_TRACKING=0`; then every call is a no-op and mlflow is never imported.

Tracking never stops a stage: a store that cannot be opened gives a warning and a no-op run; a
logging call that fails gives a warning and is dropped. Exceptions raised by the `with` body
are not touched (the run is marked FAILED and the exception propagates).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from okdpose.params import TrackingParams

log = logging.getLogger(__name__)

ENV_SWITCH = "OKDPOSE_TRACKING"
_OFF_VALUES = {"0", "false", "off", "no"}

# MLflow's limits (mlflow.utils.validation)
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_TRUNCATED = "...[truncated]"

TAG_COMMIT = "mlflow.source.git.commit"
# MLflow 3's UI opens an experiment by its kind; untagged ones land on the GenAI overview
TAG_KIND, KIND_MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


# --------------------------------------------------------------------------- helpers (no mlflow)

def tracking_enabled(enabled: bool = True) -> bool:
    """The param, unless the environment switch `OKDPOSE_TRACKING=0` turns tracking off."""
    return enabled and os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF_VALUES


def tracking_root() -> Path:
    """Where the store lives: `DVC_ROOT`, else the git root of the cwd, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    top = _git("rev-parse", "--show-toplevel", cwd=Path.cwd())
    return Path(top).resolve() if top else Path.cwd().resolve()


def git_commit(root: Path) -> Optional[str]:
    """The experiment's baseline commit (`DVC_EXP_BASELINE_REV`), else `git rev-parse HEAD`."""
    return os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD", cwd=root)


def default_tags(root: Path) -> dict[str, str]:
    """Git commit and the DVC experiment / stage names that DVC passes to stage commands."""
    tags = {TAG_COMMIT: git_commit(root), "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
            "dvc.stage": os.environ.get("DVC_STAGE")}
    return {k: v for k, v in tags.items() if v}


def default_run_name(root: Path) -> Optional[str]:
    """`DVC_EXP_NAME` under `dvc exp run`, else the short commit, "+dirty" when the work tree
    has uncommitted changes (a plain `dvc repro`); None outside git."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    commit = git_commit(root)
    if not commit:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    return commit[:8] + ("+dirty" if dirty else "")


def run_tags(params: "TrackingParams", seed: Optional[int] = None) -> dict[str, str]:
    """The tags a pipeline run carries from its params: the seed, and a grid run's row."""
    tags = {} if seed is None else {"seed": str(seed)}
    if params.grid_row:
        tags.update({"grid.row": params.grid_row, "grid.seed": str(seed)})
    return tags


def sanitize_key(key: str) -> str:
    """A valid MLflow param/metric name: alphanumerics, `_ - . / space`; no empty or `..` parts."""
    key = re.sub(r"[^\w\-. /]", "_", str(key))
    parts = [p if p not in (".", "..") else p.replace(".", "_") for p in key.split("/") if p]
    return "/".join(parts)[:MAX_KEY] or "_"


def _git(*args: str, cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(_TRUNCATED)] + _TRUNCATED


def _param_value(value: Any) -> str:
    return _truncate(str(value), MAX_PARAM_VALUE)


# --------------------------------------------------------------------------- runs

class Run:
    """A tracking run. This base class is the no-op run (tracking off or unavailable)."""

    id: Optional[str] = None
    enabled = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat {key: value}; values become strings (cut to MLflow's 6000 characters)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """{key: number} at `step` (0 when None); keys are sanitised for MLflow."""

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """A file or a folder, under `artifact_path` in the run's artifacts."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """{key: value}; values become strings."""


class _MlflowRun(Run):
    enabled = True

    def __init__(self, client: Any, run_id: str, logged_params: Mapping[str, str]):
        self._client = client
        self.id = run_id
        self._params = dict(logged_params)

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        # a failed log call must not stop training: warn and drop it
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any store error
            log.warning("MLflow %s failed for run %s (dropped): %s", what, self.id, e)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        new, changed = {}, []
        for key, value in params.items():
            k, v = sanitize_key(key), _param_value(value)
            old = self._params.get(k, new.get(k))
            if old is None:
                new[k] = v
            elif old != v:
                changed.append(f"{k}: {old!r} -> {v!r}")
        if changed:
            log.warning("MLflow params cannot change within a run; kept the logged values of %s", "; ".join(changed))
        items = [Param(k, v) for k, v in new.items()]
        with self._guard("log_params"):
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self._client.log_batch(self.id, params=items[i:i + _PARAMS_PER_BATCH], synchronous=True)
            self._params.update(new)

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                items.append(Metric(sanitize_key(key), float(value), now, int(step or 0)))
            except (TypeError, ValueError):
                log.warning("MLflow metric %r is not a number (%r); dropped", key, value)
        with self._guard("log_metrics"):
            for i in range(0, len(items), _METRICS_PER_BATCH):
                self._client.log_batch(self.id, metrics=items[i:i + _METRICS_PER_BATCH], synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        with self._guard(f"log_artifact({path})"):
            path = Path(path)
            if path.is_dir():
                self._client.log_artifacts(self.id, str(path), artifact_path)
            elif path.is_file():
                self._client.log_artifact(self.id, str(path), artifact_path)
            else:
                raise FileNotFoundError(f"no such file or folder: {path}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k)[:MAX_KEY], _truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        with self._guard("set_tags"):
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self._client.log_batch(self.id, tags=items[i:i + _PARAMS_PER_BATCH], synchronous=True)

    def _end(self, status: str) -> None:
        with self._guard(f"ending the run as {status}"):
            self._client.set_terminated(self.id, status=status)


# --------------------------------------------------------------------------- tracker

class Tracker:
    """Opens MLflow runs in the project's store; a disabled tracker yields no-op runs."""

    def __init__(self, enabled: bool = True, experiment: str = "okdpose", root: str | Path | None = None):
        self.enabled = tracking_enabled(enabled)
        self.experiment = experiment
        self._root = Path(root).resolve() if root is not None else None

    @classmethod
    def from_params(cls, params: "TrackingParams", root: str | Path | None = None) -> "Tracker":
        tracker = cls(enabled=params.enabled, experiment=params.experiment, root=root)
        tracker.default_name = params.run_name
        return tracker

    default_name: Optional[str] = None      # tracking.run_name

    @property
    def root(self) -> Path:
        return self._root or tracking_root()

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @contextlib.contextmanager
    def run(self, run_name: Optional[str] = None, run_id: Optional[str] = None,
            tags: Optional[Mapping[str, Any]] = None) -> Iterator[Run]:
        """A new run (named `run_name`, default tracking.run_name, else `default_run_name`), or
        the run `run_id` resumed.

        Yields a no-op `Run` when tracking is off or the store cannot be used (with a warning).
        The run ends FINISHED, or FAILED / KILLED when the body raises (the exception propagates).
        """
        if not self.enabled:
            yield Run()
            return
        try:
            active = self._open(run_name, run_id, dict(tags or {}))
        except Exception as e:  # noqa: BLE001 - any store error means: run without tracking
            log.warning("MLflow tracking is off for this run: cannot use the store %s (%s: %s). "
                        "Set tracking.enabled: false or %s=0 to silence this.",
                        self.tracking_uri, type(e).__name__, e, ENV_SWITCH)
            yield Run()
            return
        try:
            yield active
        except KeyboardInterrupt:
            active._end("KILLED")
            raise
        except BaseException:
            active._end("FAILED")
            raise
        active._end("FINISHED")

    def _open(self, run_name: Optional[str], run_id: Optional[str], tags: dict[str, Any]) -> _MlflowRun:
        client = _client(self.tracking_uri)
        root = self.root
        stage = os.environ.get("DVC_STAGE")
        if run_id:
            try:
                existing = client.get_run(run_id)
            except Exception as e:  # noqa: BLE001 - unknown id: keep the results in a new run
                log.warning("MLflow run %s not found in %s (%s); logging to a new run", run_id, self.tracking_uri, e)
                tags.setdefault("okdpose.requested_run_id", run_id)
            else:
                client.update_run(run_id, status="RUNNING")
                run = _MlflowRun(client, run_id, existing.data.params)
                stages = [s for s in existing.data.tags.get("dvc.stages", "").split(",") if s]
                if stage and stage not in stages:
                    tags["dvc.stages"] = ",".join(stages + [stage])
                run.set_tags(tags)
                return run
        experiment_id = self._experiment_id(client, root)
        all_tags = {**default_tags(root), **({"dvc.stages": stage} if stage else {}), **tags}
        name = run_name or self.default_name or default_run_name(root)
        created = client.create_run(experiment_id, run_name=name or None,
                                    tags={str(k): _truncate(str(v), MAX_TAG_VALUE) for k, v in all_tags.items()})
        return _MlflowRun(client, created.info.run_id, {})

    def _experiment_id(self, client: Any, root: Path) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            if TAG_KIND not in (exp.tags or {}):      # stores made before the tag existed
                client.set_experiment_tag(exp.experiment_id, TAG_KIND, KIND_MODEL_TRAINING)
            return exp.experiment_id
        # an explicit artifact location: the default is relative to the cwd, which is a
        # temporary folder under `dvc exp run --temp`
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "mlruns").as_uri()
        try:
            return client.create_experiment(self.experiment, artifact_location=location,
                                            tags={TAG_KIND: KIND_MODEL_TRAINING})
        except Exception:  # noqa: BLE001 - created meanwhile by a parallel queued run
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id


def _client(tracking_uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # a tracking server that is down should fail in seconds, not retry for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=tracking_uri)
    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates / migrates the schema on first use; two processes doing that at once (queued
    # experiments started with -j 2 on a new store) fail with "table runs already exists" or
    # "duplicate column name" and lose their run: one process at a time, the others then find it done
    with _store_lock(db):
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    return client


@contextlib.contextmanager
def _store_lock(db: Path) -> Iterator[None]:
    """An exclusive inter-process lock for the sqlite store `db` (a lock file in the temp folder,
    so the repository stays clean; no lock where fcntl is missing)."""
    import hashlib
    import tempfile

    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    key = hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"okdpose-mlflow-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the pipeline's run

def pipeline_run_id(train_metrics: str | Path) -> Optional[str]:
    """The MLflow run train-okd opened (`mlflow_run_id` of its metrics file), None when there is
    none (no file, unreadable, tracking was off)."""
    import json

    try:
        value = json.loads(Path(train_metrics).read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def log_to_pipeline_run(params: "TrackingParams", train_metrics: str | Path, stage: str,
                        metrics: Mapping[str, Any],
                        artifacts: Mapping[str, str | Path] | Sequence[tuple[str, str | Path]] = (),
                        tags: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Log a later stage's numbers into the training run: `metrics` flattened under `stage.`
    (non-numbers and None dropped), `artifacts` {artifact folder: path} or (folder, path) pairs
    (several files into one folder), `tags`. -> the run id,
    or None with one line on stderr saying why nothing was logged. Never raises for tracking."""
    import sys

    from okdpose.params import flatten

    tracker = Tracker.from_params(params)
    run_id = pipeline_run_id(train_metrics)
    if not (tracker.enabled and run_id):
        why = "tracking is off" if not tracker.enabled else f"no mlflow_run_id in {train_metrics}"
        print(f"{stage}: not logged to MLflow ({why})", file=sys.stderr)
        return None
    numbers = {k: v for k, v in flatten(dict(metrics), stage).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with tracker.run(run_id=run_id) as run:
        run.log_metrics(numbers)
        if tags:
            run.set_tags(tags)
        for folder, path in (artifacts.items() if isinstance(artifacts, Mapping) else artifacts):
            run.log_artifact(path, folder)
    return run_id
