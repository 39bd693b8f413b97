"""The demo wires the teacher it trains into the distillers, runs every method of its table, and analyses
the SpectralKD teacher beside the students."""

import csv

import yaml

from vitdistill.demo import DEMO_RUNS, run_demo


def test_quick_demo_trains_every_run_and_distils_from_its_own_teacher(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(str(out), quick=True, overrides=["data.name=random", "data.eval_batch_size=32"])
    assert [r["label"] for r in results] == [label for label, *_ in DEMO_RUNS]
    assert [r["method"] for r in results] == ["none", "none", "deit", "dearkd", "spectralkd"]
    teacher = out / "teacher_resnet" / "last.safetensors"
    assert teacher.is_file()
    for run in ("deit", "dearkd"):
        cfg = yaml.safe_load((out / run / "config.yaml").read_text())
        assert cfg["teacher"]["checkpoint"] == str(teacher)
    with open(out / "dearkd" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[0]["train_hidden"]) > 0
    spectral = yaml.safe_load((out / "spectralkd" / "config.yaml").read_text())
    assert spectral["teacher"]["checkpoint"] == "weights/caitd_small_patch4_28_kd_fmnist.safetensors"
    analysis = {p.name for p in (out / "analysis").iterdir()}
    assert {"intensity.png", "attention_distance.png", "summary.md", "CaiT_teacher_layers.csv"} <= analysis
    # a second call finds the finished runs and does not train again
    again = run_demo(str(out), quick=True, overrides=["data.name=random", "data.eval_batch_size=32"])
    assert [r["wall_time_s"] for r in again] == [r["wall_time_s"] for r in results]
