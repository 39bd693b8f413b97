"""The benchmark scripts' run lists measure what their rows say (checked on the lists, nothing is trained)."""

from __future__ import annotations

import sys
from pathlib import Path

from vitdistill.config import load_config
from vitdistill.methods.dearkd import switch_epoch_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import datafree  # noqa: E402
import dearkd_schedule  # noqa: E402


def first_stage2_epoch(cfg) -> int:
    return switch_epoch_for(cfg.train.epochs, (cfg.method.params or {}).get("switch_epoch"))


def test_datafree_stage2_pair_trains_a_stage_2_that_differs_only_in_its_targets(tmp_path):
    p = datafree.PROFILES["full"]
    runs = [r for r in datafree.build_runs(p, tmp_path) if r.group in datafree.STAGE2_ROWS]
    assert len(runs) == 2 * len(p["seeds"])
    configs = {(r.group, r.seed): load_config(r.config, r.overrides) for r in runs}
    for cfg in configs.values():
        assert 0 < first_stage2_epoch(cfg) < cfg.train.epochs
    for seed in p["seeds"]:
        teacher, labels = (configs[(row, seed)] for row in datafree.STAGE2_ROWS)
        assert (teacher.datafree.stage2_targets, labels.datafree.stage2_targets) == ("teacher", "labels")
        labels.datafree.stage2_targets = "teacher"
        assert labels == teacher


def test_dearkd_schedule_trains_the_transfer_students_first_and_every_branch_after_its_parent():
    p = dearkd_schedule.PROFILES["full"]
    runs = dearkd_schedule.schedule_runs(p)
    cells = dearkd_schedule.schedule_cells(runs, p)
    assert sorted(r.name for cell in cells for r in cell) == sorted(r.name for r in runs)  # each run once
    first = {(r.group, r.column, r.seed) for r in cells[0]}
    assert {(row, "10%", 0) for row in dearkd_schedule.SOURCES} <= first
    for cell in cells:
        names = {r.name for r in cell if r.branch is None}  # trained before the cell's branches
        assert all(r.branch[0] in names for r in cell if r.branch is not None)
    assert {(r.column, r.seed) for r in cells[-1]} == {("100%", seed) for seed in p["seeds"]}
