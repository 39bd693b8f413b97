"""The command line as a user meets it: one clear error line for bad input, DDP via torchrun."""

import json
import os
import random
import subprocess
import sys

import pytest
import yaml

from vitdistill.cli import main
from vitdistill.engine import load_checkpoint


def write_config(tmp_path, values):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def one_error_line(capsys):
    """The CLI's answer to bad input: one error message, no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.startswith("vitdistill ") and err.count("error:") == 1, err
    return err


def test_bad_config_gives_one_clear_error(tmp_path, capsys, tiny_cfg_values):
    assert main(["train", write_config(tmp_path, tiny_cfg_values), "train.lr=-1"]) == 2
    assert "train.lr=-1.0 must be positive" in one_error_line(capsys)
    assert main(["train", write_config(tmp_path, tiny_cfg_values), "modle.name=x"]) == 2
    assert "did you mean 'model'" in one_error_line(capsys)
    assert main(["train", write_config(tmp_path, tiny_cfg_values), "method.name=dearkdd"]) == 2
    assert "unknown method.name 'dearkdd'" in one_error_line(capsys)


def test_overrides_may_follow_flags(tmp_path, capsys, tiny_cfg_values):
    # the override after --quiet is applied (and caught by validation), an unknown flag is refused
    assert main(["train", write_config(tmp_path, tiny_cfg_values), "--quiet", "train.lr=-1"]) == 2
    assert "train.lr=-1.0 must be positive" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        main(["train", write_config(tmp_path, tiny_cfg_values), "--quiet", "--bogus"])


def test_missing_data_gives_one_clear_error(tmp_path, capsys, tiny_cfg_values, monkeypatch):
    from vitdistill.data import datasets

    monkeypatch.setattr(datasets, "DEFAULT_SEARCH_DIRS", [])  # hide the installed copy
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    values = tiny_cfg_values
    values["data"].update(root=str(tmp_path / "no-such-folder"), download=False)
    assert main(["train", write_config(tmp_path, values)]) == 2
    assert "dataset-fashion-mnist" in one_error_line(capsys)


def test_non_checkpoint_files_give_one_clear_error(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    for seed in range(300):  # random bytes fail at many places inside the unpickler (IndexError, KeyError, ...)
        junk.write_bytes(random.Random(seed).randbytes(4096))
        assert main(["eval", str(junk)]) == 2, f"seed {seed}"
        assert "is not a valid vitdistill checkpoint" in one_error_line(capsys)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "config": {}}, evil)
    assert main(["eval", str(evil)]) == 2
    assert "is not a valid vitdistill checkpoint" in one_error_line(capsys)
    assert not marker.exists(), "loading a checkpoint executed code"


def test_train_eval_export_round_trip(tmp_path, capsys, tiny_cfg_values):
    values = tiny_cfg_values
    values["train"].update(epochs=1, max_steps_per_epoch=5)
    values["model"]["mhca"] = {"blocks": [0], "locality_strength": 2.0}  # eval/export must rebuild MHCA too
    assert main(["train", write_config(tmp_path, values), "--quiet"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    trained = json.loads((run_dir / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run_dir / "last.pt")]) == 0
    from_ckpt = json.loads(capsys.readouterr().out)
    assert from_ckpt["images"] == 10000
    assert from_ckpt["top1"] == pytest.approx(trained["last_top1"], abs=1e-9)
    out = tmp_path / "student.safetensors"
    assert main(["export", str(run_dir / "last.pt"), str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(trained["last_top1"], abs=1e-9)


@pytest.mark.slow
def test_two_process_torchrun_trains_and_checkpoints_once(tmp_path, tiny_cfg_values):
    values = tiny_cfg_values
    values["train"].update(epochs=2)
    config = write_config(tmp_path, values)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vitdistill", "train", config, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["last_top1"] > 10.0
    files = sorted(p.name for p in run_dir.iterdir())
    assert files.count("last.pt") == 1 and not [f for f in files if f.endswith(".tmp")], files
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] == 2
    # 600 images / 2 ranks / batch 32 -> 9 steps per epoch on each rank
    assert state["step"] == 18


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_cfg_values):
    """A real kill (SIGKILL, no cleanup) right after the first checkpoint; --resume finishes the run."""
    import signal
    import time

    values = tiny_cfg_values
    values["train"]["epochs"] = 4
    config = write_config(tmp_path, values)
    cli = [sys.executable, "-m", "vitdistill", "train", "--quiet", config]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every process: identical arithmetic
    subprocess.run([*cli, "run.name=uninterrupted"], cwd=tmp_path, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cli, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "runs" / "tiny" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "tiny" / "summary.json").exists(), "the run ended before it could be killed"
    assert 1 <= load_checkpoint(ckpt)["epoch"] < 4
    subprocess.run([*cli, "--resume"], cwd=tmp_path, env=env, check=True, capture_output=True)
    a = json.loads((tmp_path / "runs" / "uninterrupted" / "summary.json").read_text())
    b = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert b["last_top1"] == a["last_top1"] and b["best_top1"] == a["best_top1"]
    ha = load_checkpoint(tmp_path / "runs" / "uninterrupted" / "last.pt")["history"]
    hb = load_checkpoint(ckpt)["history"]
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
