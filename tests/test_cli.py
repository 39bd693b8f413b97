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


# -- mistakes a new user makes: one line naming the key, the bad value and what is valid; exit code 2 ------------

def _method_params():
    from dataclasses import fields

    from vitdistill.methods import get_method, list_methods

    return [(m, f.name) for m in list_methods() for f in fields(get_method(m).Params)]


METHOD_CONFIGS = {"none": "student_vit", "kd": "kd", "deit": "deit", "feature_mse": "feature_mse", "dearkd": "dearkd",
                  "spectralkd": "spectralkd"}


def test_every_method_param_exists_in_the_table():
    from vitdistill.methods import list_methods

    assert set(METHOD_CONFIGS) == set(list_methods())
    assert len(_method_params()) >= 25  # every method but none has typed params


@pytest.mark.parametrize("method,key", _method_params(), ids=lambda x: str(x))
def test_wrong_type_for_every_method_param_gives_one_line(method, key, capsys, tmp_path):
    config = f"configs/fashion_mnist/{METHOD_CONFIGS[method]}.yaml"
    assert main(["train", config, f"run.output_dir={tmp_path}", f"method.params.{key}={{oops: 1}}"]) == 2
    err = one_error_line(capsys)
    assert f"method.params.{key}" in err and "{'oops': 1}" in err and "expected" in err, err
    assert not any(tmp_path.iterdir()), "a refused run must not create its folder"


@pytest.mark.parametrize("override,message", [
    ("method.params.hidden_weight=abc", "method.params.hidden_weight: expected a number, got 'abc'"),
    ("method.params.hidden_weight=-1", "method.params.hidden_weight=-1.0 must be >= 0"),
    ("method.params.alpha=1.5", "method.params.alpha=1.5 must be in [0, 1]"),
    ("method.params.kd_mode=soft-ish", "method.params.kd_mode: expected one of soft, hard, got 'soft-ish'"),
    ("method.params.switch_epoch=2.5", "method.params.switch_epoch: expected an integer or null, got 2.5"),
    ("method.params.hiden_weight=1", "did you mean 'hidden_weight'"),
    ("method.params.student_layers=[1]", "must be non-empty lists of the same length"),
])
def test_bad_method_params_give_one_line(override, message, capsys, tmp_path):
    assert main(["train", "configs/fashion_mnist/dearkd.yaml", f"run.output_dir={tmp_path}", override]) == 2
    assert message in one_error_line(capsys)


def test_yaml_exponent_strings_are_numbers_in_method_params():
    """YAML 1.1 reads ``1e-2`` (no dot) as a string; typed params coerce it like the config sections do."""
    from vitdistill.config import load_config
    from vitdistill.methods import parse_method_params

    cfg = load_config("configs/fashion_mnist/dearkd.yaml", ["method.params.hidden_weight=1e-2"])
    assert cfg.method.params["hidden_weight"] == "1e-2"
    assert parse_method_params("dearkd", cfg.method.params).hidden_weight == 0.01


def test_cuda_on_a_machine_without_it_gives_one_line(capsys, tmp_path, monkeypatch, tiny_cfg_values):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", write_config(tmp_path, tiny_cfg_values), "train.device=cuda"]) == 2
    assert "train.device='cuda' but CUDA is not available here; use train.device=cpu or auto" in one_error_line(capsys)
    assert main(["eval", "weights/resnetd_small_28_fmnist.safetensors", "--device", "cuda:1"]) == 2
    assert "CUDA is not available" in one_error_line(capsys)


def test_a_bad_param_in_a_real_process_is_one_line(tmp_path):
    """What a new user met as a traceback, now one line from the command itself."""
    proc = subprocess.run([sys.executable, "-m", "vitdistill", "train", "configs/fashion_mnist/dearkd.yaml",
                           f"run.output_dir={tmp_path}", "method.params.hidden_weight=x"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("vitdistill train: error: method.params.hidden_weight: expected a number, got 'x'")


def test_one_epoch_run_of_a_shipped_config_clamps_the_warmup(tmp_path, capsys):
    """`train.epochs=1` with a config whose warm-up is 2 epochs trains (warm-up: half the run), with a note."""
    from vitdistill.engine.trainer import Trainer, warmup_epochs

    assert warmup_epochs(2.0, 1, quiet=True) == 0.5 and warmup_epochs(2.0, 3) == 2.0
    from vitdistill.config import load_config

    cfg = load_config("configs/fashion_mnist/student_vit.yaml",
                      ["train.epochs=1", "data.fraction=0.01", f"run.output_dir={tmp_path}"])
    assert cfg.train.warmup_epochs == 2
    trainer = Trainer(cfg)
    try:
        assert trainer.warmup_steps == round(0.5 * trainer.loaders.steps_per_epoch)
    finally:
        trainer.close()
    assert "train.warmup_epochs=2 exceeds train.epochs=1; warming up for 0.5 epochs" in capsys.readouterr().out
