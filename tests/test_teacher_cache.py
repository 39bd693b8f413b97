"""Replayable views and exact cached teacher targets (teacher_cache.py, data/replay.py)."""

import json

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from test_trainer import read_metrics
from vitdistill.cli import main
from vitdistill.config import AugmentConfig, DataConfig, config_from_dict
from vitdistill.data import build_data
from vitdistill.data.replay import MixSpec, ReplayableViews, view_hash
from vitdistill.engine.trainer import train
from vitdistill.io import mmap_safetensors, read_safetensors, write_safetensors
from vitdistill.methods import kd
from vitdistill.models import create_model, save_weights
from vitdistill.models.factory import build_model
from vitdistill.teacher_cache import CacheError, TeacherCache, build_cache, fingerprint, verify_cache

AUGMENT = {"crop_padding": 3, "hflip": 0.5, "randaugment": "rand-m9-mstd0.5", "random_erasing": 0.5,
           "mixup": 0.8, "cutmix": 1.0}
TEACHER = {"name": "resnetd_small_28", "kwargs": {"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1]}}


def views(seed=3, augment=AUGMENT, smoothing=0.1):
    cfg = DataConfig(name="random", augment=AugmentConfig(**augment))
    data = build_data(cfg, seed=0)
    return ReplayableViews(data.train, seed, data.num_classes, MixSpec(augment["mixup"], augment["cutmix"], smoothing))


def collect(ds, epoch, workers, batch):
    ds.set_epoch(epoch)
    out = {}
    for x, target, label, index in DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True):
        for i, xi, ti, li in zip(index.tolist(), x, target, label):
            out[i] = (xi, ti, int(li))
    return out


def test_a_view_is_a_function_of_seed_epoch_and_index_alone():
    a = collect(views(), 1, workers=0, batch=4)
    torch.manual_seed(123)  # the global RNG state plays no part
    b = collect(views(), 1, workers=2, batch=5)  # nor the worker count, batch size or order
    assert a.keys() == b.keys() == set(range(64))
    assert all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) and a[i][2] == b[i][2] for i in a)
    other_epoch = collect(views(), 2, workers=0, batch=64)
    other_seed = collect(views(seed=4), 1, workers=0, batch=64)
    assert sum(torch.equal(a[i][0], other_epoch[i][0]) for i in a) < 4
    assert sum(torch.equal(a[i][0], other_seed[i][0]) for i in a) < 4


def test_mixed_views_mix_images_and_targets_alike():
    ds = views(augment={**AUGMENT, "randaugment": None, "random_erasing": 0.0}, smoothing=0.0)
    ds.set_epoch(0)
    lams = []
    for i in range(len(ds)):
        x, target, label, _ = ds[i]
        partner = int(ds.partner[i])
        own, _ = ds.view(i)
        theirs, label_p = ds.view(partner)
        lam = float(target[label]) if label != label_p else 1.0
        assert target.sum().item() == pytest.approx(1.0)
        if label != label_p:
            assert float(target[label_p]) == pytest.approx(1 - lam, abs=1e-6)
            # mixup: a convex blend; cutmix: each pixel from one image, the box's share equal to 1 - lam
            blend = lam * own + (1 - lam) * theirs
            from_own = (x == own).flatten(1).all(0)
            from_theirs = (x == theirs).flatten(1).all(0)
            assert torch.allclose(x, blend, atol=1e-5) or (
                bool((from_own | from_theirs).all())
                and float((~from_own & from_theirs).float().mean()) <= 1 - lam + 1e-6)
            lams.append(lam)
    assert len(lams) > 20 and 0.05 < sum(lams) / len(lams) < 0.95


def cached_values(tmp_path, **extra):
    weights = tmp_path / "teacher.safetensors"  # a fixed teacher: the cache's and the live one are the same
    if not weights.exists():
        torch.manual_seed(0)
        save_weights(create_model(TEACHER["name"], num_classes=10, in_chans=1, **TEACHER["kwargs"]), weights)
    return {
        "run": {"name": "cached", "output_dir": str(tmp_path / "runs"), "seed": 2},
        "data": {"name": "random", "batch_size": 16, "eval_batch_size": 20, "augment": AUGMENT},
        "model": {"name": "vitd_tiny_patch4_28", "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}},
        "teacher": {**TEACHER, "checkpoint": str(weights), "cache": str(tmp_path / "cache")},
        "method": {"name": "kd", "params": {"kd_mode": "soft", "temperature": 2.0}},
        "train": {"epochs": 2, "lr": 1e-3, "warmup_epochs": 0, "label_smoothing": 0.1, "log_interval": 1000},
        **extra,
    }


def test_cached_targets_equal_a_fresh_teacher_forward(tmp_path):
    cfg = config_from_dict(cached_values(tmp_path))
    summary = build_cache(cfg, topk=4, quiet=True)
    assert summary["records"] == 128 and summary["epochs_written"] == 2
    data = build_data(cfg.data, seed=2, label_smoothing=0.1)
    teacher = build_model(cfg.teacher, 10, 1, 28).eval()
    ds = ReplayableViews(data.train, 2, 10, MixSpec(0.8, 1.0, 0.1))
    cache = TeacherCache(tmp_path / "cache", fingerprint(cfg, 64, None), 2)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        x = torch.stack([ds[i][0] for i in range(64)])
        with torch.no_grad():
            live = teacher(x)
        cached = cache.logits(epoch, torch.arange(64))
        top = live.topk(4, dim=1)
        assert torch.equal(cached.topk(4, dim=1).indices, top.indices)
        assert torch.allclose(cached.gather(1, top.indices), top.values, rtol=2e-3, atol=2e-3)  # fp16
        # the other classes share what the top 4 leave, so the probabilities still sum to one
        assert torch.allclose(cached.softmax(1).sum(1), torch.ones(64), atol=1e-3)
        assert torch.allclose(cached.logsumexp(1), live.logsumexp(1), atol=5e-3)
        assert cache.shard(epoch)["view_hash"].tolist() == [view_hash(v) for v in x]
    check = verify_cache(cfg, 0.5, quiet=True)
    assert check["records"] == 64 and check["identical_inputs"] == 64 and check["top1_agreement"] == 100.0
    assert check["max_logit_error"] < 5e-3


DEARKD = {"student_layers": [0, 1], "teacher_layers": [1, 2], "switch_epoch": 1}


@pytest.mark.parametrize("method, params, maps", [("kd", {"kd_mode": "soft", "temperature": 2.0}, False),
                                                  ("dearkd", DEARKD, False), ("dearkd", DEARKD, True)])
def test_training_with_a_cache_never_runs_the_teacher_for_logits(tmp_path, monkeypatch, method, params, maps):
    model = {"name": "vitd_tiny_patch4_28_distilled", "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
    values = {**cached_values(tmp_path), "method": {"name": method, "params": params}, "model": model}
    build_cache(config_from_dict(values), maps=maps, quiet=True)
    heads, stems = [], []
    from vitdistill.engine import trainer as trainer_module

    build = trainer_module.build_models

    def counting(*args):
        student, teacher = build(*args)
        teacher.get_classifier().register_forward_pre_hook(lambda *_: heads.append(1))
        stem = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
        stem.register_forward_pre_hook(lambda *_: stems.append(1))
        return student, teacher

    monkeypatch.setattr(trainer_module, "build_models", counting)
    cached = train(config_from_dict(values), quiet=True)
    steps = 2 * (64 // 16)
    # kd never runs the teacher; dearkd runs it up to its tapped stage in stage 1 (epoch 1) only, or not at all
    # when the cache holds the maps; plus the one blank-image probe of the tapped shapes at build time
    assert heads == [] and len(stems) == (0 if method == "kd" else 1 if maps else 1 + steps // 2)
    live_values = {**values, "teacher": {**values["teacher"], "cache": None}, "data": {**values["data"], "replay": True},
                   "run": {**values["run"], "name": "live"}}
    live = train(config_from_dict(live_values), quiet=True)
    # the same views, targets equal within fp16: the same training up to rounding
    assert cached["last_top1"] == pytest.approx(live["last_top1"], abs=3.2)  # 32 test images: one image is 3.1


def test_a_foreign_corrupt_or_unfinished_cache_is_refused(tmp_path, capsys):
    values = cached_values(tmp_path)
    with pytest.raises(CacheError, match="holds no cache .*manifest.json missing.*cache-teacher"):
        train(config_from_dict(values), quiet=True)
    build_cache(config_from_dict({**values, "train": {**values["train"], "epochs": 1}}), quiet=True)
    with pytest.raises(CacheError, match=r"lacks epochs \[1\] of train.epochs=2"):
        train(config_from_dict(values), quiet=True)
    with pytest.raises(CacheError, match=r"made under another config: seed \(2 in the cache, 3 now\)"):
        train(config_from_dict({**values, "run": {**values["run"], "seed": 3}}), quiet=True)
    with pytest.raises(CacheError, match=r"data.augment.hflip \(0.5 in the cache, 0.0 now\)"):
        build_cache(config_from_dict({**values, "data": {**values["data"], "augment": {**AUGMENT, "hflip": 0.0}}}))
    build_cache(config_from_dict(values), quiet=True)  # finishes the missing epoch
    shard = tmp_path / "cache" / "epoch_0001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CacheError, match="epoch_0001.safetensors' cannot be read"):
        train(config_from_dict(values), quiet=True)


def test_cache_teacher_command_builds_resumes_and_verifies(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cached_values(tmp_path)))
    assert main(["cache-teacher", str(config), "--quiet", "--topk", "3"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["epochs_written"] == 2 and first["topk"] == 3 and first["bytes_per_record"] > 0
    assert main(["cache-teacher", str(config), "--quiet", "--topk", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_found"] == 2
    assert main(["cache-teacher", str(config), "--verify", "0.25"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 32 and report["identical_inputs"] == 32 and report["top1_agreement"] == 100.0
    assert main(["cache-teacher", str(config), "--verify", "2"]) == 2
    assert "--verify=2.0 must be a fraction in (0, 1]" in capsys.readouterr().err


def test_a_killed_cached_run_resumes_to_the_same_metrics(tmp_path, killed_run):
    values = cached_values(tmp_path)
    build_cache(config_from_dict(values), quiet=True)
    full = train(config_from_dict({**values, "run": {**values["run"], "name": "full"}}), quiet=True)
    cfg = config_from_dict({**values, "run": {**values["run"], "name": "killed"}})
    killed_run(cfg, kd.KD, 6)  # in epoch 2
    resumed = train(cfg, resume=True, quiet=True)
    assert resumed["last_top1"] == full["last_top1"]
    assert read_metrics(tmp_path / "runs" / "killed") == read_metrics(tmp_path / "runs" / "full")


def test_memory_mapped_shard_reads_equal_the_stored_tensors_and_never_write_the_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"values": torch.randn(6, 3, generator=g).half(), "indices": torch.arange(18, dtype=torch.int16).view(6, 3),
               "view_hash": torch.randint(-2**62, 2**62, (6,), generator=g), "map.1": torch.randn(6, 2, 2, 2, generator=g),
               "empty": torch.zeros(0, 3, dtype=torch.float16)}
    path = write_safetensors(tmp_path / "shard.safetensors", tensors, metadata={"epoch": "0"})
    mapped = mmap_safetensors(path)
    assert mapped.keys() == tensors.keys()
    assert all(mapped[k].dtype == v.dtype and torch.equal(mapped[k], v) for k, v in tensors.items())
    rows = torch.tensor([4, 0, 4, 2])
    assert torch.equal(mapped["map.1"][rows], tensors["map.1"][rows])
    mapped["values"][0] = 7  # copy-on-write: the file keeps its bytes
    assert torch.equal(read_safetensors(path)[0]["values"], tensors["values"])
    path.write_bytes(path.read_bytes()[:-8])  # a truncated file
    with pytest.raises(ValueError):
        mmap_safetensors(path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")  # a header that is not a table of tensors
    with pytest.raises(ValueError, match="no safetensors header"):
        mmap_safetensors(path)
