"""Experiment configuration: YAML (safe_load) into dataclasses, dotted overrides, validation.

One YAML file describes one experiment. Unknown keys are errors that suggest the closest valid
key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write_text
from .schema import ConfigError, check, parse_section

#: the source checkout (for an editable install): configs/ and weights/ paths also resolve against it
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path:
    """A path as given if it exists (or is absolute), else relative to the repository checkout, so that
    ``configs/...`` and ``weights/...`` in shipped configs work from any working directory."""
    p = Path(path)
    if p.exists() or p.is_absolute() or not (REPO_ROOT / p).exists():
        return p
    return REPO_ROOT / p


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    deterministic: bool = True


@dataclass
class AugmentConfig:
    crop_padding: int = 0  # random crop after zero padding by this many pixels; 0 disables
    hflip: float = 0.0  # probability of a horizontal flip
    randaugment: str | None = None  # timm RandAugment spec, e.g. "rand-m9-mstd0.5"
    random_erasing: float = 0.0  # probability (timm RandomErasing)
    mixup: float = 0.0  # mixup alpha (timm Mixup); 0 disables
    cutmix: float = 0.0  # cutmix alpha (timm Mixup); 0 disables


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # fashion-mnist | cifar10 | cifar100 | digits | imagefolder | random
    root: str | None = None  # dataset folder; None searches the default places
    fraction: float = 1.0  # class-balanced, seeded subset of the training set
    subset_seed: int | None = None  # None: use run.seed
    img_size: int = 28
    in_chans: int = 1  # 1 or 3; grayscale data is repeated to 3 channels when needed
    mean: list[float] | None = None  # None: the dataset's own statistics
    std: list[float] | None = None
    batch_size: int = 128  # per process
    eval_batch_size: int = 512
    num_workers: int = 0
    download: bool = True  # allow torchvision to download when no local copy is found
    synthetic: str | None = None  # images.safetensors from `vitdistill synthesize`: replaces the train split
    # every training view a pure function of (run.seed, epoch, sample), mixup/cutmix per sample with a seeded
    # partner (data/replay.py); implied by teacher.cache
    replay: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class MHCAConfig:
    """Multi-head convolutional attention (DearKD) in chosen blocks of a timm ViT student."""

    blocks: list[int] = field(default_factory=list)  # block indices; empty: plain attention everywhere
    locality_strength: float = 1.0  # alpha of the local initialisation
    pos_drop: float = 0.0  # dropout on the positional logits


@dataclass
class ModelConfig:
    name: str = "vitd_tiny_patch4_28"  # any timm model name, including vitdistill's presets
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model overrides
    pretrained: bool = False
    checkpoint: str | None = None  # local .safetensors / .pt / .pth weights
    # fine-tuning: a trained student (run folder, last.pt, .safetensors); every weight but a head of another
    # class count, the position embedding resampled to a new grid (models/finetune.py)
    init: str | None = None
    mhca: MHCAConfig = field(default_factory=MHCAConfig)


@dataclass
class TeacherConfig:
    name: str | None = None  # None: no teacher
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    cache: str | None = None  # a folder written by `vitdistill cache-teacher`: logits come from it, not the teacher


@dataclass
class MethodConfig:
    name: str = "none"  # a registered distillation method
    params: dict[str, Any] = field(default_factory=dict)  # validated by the method itself


@dataclass
class TrainConfig:
    epochs: int = 10
    optimizer: str = "adamw"  # any timm optimizer name
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.0
    clip_grad: float | None = 1.0
    ema: bool = False
    ema_decay: float = 0.999
    amp: bool = False
    amp_dtype: str = "bfloat16"  # bfloat16 (CPU or CUDA) | float16 (CUDA only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = False
    compile: bool = False
    log_interval: int = 50  # optimisation steps between plain-text progress lines
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    tensorboard: bool = False
    max_steps_per_epoch: int | None = None  # cap for smoke runs; None = whole epoch
    keep_epochs: list[int] = field(default_factory=list)  # also keep the checkpoint after these epochs (branch points)


@dataclass
class SynthesisConfig:
    """Images synthesised from the teacher (``vitdistill synthesize``): DeepInversion plus DF-DearKD's
    boundary-preserving intra-divergence. Each batch holds ``batch_size / per_class`` classes with
    ``per_class`` images each and is optimised for ``iterations`` steps of Adam (betas 0.5, 0.9)."""

    images_per_class: int = 200
    per_class: int = 8  # images of one class in a batch (K >= 2: the intra-divergence terms compare them)
    batch_size: int = 80  # a multiple of per_class
    iterations: int = 200
    lr: float = 0.1
    warmup_iterations: int = 20
    bn_weight: float = 0.01  # a_f: BatchNorm statistics matching
    first_bn_multiplier: float = 10.0
    tv_weight: float = 1e-4  # a_tv: total variation (L2)
    l2_weight: float = 1e-5  # a_l2: image norm
    jitter: int = 2  # random roll of up to this many pixels each step
    flip: bool = True  # random horizontal flip each step
    diversity_weight: float = 0.0  # intra-divergence: push same-class images apart in feature space
    boundary: str = "feature"  # feature | logit | none: what keeps the spread inside the class
    boundary_weight: float = 0.0
    boundary_margin: float = 0.2  # squared feature distance (feature) or logits (logit)


@dataclass
class DataFreeConfig:
    """Online data-free training (docs/methods.md §1.7): no real training image; the run synthesises a batch
    from the teacher every round, against the current student, into an image bank, and the student takes
    ``steps_per_round`` steps on minibatches drawn from the bank. The inversion losses and the batch layout
    come from the ``synthesis`` section."""

    online: bool = False
    synthesizer: str = "generator"  # generator (weights carry over between rounds) | pixel (DeepInversion)
    rounds_per_epoch: int = 20
    steps_per_round: int = 10  # student steps per round, each on a minibatch drawn from the bank
    synthesis_steps: int = 5  # optimisation steps per round (of the generator, or of the pixels)
    first_round_steps: int = 300  # of the first round: a generator starts from random weights (warm-up)
    images_per_round: int | None = None  # generator: images added per round (a multiple of synthesis.batch_size,
    # the optimised batch plus fresh draws of the updated generator); pixel: synthesis.batch_size. null: batch_size
    warm_start: bool = True  # pixel: start a round from the previous round's images
    generator_lr: float = 1e-2
    latent_dim: int = 64
    generator_width: int = 32
    adversarial_weight: float = 1.0  # seek images where student and teacher disagree (JS divergence)
    adversarial_temperature: float = 1.0
    adversarial_agree_only: bool = True  # count only images on which the two still agree (keeps them in-class)
    bank_size: int | None = None  # the student samples from the newest this many images; null: all of them
    targets: str = "teacher"  # stage 1 targets: teacher (soft, on the exact view) | labels (synthesis labels)
    stage2_targets: str = "labels"  # the same for stage 2 (dearkd); labels: the teacher is not run there
    target_temperature: float = 1.0
    samples_every: int = 20  # rounds between samples.png grids of the newest batch


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    datafree: DataFreeConfig = field(default_factory=DataFreeConfig)


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = parse_section(Config, values or {}, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides such as ``train.epochs=5`` or ``method.params.alpha=0.5`` to a raw dict."""
    for text in overrides:
        path, value = _parse_override(text)
        node = values
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML experiment file (or the defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return config_from_dict(apply_overrides(values, overrides or []))


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def validate_data(d: DataConfig) -> None:
    """The checks of a data section alone (also run by ``data.build_data`` on a section built in Python)."""
    check(0.0 < d.fraction <= 1.0, f"data.fraction={d.fraction} must be in (0, 1]")
    check(d.in_chans in (1, 3), f"data.in_chans={d.in_chans} must be 1 or 3")
    check(d.img_size >= 8, f"data.img_size={d.img_size} must be at least 8")
    check(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be at least 1")
    check(d.eval_batch_size >= 1, f"data.eval_batch_size={d.eval_batch_size} must be at least 1")
    check(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
    for name in ("mean", "std"):
        v = getattr(d, name)
        check(v is None or len(v) == d.in_chans, f"data.{name}={v} must have data.in_chans={d.in_chans} values")
    a = d.augment
    for name in ("hflip", "random_erasing"):
        p = getattr(a, name)
        check(0.0 <= p <= 1.0, f"data.augment.{name}={p} must be a probability in [0, 1]")
    check(a.mixup >= 0 and a.cutmix >= 0, "data.augment.mixup and cutmix must be >= 0")
    check(not (a.mixup or a.cutmix) or d.batch_size % 2 == 0,
           f"data.batch_size={d.batch_size} must be even when mixup/cutmix is on (timm Mixup pairs images)")


def validate(cfg: Config) -> None:
    t = cfg.train
    validate_data(cfg.data)
    check(not (cfg.model.init and cfg.model.checkpoint),
          f"model.init='{cfg.model.init}' and model.checkpoint='{cfg.model.checkpoint}': give one (init drops a head "
          "of another class count and resamples the position embedding; checkpoint loads exactly)")
    m = cfg.model.mhca
    check(0.0 <= m.pos_drop < 1.0, f"model.mhca.pos_drop={m.pos_drop} must be in [0, 1)")
    check(m.locality_strength >= 0, f"model.mhca.locality_strength={m.locality_strength} must be >= 0")
    check(t.epochs >= 1, f"train.epochs={t.epochs} must be at least 1")
    check(t.lr > 0, f"train.lr={t.lr} must be positive")
    check(t.warmup_epochs >= 0, f"train.warmup_epochs={t.warmup_epochs} must be >= 0 (longer than the run: half the run)")
    check(0.0 <= t.label_smoothing < 1.0, f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
    check(t.clip_grad is None or t.clip_grad > 0, f"train.clip_grad={t.clip_grad} must be positive or null")
    check(0.0 < t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in (0, 1)")
    check(t.amp_dtype in ("bfloat16", "float16"), f"train.amp_dtype='{t.amp_dtype}' must be bfloat16 or float16")
    check(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0: never evaluate, read no test image)")
    check(t.log_interval >= 1, f"train.log_interval={t.log_interval} must be at least 1")
    dev = t.device
    check(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), f"train.device='{dev}' must be auto, cpu, cuda or cuda:N")
    check(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1, "train.max_steps_per_epoch must be >= 1 or null")
    check(all(isinstance(e, int) and not isinstance(e, bool) and 1 <= e <= t.epochs for e in t.keep_epochs),
          f"train.keep_epochs={t.keep_epochs} must list epoch counts in [1, train.epochs={t.epochs}]")
    y = cfg.synthesis
    for name in ("images_per_class", "per_class", "batch_size", "iterations"):
        check(getattr(y, name) >= 1, f"synthesis.{name}={getattr(y, name)} must be at least 1")
    check(y.batch_size % y.per_class == 0,
           f"synthesis.batch_size={y.batch_size} must be a multiple of synthesis.per_class={y.per_class}")
    check(y.images_per_class % y.per_class == 0,
           f"synthesis.images_per_class={y.images_per_class} must be a multiple of synthesis.per_class={y.per_class}")
    check(y.lr > 0, f"synthesis.lr={y.lr} must be positive")
    check(0 <= y.warmup_iterations < y.iterations,
           f"synthesis.warmup_iterations={y.warmup_iterations} must be in [0, synthesis.iterations={y.iterations})")
    check(y.jitter >= 0, f"synthesis.jitter={y.jitter} must be >= 0")
    check(y.boundary in ("feature", "logit", "none"), f"synthesis.boundary='{y.boundary}' must be feature, logit or none")
    for name in ("bn_weight", "first_bn_multiplier", "tv_weight", "l2_weight", "diversity_weight", "boundary_weight"):
        check(getattr(y, name) >= 0, f"synthesis.{name}={getattr(y, name)} must be >= 0")
    feature_boundary = y.boundary == "feature" and y.boundary_weight > 0
    validate_datafree(cfg)
    check(not (cfg.data.replay and cfg.datafree.online),
          "data.replay=true replays views of a real training split; datafree.online makes its own images (turn one off)")
    check(not cfg.teacher.cache or (cfg.teacher.name and not cfg.datafree.online),
          f"teacher.cache='{cfg.teacher.cache}' needs teacher.name and a real training split (not datafree.online)")
    check(y.per_class >= 2 or (y.diversity_weight == 0 and not feature_boundary),
           f"synthesis.per_class={y.per_class}: intra-divergence and the feature boundary need at least 2 images "
           "of a class per batch")
    check(not feature_boundary or y.batch_size // y.per_class >= 2,
           f"synthesis.batch_size={y.batch_size} holds one class: the feature boundary needs at least 2 classes per batch")


def validate_datafree(cfg: Config) -> None:
    f = cfg.datafree
    if not f.online:
        return
    check(f.synthesizer in ("generator", "pixel"), f"datafree.synthesizer='{f.synthesizer}' must be generator or pixel")
    for name in ("rounds_per_epoch", "steps_per_round", "synthesis_steps", "first_round_steps", "latent_dim",
                 "generator_width",
                 "samples_every"):
        check(getattr(f, name) >= 1, f"datafree.{name}={getattr(f, name)} must be at least 1")
    check(cfg.synthesis.per_class >= 2, f"synthesis.per_class={cfg.synthesis.per_class} must be at least 2 online "
          "(the per-round class diversity compares images of a class)")
    n, b = f.images_per_round, cfg.synthesis.batch_size
    check(n is None or (n >= b and n % b == 0),
          f"datafree.images_per_round={n} must be a multiple of synthesis.batch_size={b} (or null)")
    check(n in (None, b) or f.synthesizer == "generator",
          f"datafree.images_per_round={n}: the pixel synthesiser adds its optimised batch (synthesis.batch_size={b}) "
          "per round; set it to null")
    check(f.generator_lr > 0, f"datafree.generator_lr={f.generator_lr} must be positive")
    check(f.adversarial_weight >= 0, f"datafree.adversarial_weight={f.adversarial_weight} must be >= 0")
    for name in ("adversarial_temperature", "target_temperature"):
        check(getattr(f, name) > 0, f"datafree.{name}={getattr(f, name)} must be > 0")
    for name in ("targets", "stage2_targets"):
        check(getattr(f, name) in ("teacher", "labels"), f"datafree.{name}='{getattr(f, name)}' must be teacher or labels")
    check(f.bank_size is None or f.bank_size >= cfg.data.batch_size,
          f"datafree.bank_size={f.bank_size} must be null or at least data.batch_size={cfg.data.batch_size}")
    check(not cfg.data.synthetic, f"data.synthetic='{cfg.data.synthetic}' and datafree.online=true: an online run "
          "makes its own training images; drop one of the two")
    check(cfg.data.fraction == 1.0, f"data.fraction={cfg.data.fraction}: an online data-free run reads no training "
          "split to take a fraction of")
    check(bool(cfg.teacher.name and (cfg.teacher.checkpoint or cfg.teacher.pretrained)),
          "datafree.online=true needs a trained teacher: teacher.name and teacher.checkpoint")
