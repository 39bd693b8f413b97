"""Command line: ``vitdistill train | eval | export | analyze | synthesize | bench | cache-teacher | demo`` (also ``python -m vitdistill``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, config_from_dict, load_config, resolve_path
from .errors import VitdistillError


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import load_checkpoint
    from .engine.trainer import train

    if args.config is None:
        if not isinstance(args.resume, str):  # no CONFIG: --resume must name the run folder
            raise ConfigError("train needs a CONFIG file (or --resume RUN_DIR to continue a run)")
        run_dir = Path(args.resume)
        values = load_checkpoint(run_dir / "last.pt")["config"]
        cfg = config_from_dict(values)
        if args.overrides:
            raise ConfigError("overrides cannot be combined with --resume RUN_DIR; a resumed run keeps its config")
    else:
        cfg = load_config(resolve_path(args.config), args.overrides)
    summary = train(cfg, resume=bool(args.resume), quiet=args.quiet, branch_from=args.branch_from)
    print(json.dumps({k: summary[k] for k in ("run", "best_top1", "last_top1", "wall_time_s")}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .data import build_data, test_split_config
    from .data.subsets import balanced_loader
    from .engine import evaluate, load_trained_model
    from .engine.distributed import DistInfo, resolve_device

    if args.images is not None and args.images < 1:
        raise ConfigError(f"--images={args.images} must be a positive number of test images")
    device = resolve_device(args.device)
    model, data_values, _, _ = load_trained_model(Path(args.checkpoint), device)
    data_cfg = test_split_config(data_values, args.data, args.data_root)
    test_set = build_data(data_cfg, seed=0).val
    if args.images is None:
        loader = DataLoader(test_set, batch_size=args.batch_size, num_workers=data_cfg.num_workers)
    else:
        loader = balanced_loader(test_set, args.images, args.seed, args.batch_size)
    metrics = evaluate(model, loader, device, DistInfo(device=device))
    result = {"checkpoint": args.checkpoint, "data": data_cfg.name, "images": len(loader.dataset), **metrics}
    print(json.dumps(result, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .engine import load_trained_model
    from .models import save_weights

    model, _, meta, ckpt = load_trained_model(Path(args.checkpoint), "cpu")
    if ckpt is None:
        raise ConfigError(f"export needs a training checkpoint (.pt), got '{args.checkpoint}'")
    if args.ema:
        if ckpt.get("ema") is None:
            raise ConfigError(f"--ema: '{args.checkpoint}' holds no EMA weights (train.ema was false)")
        model.load_state_dict(ckpt["ema"])
    save_weights(model, args.output, meta)
    print(f"wrote {args.output}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from .synthesis import run_synthesis

    summary = run_synthesis(load_config(resolve_path(args.config), args.overrides), quiet=args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_datafree_demo, run_demo

    if args.datafree:
        if args.full or args.fraction is not None:
            raise ConfigError("--datafree reads no real training image: it takes no --full or --fraction")
        run_datafree_demo(output_dir=args.output_dir, quick=args.quick)
    else:
        run_demo(output_dir=args.output_dir, fraction=args.fraction, quick=args.quick, full=args.full)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .engine.bench import markdown, run_bench

    cfg = load_config(resolve_path(args.config), args.overrides)
    out = Path(args.out) if args.out else Path(cfg.run.output_dir) / "bench" / cfg.run.name
    result = run_bench(cfg, steps=args.steps, warmup=args.warmup, methods=args.methods,
                       num_classes=args.num_classes, out=out, memory=not args.no_memory,
                       cached=not args.no_cached, quiet=args.quiet)
    print(markdown(result))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from .teacher_cache import build_cache, verify_cache

    cfg = load_config(resolve_path(args.config), args.overrides)
    if args.verify is not None:
        verify_cache(cfg, args.verify, seed=args.seed, folder=args.out)
        return 0
    print(json.dumps(build_cache(cfg, folder=args.out, topk=args.topk, batch_size=args.batch_size, maps=args.maps,
                                 quiet=args.quiet), indent=2))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Layer spectra/intensity of the models on a class-balanced test split; report files into --out."""
    from .analysis.report import analyze_models, load_models
    from .engine.distributed import resolve_device

    device = str(resolve_device(args.device))
    models, loaders, datasets = load_models(
        args.models, labels=args.labels, data=args.data, data_root=args.data_root,
        images=args.images, batch_size=args.batch_size, seed=args.seed, device=device)
    data_names = ", ".join(sorted(set(datasets.values())))
    result = analyze_models(
        models, loaders, args.out, max_images=args.images, spectra_layers=args.spectra_layers,
        attention=args.attention, pairs=args.pairs, pair_first=args.pair_first, pair_last=args.pair_last,
        per_block=args.per_block,
        description=f"{args.images} class-balanced images (seed {args.seed}) of the {data_names} test split.",
        progress=not args.quiet)
    print(f"wrote {len(result['files'])} files to {args.out}: " + ", ".join(Path(f).name for f in result["files"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitdistill", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one experiment from a YAML config")
    t.add_argument("config", nargs="?", help="experiment YAML (e.g. configs/fashion_mnist/student_vit.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 data.fraction=0.1")
    t.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the run from its last checkpoint (optionally: the run folder)")
    t.add_argument("--branch-from", metavar="CKPT",
                   help="start a new run from another run's checkpoint (e.g. its epoch_NNN.pt from train.keep_epochs) "
                        "under a config that may differ in run.name/output_dir, train.keep_epochs and "
                        "method.params.switch_epoch where the epochs already trained agree")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint (.pt or exported .safetensors) on a test set")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="dataset name (default: the one the model was trained on)")
    e.add_argument("--data-root", help="dataset folder")
    e.add_argument("--images", type=int, help="a class-balanced subset of this many test images (default: all)")
    e.add_argument("--seed", type=int, default=0, help="seed of the --images selection")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a training checkpoint's student as .safetensors with metadata")
    x.add_argument("checkpoint")
    x.add_argument("output")
    x.add_argument("--ema", action="store_true", help="export the EMA weights")
    x.set_defaults(func=cmd_export)

    y = sub.add_parser("synthesize", help="images made from a teacher alone (DeepInversion + intra-divergence, "
                                          "DF-DearKD): a train split for data.synthetic")
    y.add_argument("config", help="YAML with teacher, data and synthesis sections (e.g. configs/fashion_mnist/synthesize.yaml)")
    y.add_argument("overrides", nargs="*", help="dotted overrides, e.g. synthesis.images_per_class=50")
    y.add_argument("--quiet", action="store_true", help="no per-batch lines")
    y.set_defaults(func=cmd_synthesize)

    d = sub.add_parser("demo", help="on a Fashion-MNIST subset: ViT alone, DeiT, DearKD, SpectralKD; a table and the "
                                    "teacher analysis (about 10 min on 2 CPU cores; --full: about 38)")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--fraction", type=float, help="share of the training set (default: 0.05, or 0.1 with --full)")
    d.add_argument("--full", action="store_true",
                   help="10%% of the data, 8 epochs, and a CNN teacher trained on the same subset")
    d.add_argument("--datafree", action="store_true",
                   help="a short online data-free run instead (DF-DearKD, no real training image; about 9 min)")
    d.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="step time and peak memory of every method against the online lower bound "
                                     "(student step + teacher forward), on random images of the config's size")
    b.add_argument("config", help="experiment YAML: student, teacher, image size, batch, amp/channels_last")
    b.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=8 data.img_size=224")
    b.add_argument("--steps", type=int, default=10, help="timed steps of each runner (medians)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps of each runner first")
    b.add_argument("--methods", nargs="+", help="only these methods (default: every registered one)")
    b.add_argument("--num-classes", type=int, help="class count (default: the dataset's; needed for imagefolder)")
    b.add_argument("--out", help="folder for bench.json and bench.md (default: <run.output_dir>/bench/<run.name>)")
    b.add_argument("--no-cached", action="store_true", help="skip the steps on cached teacher targets")
    b.add_argument("--no-memory", action="store_true", help="skip the peak memory (on the CPU: a process per runner)")
    b.add_argument("--quiet", action="store_true", help="no per-round lines")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("cache-teacher", help="the teacher's targets for every view the run will see (top-k logits), "
                                             "for `train` with teacher.cache: the teacher leaves the training loop")
    c.add_argument("config", help="the experiment YAML the cache is for (its data, augmentation, seed, teacher)")
    c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.cache=runs/cache/kd train.epochs=30")
    c.add_argument("--out", help="cache folder (default: teacher.cache)")
    c.add_argument("--topk", type=int, default=10, help="logits kept per view (all of them when >= the class count)")
    c.add_argument("--batch-size", type=int, help="teacher batch (default: data.eval_batch_size)")
    c.add_argument("--maps", action="store_true", help="also the teacher's maps at method.params.teacher_layers "
                                                        "(fp16): feature methods then run no teacher at all")
    c.add_argument("--verify", type=float, metavar="P",
                   help="instead: recompute a fraction P of the records with the live teacher and report agreement")
    c.add_argument("--seed", type=int, default=0, help="seed of the --verify sample")
    c.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    c.set_defaults(func=cmd_cache_teacher)

    a = sub.add_parser("analyze", help="layer spectra and intensity of models (SpectralKD analysis): CSV, PNG, markdown")
    a.add_argument("models", nargs="+", metavar="MODEL",
                   help="training checkpoint (.pt), run folder, exported .safetensors, or name:MODEL (random "
                        "weights); the first is the reference (teacher)")
    a.add_argument("--labels", nargs="+", help="one label per model (default: from the file or run name)")
    a.add_argument("--data", help="dataset name (default: the one each model was trained on)")
    a.add_argument("--data-root", help="dataset folder")
    a.add_argument("--images", type=int, default=1000, help="class-balanced test images per model")
    a.add_argument("--batch-size", type=int, default=250)
    a.add_argument("--seed", type=int, default=0, help="seed of the image selection")
    a.add_argument("--out", default="runs/analysis", help="output folder")
    a.add_argument("--spectra-layers", nargs="+", type=int,
                   help="layers drawn in <label>_spectra.png (default: first, middle, last; -1 = last)")
    a.add_argument("--attention", action="store_true", help="also mean attention distance (ViT-style models)")
    a.add_argument("--pairs", action="store_true",
                   help="propose SpectralKD layer pairs from the first model (teacher) for the second (student)")
    a.add_argument("--pair-first", type=int, default=2, help="pairs among the teacher's early layers")
    a.add_argument("--pair-last", type=int, default=2, help="pairs among the teacher's late layers")
    a.add_argument("--per-block", action="store_true",
                   help="every transformer block is a layer (Swin: blocks inside the stages, not stage outputs)")
    a.add_argument("--device", default="auto")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_analyze)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positionals at the first flag: `train CFG --quiet a.b=1` still overrides
    if extra and args.command in ("train", "synthesize", "bench", "cache-teacher") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except VitdistillError as e:
        print(f"vitdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = {"train": "`vitdistill train CONFIG --resume` continues the run",
               "synthesize": "the same command again continues with the next batch"}.get(args.command, "")
        print(f"vitdistill {args.command}: interrupted; {how}".rstrip("; "), file=sys.stderr)
        return 130


