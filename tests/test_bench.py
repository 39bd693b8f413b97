"""``vitdistill bench``: every runner timed, ratios against the bound, memory per runner, clear errors."""

import json
import statistics

import pytest

from vitdistill.cli import main
from vitdistill.config import ConfigError, load_config
from vitdistill.engine.bench import STUDENT, TEACHER, run_bench

TINY = ["model.kwargs={depth: 3, embed_dim: 32, num_heads: 2}",
        "teacher.checkpoint=null", "teacher.kwargs={channels: [8, 16, 32, 64], layers: [1, 1, 1, 1]}",
        "data.batch_size=16", "method.params.student_layers=[0, 1]", "method.params.teacher_layers=[1, 2]"]


def test_bench_times_every_runner_against_the_bound(tmp_path, capsys):
    rc = main(["bench", "configs/fashion_mnist/dearkd.yaml", *TINY, "--steps", "3", "--warmup", "1",
               "--methods", "kd", "dearkd", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [TEACHER, STUDENT, "kd", "kd (cached)", "dearkd", "dearkd (cached)",
                          "dearkd (cached, maps too)", "dearkd (last stage)", "dearkd (aligners alone)"]
    assert result["bound_ms"] == pytest.approx(rows[STUDENT]["median_ms"] + rows[TEACHER]["median_ms"])
    # teacher-running steps are set against the bound, teacher-free ones against the student step, round by round
    times = {name: r["times_ms"] for name, r in rows.items()}
    assert all(len(t) == 3 for t in times.values())
    assert all(r["median_ms"] == pytest.approx(statistics.median(r["times_ms"])) for r in rows.values())
    bounds = [s + t for s, t in zip(times[STUDENT], times[TEACHER])]
    for name in ("kd", "dearkd", "dearkd (aligners alone)"):  # the aligners: their share of the bound
        assert rows[name]["ratio"] == pytest.approx(statistics.median([v / b for v, b in zip(times[name], bounds)]))
    for name in ("dearkd (last stage)", "kd (cached)", "dearkd (cached)", "dearkd (cached, maps too)"):
        expected = statistics.median([v / s for v, s in zip(times[name], times[STUDENT])])
        assert rows[name]["ratio"] == pytest.approx(expected)
    assert rows[TEACHER]["ratio"] is None and rows[STUDENT]["ratio"] == pytest.approx(1.0)
    # a training step holds activations, gradients and optimizer state a teacher forward does not
    assert all(r["peak_mb"] > 0 for r in rows.values())
    assert rows[STUDENT]["peak_mb"] > rows[TEACHER]["peak_mb"]
    out = capsys.readouterr().out
    assert "| kd |" in out and "overhead ratio" in out and (tmp_path / "bench.md").read_text().strip() in out


def test_bench_names_bad_input():
    cfg = load_config("configs/fashion_mnist/dearkd.yaml", TINY)
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['kdd'\]; registered methods: \["):
        run_bench(cfg, methods=["kdd"])
    with pytest.raises(ConfigError, match="--steps=0 must be >= 1"):
        run_bench(cfg, steps=0)
    with pytest.raises(ConfigError, match="bench needs a teacher"):
        run_bench(load_config("configs/fashion_mnist/student_vit.yaml", []))


def test_bench_skips_a_method_the_student_cannot_run(tmp_path):
    cfg = load_config("configs/fashion_mnist/kd.yaml", ["model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
                                                        "data.batch_size=8"])
    result = run_bench(cfg, steps=1, warmup=0, methods=["deit"], memory=False, quiet=True)
    deit = next(r for r in result["rows"] if r["name"] == "deit")
    assert all(r["peak_mb"] is None for r in result["rows"])
    assert deit["median_ms"] is None and "needs a student with a distillation token" in deit["note"]


def test_bench_has_no_aligner_row_for_dearkd_without_hidden_alignment(tmp_path):
    cfg = load_config("configs/fashion_mnist/dearkd.yaml", [*TINY, "method.params.hidden_weight=0"])
    result = run_bench(cfg, steps=1, warmup=0, methods=["dearkd"], memory=False, cached=False, quiet=True)
    assert [r["name"] for r in result["rows"]] == [TEACHER, STUDENT, "dearkd", "dearkd (last stage)"]
