"""Imported first by every stage script: the `okdpose` package of THIS tree (its src/) comes first
on sys.path, before an installed (editable) copy.

`dvc exp run --queue/--temp` runs a stage in a temporary copy of the repository (under
.dvc/tmp/exps) whose src/ is the experiment's code, the code DVC hashed as the stage's deps. An
editable install points at the workspace's src/ instead, which may have changed since the
experiment was queued: without this, a queued experiment would run today's workspace code
(measured: an edit made while a grid was queued broke 37 of its runs)."""
import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [_SRC]:
    sys.path.insert(0, _SRC)
