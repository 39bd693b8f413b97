"""``vitdistill analyze``: layer spectra and intensity of one or more models, written as CSV, PNG and markdown.

The first model is the reference (the teacher): every other model's intensity-vs-depth curve is
compared with it (``curve_closeness``), which is the distillation-dynamics view of docs/methods.md
§2.4, and with ``pairs`` the first model's curve proposes SpectralKD layer pairs for the
second (``select_layer_pairs``). :func:`analyze_models` is the Python API; :func:`load_models`
turns command-line model specs into models and test-split loaders.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import nn

from ..data.subsets import balanced_loader
from ..errors import VitdistillError
from ..io import atomic_write_text
from ..models import num_tappable_layers
from .model_analysis import analyze_layers, attention_distances, block_paths
from .plots import plot_attention_distance, plot_intensity, plot_spectra
from .spectrum import curve_closeness, select_layer_pairs

__all__ = ["AnalysisError", "NAME_PREFIX", "analyze_models", "load_models", "resolve_model_file"]

#: a model spec ``name:PRESET`` builds the model with random weights
NAME_PREFIX = "name:"
TOP_LAYERS = 3


class AnalysisError(VitdistillError, ValueError):
    """A user-facing problem with the analysis request (labels, layers, pairs, model specs)."""


# ----------------------------------------------------------------------------- files


def safe_label(label: str) -> str:
    """``label`` with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_`` (for file names)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(label)).strip(".") or "model"


def write_layers_csv(path: Path, stats: Mapping[int, Mapping[str, Any]]) -> Path:
    """One row per layer: layer, module, depth, intensity, n_images, channels, then ``s_0 .. s_{C-1}`` (the channel
    spectrum; cells past a layer's own channel count stay empty when layers differ in width)."""
    width = max(int(s["spectrum"].numel()) for s in stats.values())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "module", "depth", "intensity", "n_images", "channels"] + [f"s_{k}" for k in range(width)])
    for layer, s in stats.items():
        spec = [f"{v:.8g}" for v in s["spectrum"].tolist()]
        w.writerow([layer, s.get("module", ""), f"{s['depth']:.6g}", f"{s['intensity']:.8g}", s["n_images"], len(spec)]
                   + spec + [""] * (width - len(spec)))
    return atomic_write_text(path, buf.getvalue())


def pairs_snippet(pairs: Sequence[tuple[int, int]]) -> str:
    """The config snippet ``method: {params: {student_layers: [...], teacher_layers: [...]}}`` as YAML."""
    params = {"student_layers": [int(s) for s, _ in pairs], "teacher_layers": [int(t) for _, t in pairs]}
    return yaml.safe_dump({"method": {"params": params}}, sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------- analysis


def _spectra_layers(label: str, n_layers: int, wanted: Sequence[int] | None) -> list[int]:
    if wanted is None:
        wanted = [0, n_layers // 2, n_layers - 1]
    out: list[int] = []
    for i in wanted:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise AnalysisError(f"spectra layer {i!r} is out of range for '{label}': valid indices are "
                                f"0..{n_layers - 1} (or -{n_layers}..-1 from the end)")
        if i % n_layers not in out:
            out.append(i % n_layers)
    return out


def _loader_for(loader: Iterable | Mapping[str, Iterable], label: str) -> Iterable:
    if isinstance(loader, Mapping):
        if label not in loader:
            raise AnalysisError(f"no loader for model '{label}'; loaders given for {sorted(loader)}")
        return loader[label]
    return loader


def _top_layers(stats: Mapping[int, Mapping[str, Any]], k: int = TOP_LAYERS) -> list[dict[str, float]]:
    ranked = sorted(stats, key=lambda layer: (-stats[layer]["intensity"], layer))[:k]
    return [{"layer": layer, "depth": stats[layer]["depth"], "intensity": stats[layer]["intensity"]} for layer in ranked]


def analyze_models(
    models: Mapping[str, nn.Module],
    loader: Iterable | Mapping[str, Iterable],
    out_dir: str | os.PathLike,
    max_images: int = 1000,
    spectra_layers: Sequence[int] | None = None,
    attention: bool = False,
    pairs: bool = False,
    pair_first: int | float = 2,
    pair_last: int | float = 2,
    description: str = "",
    progress: bool = True,
    verbose: bool = True,
    per_block: bool = False,
) -> dict[str, Any]:
    """Analyse every model's layers on the same images and write the report into ``out_dir``.

    ``models``: label -> model, the first being the reference (teacher). ``loader``: one loader for all
    models, or label -> loader (models that need other input sizes). Writes ``<label>_layers.csv``,
    ``<label>_spectra.png`` (``spectra_layers``; default first, middle and last layer),
    ``intensity.png`` (all models against normalised depth), ``summary.md``, with ``attention``
    ``attention_distance.png`` (ViT-style models; others are noted and skipped) and with ``pairs``
    ``pairs.yaml`` (layer pairs from the first model's intensity for the second model). Returns
    ``{"reference", "models": {label: {...}}, "closeness": {label: {...}}, "pairs", "pairs_snippet",
    "files", "notes"}``; ``verbose`` prints the pairs snippet and the notes.
    """
    if not isinstance(models, Mapping) or not models:
        raise AnalysisError("give at least one model to analyse")
    files = {label: safe_label(label) for label in models}
    clash = [f for f in set(files.values()) if list(files.values()).count(f) > 1]
    if clash:
        raise AnalysisError(f"labels {[lb for lb in models if files[lb] in clash]} give the same file name "
                            f"{clash[0]!r}; pass distinct labels")
    if pairs and per_block:
        raise AnalysisError("pairs are proposed as layer indices (what spectralkd's student_layers/teacher_layers "
                            "take); analyse without per-block to get them")
    if pairs and len(models) < 2:
        raise AnalysisError("pairs need two models: the teacher first, then the student")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(models)
    reference = labels[0]
    written: list[Path] = []
    notes: list[str] = []
    per_model: dict[str, dict[str, Any]] = {}

    for label, model in models.items():
        data = _loader_for(loader, label)
        try:
            n_layers = len(block_paths(model)) if per_block else num_tappable_layers(model)
        except ValueError as e:
            raise AnalysisError(f"model '{label}': {e}") from None
        if n_layers == 0:
            raise AnalysisError(f"model '{label}' ({type(model).__name__}) has no indexable layers to analyse")
        chosen = _spectra_layers(label, n_layers, spectra_layers)
        stats = analyze_layers(model, data, max_images=max_images, progress=progress, per_block=per_block)
        written.append(write_layers_csv(out / f"{files[label]}_layers.csv", stats))
        spectra = {f"layer {i} (depth {stats[i]['depth']:.2f})": stats[i]["spectrum"] for i in chosen}
        written.append(plot_spectra(spectra, out / f"{files[label]}_spectra.png", title=f"Channel spectra: {label}"))
        entry: dict[str, Any] = {
            "class": type(model).__name__,
            "n_layers": n_layers,
            "n_images": stats[0]["n_images"],
            "layers": stats,
            "depth": [stats[i]["depth"] for i in range(n_layers)],
            "intensity": [stats[i]["intensity"] for i in range(n_layers)],
            "top_layers": _top_layers(stats),
            "attention_distance": None,
        }
        if attention:
            try:
                entry["attention_distance"] = attention_distances(model, data, max_images=max_images, progress=progress)
            except ValueError as e:
                notes.append(f"attention distance skipped for '{label}': {e}")
        per_model[label] = entry

    written.append(plot_intensity({lb: m["intensity"] for lb, m in per_model.items()}, out / "intensity.png",
                                  normalize_depth=True, title="Layer intensity vs normalised depth"))
    if attention:
        dists = {lb: m["attention_distance"] for lb, m in per_model.items() if m["attention_distance"] is not None}
        if dists:
            written.append(plot_attention_distance(dists, out / "attention_distance.png", normalize_depth=len(dists) > 1))
        else:
            notes.append("no model has ViT-style attention blocks: attention_distance.png not written")

    closeness: dict[str, dict[str, float] | None] = {}
    ref_curve = per_model[reference]["intensity"]
    for label in labels[1:]:
        curve = per_model[label]["intensity"]
        if len(curve) < 2 or len(ref_curve) < 2:
            closeness[label] = None
            notes.append(f"closeness of '{label}' to '{reference}' needs two curves of at least 2 layers")
        else:
            closeness[label] = curve_closeness(ref_curve, curve)

    chosen_pairs, snippet = None, None
    if pairs:
        student = labels[1]
        try:
            chosen_pairs = select_layer_pairs(ref_curve, per_model[student]["n_layers"], pair_first, pair_last)
        except ValueError as e:
            raise AnalysisError(f"cannot propose layer pairs for '{student}' from '{reference}' with "
                                f"first={pair_first}, last={pair_last}: {e}") from None
        snippet = pairs_snippet(chosen_pairs)
        header = f"# SpectralKD layer pairs: teacher '{reference}' -> student '{student}' (from the teacher's intensity)\n"
        written.append(atomic_write_text(out / "pairs.yaml", header + snippet))
        if verbose:
            print(header + snippet, end="")

    result = {"reference": reference, "models": per_model, "closeness": closeness, "pairs": chosen_pairs,
              "pairs_snippet": snippet, "notes": notes}
    summary = out / "summary.md"
    written.append(summary)
    result["files"] = [str(p) for p in written]
    atomic_write_text(summary, _summary_markdown(result, description, pair_first, pair_last))
    if verbose:
        for note in notes:
            print(f"note: {note}")
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def _summary_markdown(result: dict[str, Any], description: str, pair_first: Any, pair_last: Any) -> str:
    ref = result["reference"]
    lines = ["# SpectralKD layer analysis", ""]
    if description:
        lines += [description, ""]
    lines += [f"Reference (teacher): **{ref}**. Layer intensity = mean over k of the channel spectrum S[k] "
              "(docs/methods.md §2.1); depth is normalised to [0, 1].", ""]
    for label, m in result["models"].items():
        lines += [f"## {label}", "", f"{m['class']}, {m['n_layers']} layers, {m['n_images']} images.", ""]
        top = ", ".join(f"layer {t['layer']} (depth {t['depth']:.2f}, intensity {t['intensity']:.4g})"
                        for t in m["top_layers"])
        lines += [f"Most intense layers: {top}.", ""]
        if label != ref:
            c = result["closeness"].get(label)
            if c is not None:
                lines += [f"Intensity curve vs '{ref}': pearson {_fmt(c['pearson'])}, mean absolute difference "
                          f"{_fmt(c['mad'])} ({c['n_points']} points, min-max normalised); mean |log ratio| "
                          f"{_fmt(c['log_ratio'])} (raw intensities).", ""]
        if m["attention_distance"] is not None:
            per_layer = ", ".join(f"{v:.2f}" for v in np.asarray(m["attention_distance"]).mean(axis=1))
            lines += [f"Mean attention distance per layer (patches, mean over heads): {per_layer}.", ""]
        lines += ["| layer | module | depth | intensity |", "|---:|---|---:|---:|"]
        lines += [f"| {i} | {s.get('module', '')} | {s['depth']:.3f} | {s['intensity']:.6g} |"
                  for i, s in m["layers"].items()]
        lines.append("")
    if len(result["models"]) > 1:
        lines += [f"## Closeness of the intensity curves to '{ref}'", "", "| model | pearson | MAD | log ratio |",
                  "|---|---:|---:|---:|"]
        for label, c in result["closeness"].items():
            lines.append(f"| {label} | {_fmt(c and c['pearson'])} | {_fmt(c and c['mad'])} | "
                         f"{_fmt(c and c['log_ratio'])} |")
        lines += ["", "Higher pearson and lower MAD = closer in shape (min-max normalised curves); lower log ratio "
                  "(mean |ln a - ln b| of the raw intensities) = closer in scale.", ""]
    if result["pairs_snippet"]:
        student = list(result["models"])[1]
        lines += ["## Proposed layer pairs", "",
                  f"From '{ref}''s intensity for '{student}' (first={pair_first}, last={pair_last}; "
                  "`select_layer_pairs`):", "", "```yaml", result["pairs_snippet"].rstrip(), "```", ""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    lines += ["## Files", ""] + [f"- {Path(f).name}" for f in result["files"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command-line model specs


def resolve_model_file(spec: str) -> Path:
    """A checkpoint path from a spec: a .pt/.safetensors file, or a run folder (its last.pt)."""
    path = Path(spec)
    if path.is_dir():
        path = path / "last.pt"
        if not path.is_file():
            raise AnalysisError(f"run folder '{spec}' holds no last.pt")
        return path
    if not path.is_file():
        raise AnalysisError(f"model '{spec}' is neither a file, a run folder, nor {NAME_PREFIX}MODEL_NAME "
                            "(e.g. name:vitd_tiny_patch4_28 for random weights)")
    if path.suffix not in (".pt", ".safetensors"):
        raise AnalysisError(f"model file '{spec}' must be a training checkpoint (.pt) or an exported .safetensors")
    return path


def default_label(spec: str) -> str:
    """A readable label for a model spec: the preset name, the run folder name, or the file stem."""
    if spec.startswith(NAME_PREFIX):
        return spec[len(NAME_PREFIX):]
    path = Path(spec)
    if path.is_dir() or path.name == "last.pt":
        return (path if path.is_dir() else path.parent).resolve().name
    if path.stem in ("last", "best"):  # a run folder's exported weights
        return f"{path.parent.resolve().name}_{path.stem}"
    return path.stem


def _unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        name, k = label, 2
        while name in out:
            name, k = f"{label}_{k}", k + 1
        out.append(name)
    return out


def load_models(
    specs: Sequence[str],
    labels: Sequence[str] | None = None,
    data: str | None = None,
    data_root: str | None = None,
    images: int = 1000,
    batch_size: int = 250,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[dict[str, nn.Module], dict[str, Iterable], dict[str, str]]:
    """Models and class-balanced test-split loaders from command-line specs.

    A spec is a training checkpoint (.pt), a run folder (its last.pt), an exported .safetensors (all
    rebuilt by ``engine.load_trained_model``) or ``name:MODEL`` (random weights; data
    size from the data config defaults). Each model is analysed on the test split of the data it was
    trained on (``data``/``data_root`` override); models with the same data share one loader. Returns
    ``(models, loaders, datasets)`` keyed by label (``datasets``: the data name per label).
    """
    from ..config import DataConfig
    from ..data import build_data, test_split_config
    from ..engine import load_trained_model
    from ..models import create_model

    for name, value in (("--images", images), ("--batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AnalysisError(f"{name}={value!r} must be a positive integer")
    if labels and len(labels) != len(specs):
        raise AnalysisError(f"--labels gives {len(labels)} labels for {len(specs)} models; give one per model")
    names = list(labels) if labels else _unique([default_label(s) for s in specs])
    if len(set(names)) != len(names):
        raise AnalysisError(f"labels must be distinct, got {names}")
    bundles: dict[str, Any] = {}
    loaders: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    model_loaders: dict[str, Iterable] = {}
    datasets: dict[str, str] = {}
    for label, spec in zip(names, specs):
        model = None
        if spec.startswith(NAME_PREFIX):
            values = dataclasses.asdict(DataConfig())
        else:
            model, values, _, _ = load_trained_model(resolve_model_file(spec), device)
        cfg = test_split_config(values, data, data_root)
        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
        if key not in bundles:
            bundles[key] = (cfg, build_data(cfg, seed=seed))
            loaders[key] = balanced_loader(bundles[key][1].val, images, seed, batch_size)
        cfg, bundle = bundles[key]
        if model is None:
            model = create_model(spec[len(NAME_PREFIX):], num_classes=bundle.num_classes, in_chans=cfg.in_chans,
                                 img_size=cfg.img_size)
        models[label] = model.to(device).eval()
        model_loaders[label] = loaders[key]
        datasets[label] = cfg.name
    return models, model_loaders, datasets
