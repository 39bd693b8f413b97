"""Distillation methods through the trainer: stage switch, teacher calls, head averaging, resume."""

import csv

import pytest
import torch

from test_trainer import read_metrics
from vitdistill.config import ConfigError, config_from_dict
from vitdistill.engine import load_checkpoint
from vitdistill.engine.trainer import Trainer, TrainingError, train
from vitdistill.methods import MethodError, build_method, list_methods
from vitdistill.methods.dearkd import DearKD
from vitdistill.models import create_model

STUDENT = {"name": "vitd_tiny_patch4_28_distilled", "kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}}
TEACHER = {"name": "resnetd_small_28", "kwargs": {"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1]}}


def method_values(tmp_path, name, params, epochs=3, student=STUDENT, run="m"):
    return {
        "run": {"name": run, "output_dir": str(tmp_path / "runs"), "seed": 1},
        "data": {"fraction": 0.01, "batch_size": 32, "eval_batch_size": 1000},
        "model": student,
        "teacher": TEACHER,
        "method": {"name": name, "params": params},
        "train": {"epochs": epochs, "lr": 2e-3, "warmup_epochs": 0, "log_interval": 1000},
    }


def small_models():
    student = create_model(STUDENT["name"], num_classes=10, in_chans=1, img_size=28, **STUDENT["kwargs"])
    teacher = create_model(TEACHER["name"], num_classes=10, in_chans=1, **TEACHER["kwargs"])
    return student, teacher


def test_registry_lists_methods_and_rejects_bad_params():
    assert {"none", "kd", "deit", "feature_mse", "dearkd"} <= set(list_methods())
    student, teacher = small_models()
    with pytest.raises(ConfigError, match=r"unknown config key 'method.params.switch'; did you mean 'switch_epoch'\?"):
        build_method("dearkd", {"switch": 3}, student, teacher, epochs=6)
    with pytest.raises(MethodError, match="needs a teacher"):
        build_method("kd", {}, student, None)
    plain = create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, img_size=28, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(MethodError, match="needs a student with a distillation token"):
        build_method("deit", {}, plain, teacher)
    with pytest.raises(MethodError, match=r"method.params.switch_epoch=9 must be an integer in \[0, train.epochs=6\]"):
        build_method("dearkd", {"switch_epoch": 9}, student, teacher, epochs=6)


def test_dearkd_default_switch_is_five_sixths():
    student, teacher = small_models()
    method = build_method("dearkd", {}, student, teacher, epochs=12)
    assert method.switch_epoch == 10
    assert [method.stage_for_epoch(e) for e in (0, 9, 10, 11)] == [1, 1, 2, 2]


def test_deit_head_averages_at_inference():
    student, teacher = small_models()
    method = build_method("deit", {}, student, teacher)
    x = torch.randn(4, 1, 28, 28)
    method.eval()
    with torch.no_grad():
        feats = student.forward_features(x)
        cls_logits, dist_logits = student.head(feats[:, 0]), student.head_dist(feats[:, 1])
        assert torch.allclose(method(x), (cls_logits + dist_logits) / 2, atol=1e-6)
        assert not torch.allclose(cls_logits, dist_logits)  # so the check above can fail
    method.train()
    logits, losses = method(x, torch.randint(0, 10, (4,)))
    assert set(losses) == {"ce", "kd"} and logits.shape == (4, 10)


def test_dearkd_switch_stops_teacher_and_freezes_aligners(tmp_path):
    cfg = config_from_dict(method_values(tmp_path, "dearkd", {"switch_epoch": 2, "student_layers": [0, 1],
                                                              "teacher_layers": [1, 2]}))
    trainer = Trainer(cfg, quiet=True)
    method = trainer.distiller
    teacher_stages, snapshot = [], {}

    def count_teacher(module, inputs):
        teacher_stages.append(method.stage)

    def watch_student(module, inputs):
        if method.stage == 2 and not snapshot:
            snapshot.update({k: v.detach().clone() for k, v in method.aligners.state_dict().items()})
            snapshot["grads"] = [p.grad for p in method.aligners.parameters()]

    method.teacher.conv1.register_forward_pre_hook(count_teacher)
    method.student.register_forward_pre_hook(watch_student)
    trainer.fit()
    trainer.close()

    steps = trainer.loaders.steps_per_epoch
    assert teacher_stages == [1] * (2 * steps), "the teacher ran after switch_epoch (or not every stage-1 step)"
    final = method.aligners.state_dict()
    assert snapshot and all(torch.equal(final[k], snapshot[k]) for k in final), "aligners changed in stage 2"
    assert all(g is None for g in snapshot["grads"])
    assert not any(p.requires_grad for p in method.aligners.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in method.aligners.parameters()}
    with open(tmp_path / "runs" / "m" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["1", "1", "2"]
    assert rows[0]["train_hidden"] and rows[0]["train_kd"] and not rows[2]["train_hidden"]
    assert rows[2]["train_ce_dist"] and not rows[0]["train_ce_dist"]


def test_dearkd_resume_across_switch_equals_uninterrupted(tmp_path, killed_run):
    params = {"switch_epoch": 1, "student_layers": [0, 1], "teacher_layers": [1, 2]}
    full = train(config_from_dict(method_values(tmp_path, "dearkd", params, run="full")), quiet=True)

    cfg = config_from_dict(method_values(tmp_path, "dearkd", params, run="killed"))
    killed_run(cfg, DearKD, 30)  # epoch 2 (stage 2) of 18-step epochs
    assert load_checkpoint(tmp_path / "runs" / "killed" / "last.pt")["stage"] == 1
    resumed = train(cfg, resume=True, quiet=True)

    assert resumed["last_top1"] == full["last_top1"]
    a = load_checkpoint(tmp_path / "runs" / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "runs" / "killed" / "last.pt")
    assert b["stage"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for ha, hb in zip(a["history"], b["history"]):
        assert {k: v for k, v in ha.items() if "time" not in k and "per_s" not in k} == \
               {k: v for k, v in hb.items() if "time" not in k and "per_s" not in k}


@pytest.mark.parametrize("name, params, student, expected", [
    ("kd", {"kd_mode": "soft"}, STUDENT["name"].replace("_distilled", ""), {"ce", "kd"}),
    ("kd", {"kd_mode": "hard"}, STUDENT["name"].replace("_distilled", ""), {"ce", "kd"}),
    ("deit", {"kd_mode": "soft"}, STUDENT["name"], {"ce", "kd"}),
    ("feature_mse", {"student_layers": [1], "teacher_layers": [2]}, STUDENT["name"].replace("_distilled", ""),
     {"ce", "feature"}),
    ("dearkd", {"hidden_weight": 0.0}, STUDENT["name"], {"ce", "kd"}),
])
def test_methods_train_one_step_with_named_losses(name, params, student, expected):
    s, teacher = small_models()
    if student != STUDENT["name"]:
        s = create_model(student, num_classes=10, in_chans=1, img_size=28, **STUDENT["kwargs"])
    method = build_method(name, params, s, teacher, epochs=3)
    method.train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    logits, losses = method(x, y)
    assert set(losses) == expected and logits.shape == (8, 10)
    sum(losses.values()).backward()
    trainable = [p for m in method.trainable_modules() for p in m.parameters()]
    assert all(p.grad is not None for p in trainable if p.requires_grad and p.dim() > 1)
    assert all(p.grad is None for p in teacher.parameters())


PLAIN = STUDENT["name"].replace("_distilled", "")


@pytest.mark.parametrize("name, params, student, stage, forwards", [
    ("kd", {}, PLAIN, 1, 1),
    ("deit", {}, STUDENT["name"], 1, 1),
    ("feature_mse", {"student_layers": [1], "teacher_layers": [2]}, PLAIN, 1, 1),
    ("dearkd", {"student_layers": [0, 1], "teacher_layers": [1, 2]}, STUDENT["name"], 1, 1),
    ("dearkd", {"student_layers": [0, 1], "teacher_layers": [1, 2]}, STUDENT["name"], 2, 0),
    ("spectralkd", {"student_layers": [0, 2], "teacher_layers": [1, 3]}, PLAIN, 1, 1),
    ("none", {}, PLAIN, 1, 0),
])
def test_one_teacher_forward_per_step_shared_with_the_caller(name, params, student, stage, forwards):
    """The trainer's ``teacher_outputs`` (asked for logits too, as the data-free relabelling does) is the only
    teacher forward of a step, and the losses computed from it equal the method's own."""
    _, teacher = small_models()
    s = create_model(student, num_classes=10, in_chans=1, img_size=28, **STUDENT["kwargs"])
    method = build_method(name, params, s, teacher if name != "none" else None, epochs=3)
    method.train()
    method.on_stage_change(stage)
    calls = []
    if method.teacher is not None:  # every teacher forward, whole or through a tap, passes its stem
        stem = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
        stem.register_forward_pre_hook(lambda *_: calls.append(1))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.manual_seed(0)
    _, own = method(x, y)
    own_calls, calls[:] = len(calls), []
    torch.manual_seed(0)
    shared = method.teacher_outputs(x, logits=True) if forwards else None
    _, given = method(x, y, shared)
    assert own_calls == len(calls) == forwards
    if shared is not None:
        assert torch.equal(shared.logits, teacher(x))
    assert own.keys() == given.keys() and all(torch.equal(own[k], given[k]) for k in own)


def test_optimizer_exempts_student_tokens_and_norms_from_weight_decay():
    import timm.optim

    student, teacher = small_models()
    method = build_method("deit", {}, student, teacher)
    opt = timm.optim.create_optimizer_v2(method, opt="adamw", lr=1e-3, weight_decay=0.05)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(student.pos_embed)] == 0.0 and decay_of[id(student.dist_token)] == 0.0
    assert decay_of[id(student.blocks[0].attn.qkv.weight)] == 0.05
    assert not {id(p) for p in teacher.parameters()} & set(decay_of)  # the teacher is never optimised


def test_the_unregistered_teacher_follows_every_move_of_the_distiller():
    student, teacher = small_models()
    method = build_method("kd", {}, create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, img_size=28,
                                                 depth=1, embed_dim=32, num_heads=2), teacher)
    assert "teacher" not in dict(method.named_children())  # not in the optimizer, checkpoint or DDP
    method.double()
    assert {p.dtype for p in teacher.parameters()} == {torch.float64}
    method.to(torch.float32)
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    method.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_checkpoint_stores_the_student_metadata(tmp_path):
    from vitdistill.engine import load_trained_model

    values = method_values(tmp_path, "none", {}, epochs=1, student={"name": "vitd_tiny_patch4_28",
                                                                  "kwargs": STUDENT["kwargs"]})
    train(config_from_dict(values), quiet=True)
    ckpt = load_checkpoint(tmp_path / "runs" / "m" / "last.pt")
    assert ckpt["meta"]["num_classes"] == "10" and ckpt["meta"]["dataset"] == "fashion-mnist"
    model, data, meta, _ = load_trained_model(tmp_path / "runs" / "m" / "last.pt")
    assert meta == ckpt["meta"] and model.head.out_features == 10 and data["name"] == "fashion-mnist"
    prefix = "student."
    assert all(torch.equal(v, ckpt["model"][prefix + k]) for k, v in model.state_dict().items())


def test_a_branch_at_the_switch_equals_an_uninterrupted_run(tmp_path):
    """DearKD in one stage keeps its epoch-1 checkpoint; a run branched from it with switch_epoch=1 ends exactly
    where an uninterrupted switch_epoch=1 run ends (the shared epoch is not trained twice)."""
    base = {"student_layers": [0, 1], "teacher_layers": [1, 2]}
    full = train(config_from_dict(method_values(tmp_path, "dearkd", {**base, "switch_epoch": 1}, epochs=2, run="full")), quiet=True)
    parent = method_values(tmp_path, "dearkd", {**base, "switch_epoch": 2}, epochs=2, run="one_stage")
    parent["train"]["keep_epochs"] = [1, 2]
    train(config_from_dict(parent), quiet=True)
    kept = tmp_path / "runs" / "one_stage" / "epoch_001.pt"
    assert kept.is_file() and (tmp_path / "runs" / "one_stage" / "epoch_002.pt").is_file()
    branch = config_from_dict(method_values(tmp_path, "dearkd", {**base, "switch_epoch": 1}, epochs=2, run="branch"))
    branched = train(branch, quiet=True, branch_from=kept)

    assert branched["last_top1"] == full["last_top1"]
    assert read_metrics(tmp_path / "runs" / "branch") == read_metrics(tmp_path / "runs" / "full")
    a = load_checkpoint(tmp_path / "runs" / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "runs" / "branch" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # epoch 2 ran in stage 1 in the parent but would be stage 2 with switch_epoch=1: no branch from there
    late = config_from_dict(method_values(tmp_path, "dearkd", {**base, "switch_epoch": 1}, epochs=2, run="late"))
    with pytest.raises(TrainingError, match="epoch 2 ran in stage 1, which this config's stages do not"):
        train(late, quiet=True, branch_from=tmp_path / "runs" / "one_stage" / "epoch_002.pt")
    other = method_values(tmp_path, "dearkd", {**base, "switch_epoch": 1, "alpha": 0.3}, epochs=2, run="other")
    with pytest.raises(TrainingError, match=r"differs from the checkpoint's in sections \['method'\]"):
        train(config_from_dict(other), quiet=True, branch_from=kept)
    with pytest.raises(TrainingError, match="a branch starts a new run; it cannot be combined with --resume"):
        train(config_from_dict(parent), resume=True, quiet=True, branch_from=kept)
