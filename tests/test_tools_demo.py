"""`make demo` (the README's main job) at toy sizes: its stages (pairs, fit, validate, sample grid, table) through
the same configs and code paths, in seconds."""

import json
import math
from pathlib import Path

from PIL import Image

from dmd_lightning.tools.demo import main

ROOT = Path(__file__).parents[1]


def test_demo_runs_its_stages_at_toy_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    table = main(["--out", str(tmp_path), "--num-pairs", "32", "--steps", "2", "--max-time", "00:00:10:00",
                  "--iterations", "2", "--val-size", "32", "--batch-size", "8"])
    teacher, one_step, student = (table[k] for k in ("teacher, ddim 2 steps (its pairs)",
                                                     "teacher, one step (x0-prediction at t=999)",
                                                     "student: DMD (full)"))
    assert teacher["nfe"] == 2 and one_step["nfe"] == 1 and student["nfe"] == 1
    assert student["iterations"] == 2 and all(math.isfinite(r["fid"]) for r in (teacher, one_step, student))
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(table))
    with Image.open(tmp_path / "samples.png") as grid:  # rows: teacher, student, the teacher's one step
        assert grid.size[0] > grid.size[1] > 0
