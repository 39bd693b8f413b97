"""The demo runs every method of its table with the teacher its profile names, and analyses the SpectralKD
teacher beside the students."""

import csv

import yaml

from vitdistill.demo import DEMO_RUNS, SHIPPED_CNN, run_datafree_demo, run_demo

QUICK = ["data.name=random", "data.eval_batch_size=32"]
SPECTRAL_TEACHER = "weights/caitd_small_patch4_28_kd_fmnist.safetensors"


def teacher_of(out, run):
    return yaml.safe_load((out / run / "config.yaml").read_text())["teacher"]["checkpoint"]


def test_short_demo_distils_from_the_shipped_teachers(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(str(out), quick=True, overrides=QUICK)
    assert [r["label"] for r in results] == [label for label, *_ in DEMO_RUNS]
    assert [r["method"] for r in results] == ["none", "deit", "dearkd", "spectralkd"]
    assert not (out / "teacher_resnet").exists()
    assert teacher_of(out, "deit") == teacher_of(out, "dearkd") == SHIPPED_CNN
    assert teacher_of(out, "spectralkd") == SPECTRAL_TEACHER
    cfg = yaml.safe_load((out / "student_vit" / "config.yaml").read_text())
    assert cfg["data"]["fraction"] == 0.05 and cfg["data"]["batch_size"] == 64
    with open(out / "dearkd" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[0]["train_hidden"]) > 0
    analysis = {p.name for p in (out / "analysis").iterdir()}
    assert {"intensity.png", "attention_distance.png", "summary.md", "CaiT_teacher_layers.csv"} <= analysis
    printed = capsys.readouterr().out
    assert "the shipped CNN (weights/resnetd_small_28_fmnist.safetensors" in printed and "--full" in printed
    assert all(r["label"] in printed for r in results) and "log ratio" in printed
    # a second call finds the finished runs and does not train again
    again = run_demo(str(out), quick=True, overrides=QUICK)
    assert [r["wall_time_s"] for r in again] == [r["wall_time_s"] for r in results]


def test_full_demo_trains_its_own_teacher_on_the_subset(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(str(out), quick=True, full=True, overrides=QUICK)
    assert [r["method"] for r in results] == ["none", "none", "deit", "dearkd", "spectralkd"]
    teacher = out / "teacher_resnet" / "last.safetensors"
    assert teacher.is_file()
    assert teacher_of(out, "deit") == teacher_of(out, "dearkd") == str(teacher)
    assert yaml.safe_load((out / "deit" / "config.yaml").read_text())["data"]["fraction"] == 0.1


def test_datafree_demo_trains_from_synthesised_images_only(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_datafree_demo(str(out), quick=True, overrides=QUICK)
    run = out / "df_dearkd_online"
    assert summary["method"] == "dearkd" and summary["train_images"] == 2 * 2 * 40
    assert (run / "samples.png").is_file() and (run / "bank" / "images.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "No real training image is read" in printed and "rounds.csv" in printed
