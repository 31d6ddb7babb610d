"""Factor studies: the paper's analyses of what drives memorization, on your own data.

Dar et al. train generators under controlled changes of one factor at a time and count
memorized training images (N_mem) and synthetic copies (N_copies) with one fixed detector:

* prevalence (2.2) and model type: LDM vs the autoencoder (VAE) and GAN baselines
  (medmem's addition: the paper trains LDMs only; its model comparison is MedDiff vs
  MONAI, a VQ vs a KL first stage, in 3D);
* augmentation on/off (2.4.3, Fig. 3);
* model size (medmem's addition: no section of the paper varies it);
* training iterations, with FID and MS-SSIM alongside (2.4.2, Fig. 8);
* training-set size (2.4.1, Fig. 7), at comparable training: ``size_budget: epochs`` (the
  default, as the paper's fixed 3k epochs) scales every stage's iterations by
  n_train / n_ref (n_ref: the baseline's training-set size), so that each image is seen as
  often whatever the set's size; ``size_budget: iterations`` holds the iterations fixed
  (studies written before the option; larger sets are then trained for fewer epochs).

A study is a YAML file: a base generative config (``medmem.generative``), named model
variants (overrides of the base), a baseline cell and the factor values to vary. Each cell
trains its generator, samples ``N_syn = N_train`` images (as the paper), audits them with
one shared detector trained on the largest training set, and measures quality (FID to the
validation images) in two feature spaces, named in every column and figure:
``fid_detector`` (that detector's: trained on the audited images, so not independent of
the memorization it measures) and ``fid_independent`` (``independent_features``: a second
detector trained on other patients, in no cell's training set nor validation; or on the
validation patients; or a fixed random-init encoder; nothing is downloaded). Cells that
differ only in ``iterations`` share one training run, trained further for each value.
Everything is written as it finishes; a study that is stopped and run again skips finished
cells (a cell is redone only if its settings change).

Two options make the counts comparable with chance (issue 17):

* ``control: true``: every cell gets a negative-control cell, the same generator
  configuration trained on as many images of *other* patients (in neither its training set
  nor validation; ``data.split: control``), sampled and audited against the cell's real
  training set. Its N_copies / N_mem are the chance level of generator outputs; each
  cell's row carries them (``control_n_copies``, ``control_n_mem``) and the excess over
  them with a Newcombe interval.
* ``seeds: [0, 1, 2]`` (every cell) or ``seeds: {values: [0, 1, 2], factors: [baseline,
  augment]}`` (the baseline and the cells varying those factors): the cells are run once
  per generator seed; ``results-seeds.csv`` / ``.md`` / ``.json`` give, per configuration,
  the mean over seeds, a 95% Student-t interval across seeds and the per-seed values,
  and the seeds' images pooled against their controls' (a Newcombe interval).

``results-comparisons.*`` set each factor's values against each other (the baseline among
them): the cells of a value pooled over their seeds, the difference of the shares with a
Newcombe interval, over all seeds and over the seeds both values have.

Example:
    >>> from medmem.study import load_study, run_study
    >>> study = load_study("configs/study/nih-cxr-cpu.yaml")  # doctest: +SKIP
    >>> table = run_study(study, "runs/study").table  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import medmem
from medmem._audit import AuditResult, audit
from medmem._checkpoint import read_checkpoint
from medmem._errors import InputError
from medmem._io import (
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_yaml_mapping,
    resolve_paths,
    save_tensors,
)
from medmem._plots import draw_histogram, save_figure, subplots
from medmem._section import ConfigSection, deep_merge
from medmem._validation import (
    check_choice,
    check_keys,
    check_percentile,
    check_positive_int,
)
from medmem.data import ArrayDataset
from medmem.detector import Detector
from medmem.generative import (
    PATH_KEYS,
    GenerativeConfig,
    GenerativeModel,
    build_datasets,
    load_config,
    train,
)
from medmem.metrics import extract_features, fid, quality

logger = logging.getLogger(__name__)

FACTORS = ("model", "n_train", "iterations", "augment", "seed")
DESIGNS = ("one_at_a_time", "factorial")
# study table columns renamed to the audit's names (summary.json patients.*)
OLD_COLUMN_NAMES = {
    "patients_memorized": "n_patients_mem",
    "pct_patients_memorized": "pct_patients_mem",
    # FID named by its feature space (issue 17): the old columns were the detector's
    "fid": "fid_detector",
    "fid_train_val": "fid_train_val_detector",
}
SIZE_BUDGETS = ("epochs", "iterations")
# the second feature space of FID: a detector trained on patients in no cell's training set
# nor validation, one trained on the validation patients, a fixed random-init encoder, none
INDEPENDENT_FEATURES = ("other_patients", "validation", "random", "none")
COLUMNS = (
    "cell",
    "model",
    "model_type",
    "n_train",
    "iterations",
    "epochs",
    "size_budget",
    "augment",
    "seed",
    "n_synthetic",
    "n_val",
    "tau",
    "n_mem",
    "pct_mem",
    "n_copies",
    "pct_copies",
    "expected_copies",
    "excess_copies",
    "n_patients_mem",
    "pct_patients_mem",
    "fid_detector",
    "fid_train_val_detector",
    "fid_independent",
    "fid_train_val_independent",
    "independent_features",
    "ms_ssim",
    "ms_ssim_real",
    "precision",
    "recall",
    "train_seconds",
    "sample_seconds",
    "audit_seconds",
    # the negative control (``control: true``); role: "main" or "control"
    "role",
    "control_n_mem",
    "control_n_copies",
    "excess_mem_control",
    "excess_mem_control_ci_low",
    "excess_mem_control_ci_high",
    "excess_copies_control",
    "excess_copies_control_ci_low",
    "excess_copies_control_ci_high",
)
# per-seed aggregation (results-seeds.*): the configuration's columns and the metrics
SEED_GROUP = ("role", "model", "model_type", "n_train", "iterations", "augment")
SEED_METRICS = (
    "n_mem",
    "pct_mem",
    "n_copies",
    "pct_copies",
    "expected_copies",
    "excess_copies",
    "control_n_copies",
    "excess_copies_control",
    "control_n_mem",
    "excess_mem_control",
    "fid_detector",
    "fid_independent",
    "ms_ssim",
)
ROW_FILE = "row.json"
_SYNTHETIC_FILE = "synthetic.safetensors"
# what the quality columns measure; a change recomputes finished cells' audits
_METRICS_VERSION = "fid-vs-validation-2"  # 2: fid_independent beside fid_detector


# ------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class StudyConfig(ConfigSection):
    """A factor study (see the module docstring).

    Args:
        name: shown in the tables and figures.
        generative: the base generative config as a dict (``GenerativeConfig.from_dict``);
            its ``data`` section is the one dataset of the study.
        models: model variants, name -> overrides of ``generative`` (e.g. a smaller UNet,
            ``model: gan``); the name is the ``model`` factor's value.
        baseline: the cell every factor varies around: ``model``, ``n_train``,
            ``iterations`` (of the model's last stage; None: as in its config),
            ``augment`` (the paper's flip + rotation), ``seed``.
        vary: factor -> values; ``one_at_a_time`` varies each factor alone around the
            baseline (the paper's design), ``factorial`` crosses them all.
        design: "one_at_a_time" or "factorial".
        n_synthetic: synthetic images per cell; None samples N_syn = N_train (the paper).
        sampler, steps: LDM sampler for the synthetic sets (None: the config's).
        detector: overrides of the shared detector's settings (``DetectorConfig``).
        percentile: q of tau.
        quality: compute FID, precision/recall and MS-SSIM per cell.
        seeds: generator seeds to repeat cells with: a list (every cell), or a mapping
            ``{values: [...], factors: [...]}`` naming ``baseline`` and/or the varied
            factors whose cells are repeated; the baseline's seed is always among them.
            None: one seed per cell (``baseline.seed``).
        control: add a negative-control cell per cell (the same configuration trained on
            as many images of other patients, audited against the cell's training set).
        size_budget: how cells of other training-set sizes are trained: "epochs" (default,
            the paper's comparison: every stage's iterations scaled by n_train / n_ref, n_ref
            the baseline's n_train) or "iterations" (held fixed, as studies before it).
        independent_features: the second feature space of FID (``fid_independent``):
            "other_patients" (default: a detector with the study's detector settings trained
            on the images of patients in no cell's training set nor validation),
            "validation" (trained on the validation images, FID's reference set),
            "random" (the detector's encoder with seeded random weights: independent of
            every image, but weak) or "none".
    """

    name: str
    generative: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    vary: dict[str, list[Any]] = field(default_factory=dict)
    design: str = "one_at_a_time"
    n_synthetic: int | None = None
    sampler: str | None = None
    steps: int | None = None
    detector: dict[str, Any] = field(default_factory=dict)
    percentile: float = 95.0
    quality: bool = True
    seeds: list[int] | dict[str, Any] | None = None
    control: bool = False
    size_budget: str = "epochs"
    independent_features: str = "other_patients"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError("study name must be a non-empty string.")
        models = dict(self.models) or {"ldm": {}}
        object.__setattr__(self, "models", models)
        base = {"model": next(iter(models)), "n_train": None, "iterations": None}
        base |= {"augment": False, "seed": 0}
        check_keys(self.baseline, FACTORS, "study.baseline")
        object.__setattr__(self, "baseline", base | dict(self.baseline))
        check_keys(self.vary, FACTORS, "study.vary")
        for factor, values in self.vary.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise InputError(f"study.vary.{factor} must be a non-empty list of values.")
        for m in [self.baseline["model"], *self.vary.get("model", [])]:
            if m not in models:
                raise InputError(
                    f"study: model {m!r} is not one of the model variants {sorted(models)}; "
                    "define it under `models:`."
                )
        check_choice(self.design, "study.design", DESIGNS)
        if self.n_synthetic is not None:
            check_positive_int(self.n_synthetic, "study.n_synthetic", minimum=2)
        if self.steps is not None:
            check_positive_int(self.steps, "study.steps")
        check_percentile(self.percentile, "study.percentile")
        object.__setattr__(self, "seeds", self._checked_seeds())
        if not isinstance(self.control, bool):
            raise InputError("study.control must be true or false.")
        check_choice(self.size_budget, "study.size_budget", SIZE_BUDGETS)
        check_choice(self.independent_features, "study.independent_features", INDEPENDENT_FEATURES)
        for name in models:
            self.generative_config(name)  # fail now, not after hours of training

    def _checked_seeds(self) -> dict[str, Any] | None:
        """``seeds`` as ``{"values": [...], "factors": [...] or None (every cell)}``."""
        if self.seeds is None:
            return None
        seeds: Any = self.seeds
        if isinstance(seeds, (list, tuple)):
            seeds = {"values": list(seeds), "factors": None}
        if not isinstance(seeds, dict):
            raise InputError(
                "study.seeds must be a list of seeds or {values: [...], factors: [...]}."
            )
        check_keys(seeds, ("values", "factors"), "study.seeds")
        values = seeds.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise InputError("study.seeds.values must be a non-empty list of seeds.")
        values = [check_positive_int(v, "study.seeds.values", minimum=0) for v in values]
        base = int(self.baseline["seed"])
        values = list(dict.fromkeys([base, *values]))  # the baseline's seed first
        factors = seeds.get("factors")
        if factors is not None:
            if isinstance(factors, str) or not isinstance(factors, (list, tuple)):
                raise InputError("study.seeds.factors must be a list, e.g. [baseline, augment].")
            for f in factors:
                check_choice(f, "study.seeds.factors", ("baseline", *FACTORS))
            factors = list(factors)
        return {"values": values, "factors": factors}

    def generative_config(self, model: str, **factors: Any) -> GenerativeConfig:
        """The generative config of variant ``model`` with the cell's factor values."""
        d = deep_merge(self.generative, self.models[model])
        d.setdefault("data", {})
        d.setdefault("train", {})
        if factors.get("n_train") is not None:
            d["data"]["n_train"] = int(factors["n_train"])
        if factors.get("augment") is not None:
            d["train"]["augment"] = bool(factors["augment"])
        if factors.get("seed") is not None:
            d["train"]["seed"] = int(factors["seed"])
        if factors.get("control"):
            d["data"]["split"] = "control"
        d["tracking"] = {}  # the study audits each cell itself
        try:
            cfg = GenerativeConfig.from_dict(d, f"study.models.{model}")
        except InputError as exc:
            raise InputError(f"study {self.name!r}: {exc}") from exc
        if factors.get("iterations") is not None:
            last = cfg.stages[-1]
            section = cfg.stage_settings(last).replace(iterations=int(factors["iterations"]))
            cfg = cfg.replace(**{last: section})
        scale = factors.get("scale")
        if scale is not None and scale != 1:  # fixed epochs: every stage sees each image as often
            for stage in cfg.stages:
                section = cfg.stage_settings(stage)
                its = max(1, round(section.iterations * float(scale)))
                cfg = cfg.replace(**{stage: section.replace(iterations=its)})
        return cfg

    def budget_scale(self, n_train: int, n_ref: int) -> float:
        """Factor on the iterations of a cell with ``n_train`` training images: n_train /
        n_ref under ``size_budget: epochs`` (n_ref: the baseline's n_train), else 1."""
        return n_train / n_ref if self.size_budget == "epochs" else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (``StudyConfig.from_dict(d)`` gives them back)."""
        return {
            "name": self.name,
            "generative": self.generative,
            "models": self.models,
            "baseline": self.baseline,
            "vary": {k: list(v) for k, v in self.vary.items()},
            "design": self.design,
            "n_synthetic": self.n_synthetic,
            "sampler": self.sampler,
            "steps": self.steps,
            "detector": self.detector,
            "percentile": self.percentile,
            "quality": self.quality,
            "seeds": self.seeds,
            "control": self.control,
            "size_budget": self.size_budget,
            "independent_features": self.independent_features,
        }


def load_study(path: str | Path) -> StudyConfig:
    """Read a study YAML. ``generative`` may be a mapping or the path of a generative
    config YAML (relative to the study file), with ``generative_overrides`` on top.

    Example:
        >>> study = load_study("configs/study/nih-cxr-cpu.yaml")  # doctest: +SKIP
    """
    path = Path(path)
    data = read_yaml_mapping(path, "study config")
    keys = [
        "name", "generative", "generative_overrides", "models", "baseline", "vary", "design",
        "n_synthetic", "sampler", "steps", "detector", "percentile", "quality", "seeds",
        "control", "size_budget", "independent_features",
    ]  # fmt: skip
    check_keys(data, keys, str(path))
    gen = data.pop("generative", None)
    gen_base = path.resolve().parent
    if isinstance(gen, str):
        gen_path = Path(gen) if Path(gen).is_absolute() else gen_base / gen
        load_config(gen_path)  # checks it, with errors naming that file
        gen = read_yaml_mapping(gen_path)
        gen_base = gen_path.resolve().parent
    if not isinstance(gen, dict):
        raise InputError(
            f"{path}: `generative:` must be a generative config mapping or the path of one "
            "(e.g. ../generative/ldm-2d-cpu.yaml)."
        )
    resolve_paths(gen, PATH_KEYS, gen_base)  # relative to the file naming them
    gen = deep_merge(gen, data.pop("generative_overrides", None) or {})
    data.setdefault("name", path.stem)
    try:
        return StudyConfig(generative=gen, **data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc


# ------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One generator of the study: a model variant under one set of factor values."""

    model: str
    n_train: int
    iterations: int
    augment: bool
    seed: int
    config: GenerativeConfig = field(repr=False, compare=False)
    #: a negative control: ``config`` trains on other patients (``data.split: control``)
    control: bool = False
    #: every stage's iterations scaled by n_train / n_ref (``size_budget: epochs``)
    scaled: bool = field(default=False, compare=False)

    @property
    def key(self) -> str:
        """Folder name of the cell, e.g. ``ldm_n100_aug0_it3000_s0`` (a control cell:
        ``..._s0_control``)."""
        aug = int(self.augment)
        key = f"{self.model}_n{self.n_train}_aug{aug}_it{self.iterations}_s{self.seed}"
        return key + ("_control" if self.control else "")

    @property
    def run_key(self) -> str:
        """The training run shared by cells that differ only in ``iterations``."""
        key = f"{self.model}_n{self.n_train}_aug{int(self.augment)}_s{self.seed}"
        # a scaled run has other earlier-stage iterations than one of the same size trained
        # under fixed iterations (a study folder run before size_budget): never resumed from it
        key += "_epochs" if self.scaled else ""
        return key + ("_control" if self.control else "")

    @property
    def main_key(self) -> str:
        """The key of the cell this one is the control of (its own key when not a control)."""
        return self.key.removesuffix("_control")

    @property
    def audited_config(self) -> GenerativeConfig:
        """The config whose training (and validation) set the cell is audited against: a
        control's generator trained elsewhere, but is audited against the real training set."""
        if not self.control:
            return self.config
        return self.config.replace(data=self.config.data.replace(split="train"))

    def settings_hash(
        self, study: StudyConfig, detector_fp: str, independent_fp: str | None = None
    ) -> str:
        """What decides the cell's numbers: its generative settings, the sampler, the
        detector(s) and the audit settings; a finished cell is reused only if it matches."""
        blob = {
            "generative": self.config.identity_dict(),
            "n_synthetic": study.n_synthetic,
            "sampler": study.sampler,
            "steps": study.steps,
            "percentile": study.percentile,
            "quality": study.quality,
            "metrics": _METRICS_VERSION,
            "detector": detector_fp,
        }
        if study.quality and independent_fp is not None:
            blob["independent"] = independent_fp
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _n_available(study: StudyConfig) -> int:
    cfg = study.generative_config(study.baseline["model"])
    cfg = cfg.replace(data=cfg.data.replace(n_train=None))
    return len(build_datasets(cfg, quiet=True)[0])


def plan(study: StudyConfig, *, n_available: int | None = None) -> list[Cell]:
    """The study's cells in run order: the baseline's run first, then the runs in the order
    the config varies the factors; the cells of one run by rising iterations.

    Under ``size_budget: epochs`` a cell with another training-set size than the
    baseline's trains every stage for n_train / n_ref times the iterations (its key and
    ``iterations`` give the last stage's count)."""
    base = dict(study.baseline)
    if study.design == "factorial":
        combos: list[dict[str, Any]] = [base]
        for factor, values in study.vary.items():
            combos = [c | {factor: v} for c in combos for v in values]
        origins = ["baseline"] * len(combos)  # crossings: seeds repeat every cell
    else:
        combos = [base] + [
            base | {factor: v} for factor, values in study.vary.items() for v in values
        ]
        origins = ["baseline"] + [f for f, values in study.vary.items() for _ in values]
    if study.seeds is not None:  # repeat the chosen cells once per generator seed
        chosen = None if study.design == "factorial" else study.seeds["factors"]
        repeated: list[dict[str, Any]] = []
        for c, origin in zip(combos, origins, strict=True):
            if origin != "seed" and (chosen is None or origin in chosen):
                repeated += [c | {"seed": s} for s in study.seeds["values"]]
            else:
                repeated.append(c)
        combos = repeated
    cells: dict[tuple, Cell] = {}
    n_ref = study.baseline["n_train"]
    if n_ref is None or any(c["n_train"] is None for c in combos):
        n_available = n_available if n_available is not None else _n_available(study)
        n_ref = n_available if n_ref is None else n_ref
    for c in combos:
        n_train = c["n_train"]
        if n_train is None:
            n_train = n_available
        cfg = study.generative_config(
            c["model"], n_train=n_train, augment=c["augment"], seed=c["seed"],
            iterations=c["iterations"], scale=study.budget_scale(int(n_train), int(n_ref)),
        )  # fmt: skip
        iterations = cfg.stage_settings(cfg.stages[-1]).iterations
        scaled = study.budget_scale(int(n_train), int(n_ref)) != 1
        cell = Cell(
            c["model"], int(n_train), iterations, bool(c["augment"]), int(c["seed"]), cfg,
            scaled=scaled,
        )  # fmt: skip
        cells.setdefault((cell.model, cell.n_train, iterations, cell.augment, cell.seed), cell)
    # runs in the order the config names them (baseline first), each by rising iterations
    first = {}
    for cell in cells.values():
        first.setdefault(cell.run_key, len(first))
    main = sorted(cells.values(), key=lambda c: (first[c.run_key], c.iterations))
    if not study.control:
        return main
    controls = [
        Cell(
            c.model, c.n_train, c.iterations, c.augment, c.seed,
            c.config.replace(data=c.config.data.replace(split="control")),
            control=True,
            scaled=c.scaled,
        )
        for c in main
    ]  # fmt: skip
    return main + controls


# ----------------------------------------------------------------------------- running
@dataclass
class StudyResult:
    """What :func:`run_study` returns: the results table and where everything lies."""

    out: Path
    table: pd.DataFrame
    computed: list[str]
    skipped: list[str]
    figures: list[Path]


def _shared_detector(
    study: StudyConfig, cells: list[Cell], out: Path, quiet: bool
) -> tuple[Detector, str]:
    """The one detector of the study, trained on the largest training set and kept in
    ``out/detector``; retrained when that set or the detector settings change."""
    largest = max((c for c in cells if not c.control), key=lambda c: c.n_train)
    train_ds, _ = build_datasets(largest.config, quiet=quiet)
    wanted = {"train_fingerprint": train_ds.fingerprint(), "settings": study.detector}
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    folder = out / "detector"
    info = folder / "study-detector.json"
    if info.exists() and json.loads(info.read_text(encoding="utf-8")).get("key") == key:
        det = Detector.load(folder)
        return det, det.fingerprint
    logger.info("training the study's detector on %d images", len(train_ds))
    det = Detector.train(
        train_ds,
        checkpoint_dir=out / f"detector-checkpoint-{key}",
        quiet=quiet,
        **study.detector,
    )
    det.save(folder, overwrite=True)
    atomic_write_json(info, {"key": key, "n_train": len(train_ds), **wanted})
    return det, det.fingerprint


def _independent_training_set(study: StudyConfig, cells: list[Cell]) -> Any:
    """The images the independent FID extractor trains on (``independent_features``):
    "validation": the validation set; "other_patients": every image of the training pool
    whose patient is in no main cell's training set (nor, by the split, in validation)."""
    from medmem.generative._data import subset

    main = [c for c in cells if not c.control]
    largest = max(main, key=lambda c: c.n_train)
    pool_cfg = largest.config.replace(data=largest.config.data.replace(n_train=None))
    pool, val = build_datasets(pool_cfg, quiet=True)
    if study.independent_features == "validation":
        return val
    used: set[Any] = set()
    seen: set[str] = set()
    for c in main:
        key = json.dumps(c.config.identity_dict()["data"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        train_ds, _ = build_datasets(c.config, quiet=True)
        used |= {
            p if p is not None else f"__id{i}"
            for i, p in zip(train_ds.ids, train_ds.patient_ids, strict=True)
        }
    rest = [
        i
        for i, (iid, p) in enumerate(zip(pool.ids, pool.patient_ids, strict=True))
        if (p if p is not None else f"__id{iid}") not in used
    ]
    batch = int(study.detector.get("batch_size", 8))
    if len(rest) < max(4, min(batch, 16)):
        raise InputError(
            f"study {study.name!r}: independent_features 'other_patients' needs images of "
            f"patients in no cell's training set nor validation; only {len(rest)} of the "
            f"{len(pool)} training-pool images are left after the largest training set "
            f"({largest.n_train}). Lower the largest n_train, or set independent_features "
            "to 'validation' (trained on the validation patients) or 'random'."
        )
    return subset(pool, rest)


def _independent_extractor(
    study: StudyConfig, cells: list[Cell], out: Path, quiet: bool
) -> tuple[Detector | None, dict[str, Any]]:
    """The second feature space of FID (``independent_features``) and a description of it
    (kind, images and patients it learned from, fingerprint); (None, {}) for "none"."""
    kind = study.independent_features
    if not study.quality or kind == "none":
        return None, {}
    base = cells[0].config
    if kind == "random":
        det = Detector.random(base.spatial_dims, base.image_size, **study.detector)
        return det, {"kind": kind, "n_images": 0, "fingerprint": det.fingerprint}
    ds = _independent_training_set(study, cells)
    pids = {p for p in ds.patient_ids if p is not None}
    wanted = {"kind": kind, "train_fingerprint": ds.fingerprint(), "settings": study.detector}
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    folder = out / "detector-independent"
    info = folder / "study-detector.json"
    desc = {"kind": kind, "n_images": len(ds), "n_patients": len(pids)}
    if info.exists() and json.loads(info.read_text(encoding="utf-8")).get("key") == key:
        det = Detector.load(folder)
        return det, {**desc, "fingerprint": det.fingerprint}
    logger.info("training the study's independent FID extractor (%s) on %d images", kind, len(ds))
    det = Detector.train(
        ds, checkpoint_dir=out / f"detector-independent-checkpoint-{key}", quiet=quiet,
        **study.detector,
    )  # fmt: skip
    det.save(folder, overwrite=True)
    atomic_write_json(info, {"key": key, "n_train": len(ds), **desc, **wanted})
    return det, {**desc, "fingerprint": det.fingerprint}


def _read_row(folder: Path, settings: str) -> dict[str, Any] | None:
    path = folder / ROW_FILE
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if row.get("settings_hash") != settings:
        return None
    for old, new in OLD_COLUMN_NAMES.items():  # rows written before the rename
        if old in row:
            row[new] = row.pop(old)
    return row


def _train_to(cell: Cell, runs: Path, quiet: bool) -> tuple[GenerativeModel, float, str]:
    """Train (or train further) the cell's run to its iterations; returns the model, the
    seconds spent in this call and the run folder."""
    run_dir = runs / cell.run_key
    found = read_checkpoint(run_dir)
    if found is not None:
        meta = found[0]
        last = len(cell.config.stages) - 1
        if int(meta.get("stage", 0)) == last and int(meta.get("iteration", 0)) > cell.iterations:
            run_dir = runs / f"{cell.run_key}_it{cell.iterations}"  # cannot train backwards
            found = read_checkpoint(run_dir)
    t0 = time.perf_counter()
    # a run folder without a checkpoint yet (killed early) is resumed from the start
    result = train(cell.config, run_dir, resume=run_dir.exists(), quiet=quiet)
    assert result.model is not None
    return result.model, time.perf_counter() - t0, str(run_dir)


def _synthetic_set(
    cell: Cell, n: int, study: StudyConfig, out: Path, quiet: bool
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The cell's synthetic images: read back when the generator and sampler settings are
    unchanged (an audit-only change redoes no training), else trained and sampled."""
    path = out / "cells" / cell.key / _SYNTHETIC_FILE
    blob = {
        "generative": cell.config.identity_dict(),
        "n": n,
        "sampler": study.sampler,
        "steps": study.steps,
    }
    generation = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    if path.exists():
        meta, tensors = load_tensors(path, fix="Delete it to sample again.")
        if meta.get("generation_hash") == generation:
            return tensors["images"], meta
    model, train_s, run_dir = _train_to(cell, out / "runs", quiet)
    t0 = time.perf_counter()
    ldm = cell.config.model == "ldm"
    images = model.sample(
        n,
        seed=cell.seed + 1,
        sampler=study.sampler if ldm else None,
        steps=study.steps if ldm else None,
        quiet=quiet,
    )
    meta = {
        "generation_hash": generation,
        "train_seconds": train_s,
        "sample_seconds": time.perf_counter() - t0,
        "run_dir": run_dir,
    }
    save_tensors(path, {"images": images.contiguous()}, meta)
    return images, meta


def _quality_row(q: dict[str, Any] | None) -> dict[str, Any]:
    if q is None:
        keys = (
            "fid_detector", "fid_train_val_detector", "fid_independent",
            "fid_train_val_independent", "ms_ssim", "ms_ssim_real", "precision", "recall",
        )  # fmt: skip
        return {k: math.nan for k in keys} | {"independent_features": None}
    return {
        "fid_detector": float(q["fid"]),
        "fid_train_val_detector": float(q["fid_train_val"]),
        "fid_independent": float(q.get("fid_independent", math.nan)),
        "fid_train_val_independent": float(q.get("fid_train_val_independent", math.nan)),
        "independent_features": q.get("independent_features"),
        "ms_ssim": float(q["ms_ssim_synthetic"]),
        "ms_ssim_real": float(q["ms_ssim_real"]),
        "precision": float(q["precision"]),
        "recall": float(q["recall"]),
    }


def _check_control_patients(cell: Cell, train_ds: Any, val_ds: Any) -> dict[str, Any]:
    """A control generator's training set: as large as the audited training set, and no
    patient in common with it or with validation (raises otherwise)."""
    control_ds, _ = build_datasets(cell.config, quiet=True)
    pids = {p for p in control_ds.patient_ids if p is not None}
    shared = pids & ({p for p in train_ds.patient_ids} | {p for p in val_ds.patient_ids})
    if shared or len(control_ds) != len(train_ds):
        raise InputError(
            f"control cell {cell.key}: its training set must hold {len(train_ds)} images of "
            f"patients outside training and validation; it holds {len(control_ds)} images "
            f"and shares {len(shared)} patients."
        )
    return {"n_control_images": len(control_ds), "n_control_patients": len(pids)}


def _run_cell(
    cell: Cell,
    study: StudyConfig,
    detector: Detector,
    out: Path,
    settings: str,
    quiet: bool,
    independent: tuple[Detector | None, dict[str, Any]] = (None, {}),
) -> dict[str, Any]:
    folder = out / "cells" / cell.key
    folder.mkdir(parents=True, exist_ok=True)
    train_ds, val_ds = build_datasets(cell.audited_config, quiet=True)
    control_info: dict[str, Any] = {}
    if cell.control:
        control_info = _check_control_patients(cell, train_ds, val_ds)
    n_syn = study.n_synthetic or len(train_ds)
    images, gen_meta = _synthetic_set(cell, n_syn, study, out, quiet)
    syn = ArrayDataset(
        images.numpy()[:, 0], ids=[f"{cell.key}_syn{i:05d}" for i in range(len(images))]
    )
    t0 = time.perf_counter()
    result = audit(
        train_ds,
        val_ds,
        syn,
        detector=detector,
        percentile=study.percentile,
        calibration="paper",  # the study reproduces the paper: its tau, for both directions
        score="embedding",  # and its score: the embedding correlation
        n_bootstrap=200,
        n_controls=0,
        cache_dir=out / "embedding-cache",
        quiet=True,
    )
    q = None
    if study.quality:  # as the paper (Fig. 8): synthetic vs validation images, and the
        # training images vs the same validation images as the reference
        q = quality(val_ds, syn, extractor=detector, quiet=True)
        q["fid_train_val"] = fid(
            extract_features(val_ds, detector, quiet=True),
            extract_features(train_ds, detector, quiet=True),
        )
        ind, ind_info = independent
        if ind is not None:  # the same FIDs in a feature space not learned from training
            f_val = extract_features(val_ds, ind, quiet=True)
            q["fid_independent"] = fid(f_val, extract_features(syn, ind, quiet=True))
            q["fid_train_val_independent"] = fid(f_val, extract_features(train_ds, ind, quiet=True))
            q["independent_features"] = ind_info["kind"]
            q["independent_extractor"] = ind_info
    result.save(folder / "audit", overwrite=True, report=True, quality=q)
    audit_s = time.perf_counter() - t0
    s = result.summary
    chance = s.get("chance") or {}
    patients = s.get("patients") or {}
    row: dict[str, Any] = {
        "cell": cell.key,
        "model": cell.model,
        "model_type": cell.config.model,
        "n_train": s["n_train"],
        "iterations": cell.iterations,
        "augment": cell.augment,
        "seed": cell.seed,
        "n_synthetic": s["n_synthetic"],
        "n_val": s["n_val"],
        "tau": s["tau"],
        "n_mem": s["n_mem"],
        "pct_mem": s["pct_mem"],
        "n_copies": s["n_copies"],
        "pct_copies": s["pct_copies"],
        "expected_copies": chance.get("expected_copies", math.nan),
        "excess_copies": chance.get("excess_copies", math.nan),
        "n_patients_mem": patients.get("n_patients_mem", math.nan),
        "pct_patients_mem": patients.get("pct_patients_mem", math.nan),
        **_quality_row(q),
        "train_seconds": gen_meta["train_seconds"],
        "sample_seconds": gen_meta["sample_seconds"],
        "audit_seconds": audit_s,
        "role": "control" if cell.control else "main",
        **({"control_of": cell.main_key, **control_info} if cell.control else {}),
    }
    atomic_write_json(
        folder / ROW_FILE,
        {
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in row.items()},
            "settings_hash": settings,
            "run_dir": gen_meta["run_dir"],
            "medmem_version": medmem.__version__,
        },
    )  # fmt: skip
    return row


@contextlib.contextmanager
def _cell_lock(folder: Path) -> Iterator[bool]:
    """Claim a cell, so that processes sharing a study folder never run the same cell;
    yields False when another process holds it. An OS file lock (``filelock``) on
    ``running.lock``: the operating system releases it when its process dies, so there
    is no stale lock to take over and no race in taking one over. The file stays."""
    import filelock

    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(folder / "running.lock", timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _check_joinable(study: StudyConfig, out: Path) -> None:
    """Refuse to join ``out`` unless a run of this very study has started there."""
    path = out / "study.json"
    if not path.is_file():
        raise InputError(
            f"{path}: not found, so there is no study to join in {out}. Start the study "
            "there without --join (join=False) first."
        )
    try:
        held = StudyConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, InputError) as exc:
        raise InputError(f"{path}: unreadable ({exc}). Start the study without --join.") from exc
    if held != study:
        raise InputError(
            f"{path}: {out} holds a study with other settings ({held.name!r}); joining "
            "needs the same config as the run there. Pass that config, or another --out."
        )


def run_study(
    study: StudyConfig,
    out: str | Path,
    *,
    only: list[str] | None = None,
    figures: bool = True,
    quiet: bool = False,
    join: bool = False,
) -> StudyResult:
    """Run (or resume) ``study`` in the folder ``out``.

    Finished cells (``out/cells/<cell>/row.json`` with the same settings) are read back,
    not recomputed; training runs resume from their checkpoints. After every cell the
    results table (``results.csv``, ``results.md``) is rewritten, so a crash loses at most
    the cell in progress.

    Args:
        study: the settings (:func:`load_study`).
        out: the study folder (created; reused when it holds the same study).
        only: cell keys to run (default all); the table still lists every finished cell.
        figures: write the figures into ``out/figures``.
        quiet: no progress bars.
        join: run beside another process running this study in ``out`` (cells are locked
            one by one, so each runs once): refused unless ``out/study.json`` holds this
            very study, since two processes with different settings would redo each
            other's cells.
    """
    if not isinstance(study, StudyConfig):
        raise InputError(f"study must be a StudyConfig, got {type(study).__name__}.")
    out = Path(out)
    if join:
        _check_joinable(study, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", study.to_dict())
    cells = plan(study)
    if only:
        unknown = sorted(set(only) - {c.key for c in cells})
        if unknown:
            raise InputError(
                f"unknown cells {unknown}; the study's cells are {[c.key for c in cells]}."
            )
    import filelock

    # one process trains the shared models; a joining process waits here, then loads them
    # (two trainings at once would give two detectors, and cells scored by either)
    with filelock.FileLock(out / "shared-models.lock"):
        detector, det_fp = _shared_detector(study, cells, out, quiet)
        independent = _independent_extractor(study, cells, out, quiet)
    ind_fp = independent[1].get("fingerprint")
    settings = {c.key: c.settings_hash(study, det_fp, ind_fp) for c in cells}

    def finished() -> list[dict[str, Any]]:  # read from disk: other processes may add cells
        rows = []
        for c in cells:
            row = _read_row(out / "cells" / c.key, settings[c.key])
            if row is not None:  # how the cell was trained, also for rows written before
                last = c.config.stage_settings(c.config.stages[-1])
                row["epochs"] = last.iterations * last.batch_size / c.n_train
                row["size_budget"] = study.size_budget
                rows.append(row)
        return rows

    computed, skipped = [], []
    for i, cell in enumerate(cells, 1):
        if _read_row(out / "cells" / cell.key, settings[cell.key]) is not None:
            skipped.append(cell.key)
            continue
        if only and cell.key not in only:
            continue
        with _cell_lock(out / "cells" / cell.key) as mine:
            if not mine:
                logger.warning("cell %s is being run by another process; skipped", cell.key)
                continue
            logger.info("study %s: cell %d/%d %s", study.name, i, len(cells), cell.key)
            if not quiet:
                print(f"[study] cell {i}/{len(cells)}: {cell.key}", flush=True)
            _run_cell(cell, study, detector, out, settings[cell.key], quiet, independent)
        computed.append(cell.key)
        write_table(finished(), out, study)
    rows = finished()
    table = write_table(rows, out, study)
    figs = plot_study(table, out, study) if figures and len(table) else []
    return StudyResult(out, table, computed, skipped, figs)


# ------------------------------------------------------------------------------ output
def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(frame: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A GitHub Markdown table of ``frame`` (floats to 3 decimals, NaN as n/a)."""
    cols = columns or list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in frame[cols].to_dict("records"):
        lines.append("| " + " | ".join(_fmt(rec[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _with_controls(rows: list[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Each main row with its control's counts beside it (matched on the cell key) and the
    excess over them, with Newcombe's hybrid score interval for the difference of the two
    shares (copies of n_synthetic, memorized of n_train), scaled to counts."""
    from medmem._stats import difference_interval

    controls = {r.get("control_of"): r for r in rows if r.get("role") == "control"}
    out = []
    for r in rows:
        r = dict(r)
        r.setdefault("role", "main")  # rows written before controls existed
        c = controls.get(r["cell"]) if r["role"] == "main" else None
        if c is not None:
            for what, n in (("copies", "n_synthetic"), ("mem", "n_train")):
                k1, k2 = int(r[f"n_{what}"]), int(c[f"n_{what}"])
                n1, n2 = int(r[n]), int(c[n])
                lo, hi = difference_interval(k1, n1, k2, n2, confidence)
                r[f"control_n_{what}"] = k2
                r[f"excess_{what}_control"] = k1 - k2 * n1 / n2
                r[f"excess_{what}_control_ci_low"] = lo * n1
                r[f"excess_{what}_control_ci_high"] = hi * n1
        out.append(r)
    return out


def _pooled_against_controls(g: pd.DataFrame, confidence: float) -> dict[str, Any]:
    """The main cells of one configuration pooled over the seeds whose control has run,
    against those controls pooled (a control has as many images as its cell): counts and
    the difference of the shares in percentage points, with a Newcombe interval. The
    images cluster by seed, so this interval is narrower than the one across seeds."""
    has = g[pd.to_numeric(g["control_n_copies"], errors="coerce").notna()]
    rec: dict[str, Any] = {"pooled_seeds": [int(s) for s in has["seed"]]}
    for what, n in (("copies", "n_synthetic"), ("mem", "n_train")):
        k1, n1 = int(has[f"n_{what}"].sum()), int(has[n].sum())
        k2 = int(pd.to_numeric(has[f"control_n_{what}"]).sum())
        rec[f"pooled_n_{what}"], rec[f"pooled_{n}"] = k1, n1
        rec[f"pooled_control_n_{what}"] = k2
        key = f"pooled_excess_pct_{what}"
        rec[key], rec[f"{key}_ci_low"], rec[f"{key}_ci_high"] = _share_difference(
            k1, n1, k2, n1, confidence
        )
    return rec


def _share_difference(
    k1: int, n1: int, k2: int, n2: int, confidence: float
) -> tuple[float, float, float]:
    """k1/n1 - k2/n2 in percentage points and its Newcombe interval (NaN when a side is
    empty)."""
    from medmem._stats import difference_interval

    if not (n1 and n2):
        return (math.nan,) * 3
    lo, hi = difference_interval(k1, n1, k2, n2, confidence)
    return 100 * (k1 / n1 - k2 / n2), 100 * lo, 100 * hi


def seed_table(frame: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """One row per configuration (``SEED_GROUP``) over its generator seeds: ``n_seeds``,
    ``seeds``, and per metric of ``SEED_METRICS`` the mean, a Student-t interval across
    seeds (``<metric>_ci_low/high``; n/a for one seed) and the per-seed values
    (``<metric>_values``, in the order of ``seeds``); for main cells also their copies and
    memorized images pooled over the seeds with a control, against the controls pooled
    (``pooled_*``: :func:`_pooled_against_controls`)."""
    from medmem._stats import t_interval

    records = []
    if len(frame) == 0:
        return pd.DataFrame(columns=[*SEED_GROUP, "n_seeds", "seeds"])
    group = frame.assign(role=frame["role"].fillna("main"))
    for keys, g in group.groupby(list(SEED_GROUP), sort=False, dropna=False):
        g = g.sort_values("seed", kind="stable")
        rec: dict[str, Any] = dict(zip(SEED_GROUP, keys, strict=True))
        rec["n_seeds"] = len(g)
        rec["seeds"] = [int(s) for s in g["seed"]]
        for m in SEED_METRICS:
            vals = pd.to_numeric(g[m], errors="coerce").astype(float).to_numpy()
            finite = vals[np.isfinite(vals)]
            lo, hi = t_interval(finite, confidence)
            rec[m] = float(finite.mean()) if finite.size else math.nan
            rec[f"{m}_ci_low"], rec[f"{m}_ci_high"] = lo, hi
            rec[f"{m}_values"] = [None if not math.isfinite(v) else float(v) for v in vals]
        if rec["role"] == "main":
            rec.update(_pooled_against_controls(g, confidence))
        records.append(rec)
    return pd.DataFrame(records)


def write_table(
    rows: list[dict[str, Any]], out: Path, study: StudyConfig | None = None
) -> pd.DataFrame:
    """Write ``results.csv`` and ``results.md`` (one row per finished cell; control cells
    after the others, and each cell's control counts beside it), ``results-seeds.*``
    (means and intervals across generator seeds, :func:`seed_table`) and, given the
    study, ``results-comparisons.*`` (the factors' values against each other,
    :func:`factor_comparisons`)."""
    rows = _with_controls(rows)
    frame = pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], columns=list(COLUMNS))
    frame["role"] = frame["role"].fillna("main")
    order = ["model", "n_train", "augment", "iterations", "seed"]
    frame = frame.assign(_control=frame["role"] == "control")
    frame = frame.sort_values(["_control", *order], kind="stable").drop(columns="_control")
    frame = frame.reset_index(drop=True)
    atomic_save(out / "results.csv", lambda p: frame.to_csv(p, index=False))
    show = [
        "model", "model_type", "n_train", "iterations", "epochs", "augment", "seed", "tau",
        "n_mem", "pct_mem", "n_copies", "pct_copies", "expected_copies", "fid_detector",
        "fid_train_val_detector", "fid_independent", "fid_train_val_independent", "ms_ssim",
        "precision", "recall", "train_seconds",
    ]  # fmt: skip
    if (frame["role"] == "control").any():
        show[7:7] = ["role"]
        show += ["control_n_mem", "control_n_copies", "excess_copies_control"]
    budgets = sorted({str(b) for b in frame["size_budget"].dropna()})
    budget = {
        "['epochs']": "fixed epochs (size_budget: epochs; iterations scaled by n_train / n_ref)",
        "['iterations']": "fixed iterations (size_budget: iterations)",
    }.get(str(budgets), "an unrecorded budget (rows written before size_budget)")
    kinds = ", ".join(sorted({str(k) for k in frame["independent_features"].dropna()})) or "n/a"
    notes = [
        f"Training-set size at {budget}. FID to the validation images in two feature spaces: "
        "fid_detector (the study's detector, trained on the largest training set) and "
        f"fid_independent (independent_features: {kinds}).",
        "",
        "",
    ]
    atomic_write_text(out / "results.md", "\n".join(notes) + markdown_table(frame, show))
    seeds = seed_table(frame)
    if len(seeds) and (seeds["n_seeds"] > 1).any():
        _write_seed_table(seeds, out)
    if study is not None and study.vary:
        _write_comparisons(factor_comparisons(frame, study), out)
    return frame


def _write_seed_table(seeds: pd.DataFrame, out: Path) -> None:
    """results-seeds.json (everything), .csv (per-seed values as 'a;b;c') and .md."""
    records = seeds.to_dict("records")
    clean = [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in records
    ]
    atomic_write_json(
        out / "results-seeds.json",
        {
            "interval": "95% Student-t interval of the mean across generator seeds (n_seeds - 1 "
            "degrees of freedom); n/a for one seed",
            "rows": clean,
        },
    )
    flat = seeds.copy()
    for col in flat.columns:
        if col == "seeds" or col.endswith("_values"):
            flat[col] = [";".join("n/a" if v is None else f"{v:g}" for v in x) for x in flat[col]]
    atomic_save(out / "results-seeds.csv", lambda p: flat.to_csv(p, index=False))
    show = []
    for r in records:

        def cell(m: str, r: dict[str, Any] = r) -> str:
            lo, hi = r[f"{m}_ci_low"], r[f"{m}_ci_high"]
            ci = f" ({_fmt(lo)} to {_fmt(hi)})" if math.isfinite(lo) else ""
            known = [v for v in r[f"{m}_values"] if v is not None]
            # a mean over fewer seeds than the row's (e.g. controls run for some seeds)
            part = (
                f" [{len(known)} of {r['n_seeds']} seeds]"
                if known and len(known) < r["n_seeds"]
                else ""
            )
            return f"{_fmt(r[m])}{ci}{part}"

        show.append(
            {
                **{k: r[k] for k in ("role", "model", "n_train", "iterations", "augment")},
                "seeds": ",".join(map(str, r["seeds"])),
                "N_mem": cell("n_mem"),
                "N_copies": cell("n_copies"),
                "N_copies per seed": ", ".join(_fmt(v) for v in r["n_copies_values"]),
                "control N_copies": cell("control_n_copies"),
                "excess over control": cell("excess_copies_control"),
                "pooled over seeds: copies vs control": _pooled_cell(r),
            }
        )
    text = (
        "Mean over generator seeds (95% Student-t interval across seeds). Pooled: the "
        "seeds' synthetic images together against their controls' (k/n each), the "
        "difference in percentage points with a 95% Newcombe interval; the images cluster "
        "by seed, so the interval across seeds is the conservative reading.\n\n"
        + markdown_table(pd.DataFrame(show))
    )
    atomic_write_text(out / "results-seeds.md", text)


def _pooled_cell(r: dict[str, Any]) -> str:
    """'9/150 vs 0/150: 6.0 points (2.2 to 11.0)', or n/a without a control."""
    if r["role"] != "main" or not r.get("pooled_seeds"):
        return "n/a"
    n = int(r["pooled_n_synthetic"])  # counts come back as floats from the frame
    return (
        f"{int(r['pooled_n_copies'])}/{n} vs {int(r['pooled_control_n_copies'])}/{n}: "
        f"{r['pooled_excess_pct_copies']:.1f} points ({r['pooled_excess_pct_copies_ci_low']:.1f}"
        f" to {r['pooled_excess_pct_copies_ci_high']:.1f})"
    )


def factor_comparisons(
    table: pd.DataFrame, study: StudyConfig, confidence: float = 0.95
) -> pd.DataFrame:
    """Every pair of values of each varied factor, as the factor's figure compares them
    (the baseline's other settings, the baseline model unless the factor is the model),
    each value's main cells pooled over their generator seeds: copies of n_synthetic and
    memorized of n_train, and the difference b - a in percentage points with a Newcombe
    interval; the same over the seeds both values have (``*_same_seeds``). The images
    cluster by seed, so the interval treats more of them as independent than there are;
    with one seed a side it is a single generator's."""
    cols = ["factor", "a", "b", "seeds_a", "seeds_b"]
    if len(table) == 0:
        return pd.DataFrame(columns=cols)
    main = table[table["role"].fillna("main") == "main"] if "role" in table else table
    records = []
    for factor in study.vary:
        rows = main[_group_mask(main, study, factor, any_seed=True)]
        if factor != "augment":
            rows = rows[rows["augment"].astype(bool) == bool(study.baseline["augment"])]
        if factor != "model":
            rows = rows[rows["model"] == study.baseline["model"]]
        groups = {v: g for v, g in rows.groupby(factor, sort=True)}
        values = list(groups)
        for i, a in enumerate(values):
            for b in values[i + 1 :]:
                ga, gb = groups[a], groups[b]
                same = sorted({int(x) for x in ga["seed"]} & {int(x) for x in gb["seed"]})
                rec: dict[str, Any] = {
                    "factor": factor,
                    "a": a.item() if hasattr(a, "item") else a,
                    "b": b.item() if hasattr(b, "item") else b,
                    "seeds_a": sorted(int(x) for x in ga["seed"]),
                    "seeds_b": sorted(int(x) for x in gb["seed"]),
                    "seeds_same": same,
                    **_pooled_difference(ga, gb, "", confidence),
                }
                if same:  # the seeds both sides have, seed against seed
                    rec.update(
                        _pooled_difference(
                            ga[ga["seed"].isin(same)], gb[gb["seed"].isin(same)],
                            "_same_seeds", confidence,
                        )
                    )  # fmt: skip
                records.append(rec)
    return pd.DataFrame(records, columns=None if records else cols)


def _pooled_difference(
    ga: pd.DataFrame, gb: pd.DataFrame, suffix: str, confidence: float
) -> dict[str, Any]:
    """Copies and memorized images of the cells ``ga`` and ``gb`` summed, and the
    difference of the shares b - a in points with a Newcombe interval."""
    rec: dict[str, Any] = {}
    for what, n in (("copies", "n_synthetic"), ("mem", "n_train")):
        k1, n1 = int(ga[f"n_{what}"].sum()), int(ga[n].sum())
        k2, n2 = int(gb[f"n_{what}"].sum()), int(gb[n].sum())
        rec[f"n_{what}_a{suffix}"], rec[f"{n}_a{suffix}"] = k1, n1
        rec[f"n_{what}_b{suffix}"], rec[f"{n}_b{suffix}"] = k2, n2
        key = f"diff_pct_{what}{suffix}"
        rec[key], rec[f"{key}_ci_low"], rec[f"{key}_ci_high"] = _share_difference(
            k2, n2, k1, n1, confidence
        )
    return rec


def _write_comparisons(comparisons: pd.DataFrame, out: Path) -> None:
    """results-comparisons.json (everything) and .md (:func:`factor_comparisons`)."""
    records = json.loads(comparisons.to_json(orient="records"))
    atomic_write_json(
        out / "results-comparisons.json",
        {
            "interval": "95% Newcombe interval of the difference of the shares b - a, in "
            "percentage points, each side's images pooled over its generator seeds",
            "rows": records,
        },
    )
    atomic_write_text(out / "results-comparisons.md", comparisons_markdown(records))


def _comparison_text(r: dict[str, Any], what: str, n: str, suffix: str = "") -> str:
    """'9/150 -> 42/300: +8.0 points (1.9 to 13.2)' for ``what`` (copies of n_synthetic,
    mem of n_train) of a :func:`factor_comparisons` record."""
    d = f"diff_pct_{what}{suffix}"
    return (
        f"{r[f'n_{what}_a{suffix}']}/{r[f'{n}_a{suffix}']} -> "
        f"{r[f'n_{what}_b{suffix}']}/{r[f'{n}_b{suffix}']}: {r[d]:+.1f} points "
        f"({r[f'{d}_ci_low']:.1f} to {r[f'{d}_ci_high']:.1f})"
    )


def _same_seeds_cell(r: dict[str, Any]) -> str:
    """The copies over the seeds both sides have, when those are not all of both sides'."""
    same = r.get("seeds_same") or []
    if not same:
        return "no seed in common"
    if same == r["seeds_a"] == r["seeds_b"]:
        return "(as all)"
    seeds = f"seed{'s' * (len(same) > 1)} {','.join(map(str, same))}"
    return f"{seeds}: {_comparison_text(r, 'copies', 'n_synthetic', '_same_seeds')}"


def comparisons_markdown(records: list[dict[str, Any]]) -> str:
    """The rows of :func:`factor_comparisons` (as records) as a markdown table with a
    sentence on how to read it."""
    if not records:
        return "No factor has two values with finished cells yet.\n"
    show = [
        {
            "factor": r["factor"],
            "a -> b": f"{r['a']} -> {r['b']}",
            "seeds": f"{','.join(map(str, r['seeds_a']))} / {','.join(map(str, r['seeds_b']))}",
            "copies": _comparison_text(r, "copies", "n_synthetic"),
            "memorized": _comparison_text(r, "mem", "n_train"),
            "copies, same seeds": _same_seeds_cell(r),
        }
        for r in records
    ]
    return (
        "Each value of a factor against each other, main cells pooled over their generator "
        "seeds (k/n each side), the difference b - a in percentage points with a 95% "
        "Newcombe interval; the images cluster by seed, so the interval is narrower than "
        "one across seeds would be.\n\n" + markdown_table(pd.DataFrame(show))
    )


def _baseline_value(table: pd.DataFrame, study: StudyConfig, factor: str) -> Any:
    if factor == "n_train":
        return table["n_train"].max() if study.baseline["n_train"] is None else None
    if factor == "iterations":
        rows = table[table["model"] == study.baseline["model"]]
        cfg = study.generative_config(study.baseline["model"])
        it = cfg.stage_settings(cfg.stages[-1]).iterations
        return it if (rows["iterations"] == it).any() else None
    return None


def _group_mask(
    table: pd.DataFrame, study: StudyConfig, factor: str, *, any_seed: bool = False
) -> pd.Series:
    """Baseline rows, the factor ``factor`` free (model free too), per model's own
    iterations when the iterations factor is fixed (models may train for different
    lengths); ``any_seed``: every generator seed, not only the baseline's."""
    mask = pd.Series(True, index=table.index)
    for factor2 in ("n_train", "augment", "seed"):
        if factor2 == factor or (any_seed and factor2 == "seed"):
            continue
        value = study.baseline[factor2]
        if value is None:
            value = _baseline_value(table, study, factor2)
        if value is not None:
            mask &= table[factor2] == value
    if factor != "iterations":
        its = {}
        for m in table["model"].unique():
            if study.baseline["iterations"] is not None:
                its[m] = study.baseline["iterations"]
            else:
                cfg = study.generative_config(m)
                its[m] = cfg.stage_settings(cfg.stages[-1]).iterations
        n_ref = study.baseline["n_train"]
        if n_ref is None:
            n_ref = table["n_train"].max()

        def budget(r: pd.Series) -> int:  # fixed epochs: the iterations scale with n_train
            scale = study.budget_scale(int(r["n_train"]), int(n_ref))
            return its[r["model"]] if scale == 1 else max(1, round(its[r["model"]] * scale))

        mask &= table.apply(lambda r: r["iterations"] == budget(r), axis=1)
    return mask


def _audit_tables(out: Path, cell: str) -> pd.DataFrame | None:
    """training.csv of a cell's audit (read by ``AuditResult.load``); None before it ran."""
    folder = out / "cells" / cell / "audit"
    return AuditResult.load(folder).training if (folder / "summary.json").exists() else None


_Panel = tuple[str, list[tuple[str, str, str, str | None]]]


def _factor_figure(
    table: pd.DataFrame,
    study: StudyConfig,
    factor: str,
    xlabel: str,
    panels: list[_Panel],
    title: str,
    path: Path,
) -> bool:
    """Line plots of the baseline cells against ``factor``, one line per model variant
    that was run at several values; each panel is (ylabel, [(column, style, label suffix,
    reference column drawn dotted)]). With several generator seeds a point is their mean
    and its bar their range; a column with a ``control_`` twin (the negative control's
    value) gets it as a dashed line. False when no model varies the factor."""
    rows = table[_group_mask(table, study, factor, any_seed=True) & ~table["augment"].astype(bool)]
    models = [m for m, g in rows.groupby("model") if g[factor].nunique() > 1]
    if not models:
        return False
    fig, axes = subplots(1, len(panels), figsize=(4 * len(panels), 3.4), dpi=110)
    for m in models:
        by = rows[rows["model"] == m].groupby(factor, sort=True)
        for ax, (_, lines) in zip(axes, panels, strict=True):
            for column, style, suffix, reference in lines:
                values = by[column].agg(["mean", "min", "max", "count"]).astype(float)
                x = values.index.to_numpy()
                line = ax.plot(x, values["mean"], style, label=f"{m}{suffix}")[0]
                if (values["count"] > 1).any():
                    ax.errorbar(
                        x,
                        values["mean"],
                        yerr=[values["mean"] - values["min"], values["max"] - values["mean"]],
                        fmt="none",
                        ecolor=line.get_color(),
                        capsize=2,
                        lw=1,
                    )
                twin = f"control_{column}"
                if twin in rows and rows[twin].notna().any():
                    ctrl = by[twin].mean().astype(float)
                    ax.plot(
                        ctrl.index.to_numpy(), ctrl.to_numpy(), "x--", color=line.get_color(),
                        lw=1, label=f"{m}{suffix} control",
                    )  # fmt: skip
                if reference is not None:
                    ax.axhline(
                        rows[rows["model"] == m][reference].mean(),
                        color=line.get_color(),
                        ls=":",
                        lw=1,
                    )
    for ax, (ylabel, _) in zip(axes, panels, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_study(
    table: pd.DataFrame, out: Path, study: StudyConfig, *, figdir: Path | None = None
) -> list[Path]:
    """The paper's figures from the results table of the study folder ``out`` (only
    those its cells allow), into ``figdir`` (default ``out/figures``)."""
    figdir = Path(figdir) if figdir is not None else out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table = table.rename(columns=OLD_COLUMN_NAMES)  # results written before the renames
    for col in ("fid_independent", "fid_train_val_independent"):
        if col not in table:
            table = table.assign(**{col: math.nan})
    if "role" in table:  # the controls are beside their cells, not cells of their own
        table = table[table["role"].fillna("main") != "control"]
    if "control_n_mem" in table:  # the controls' shares, for the dashed lines
        table = table.assign(
            control_pct_mem=100 * table["control_n_mem"].astype(float) / table["n_train"],
            control_pct_copies=100
            * table["control_n_copies"].astype(float)
            / table["n_synthetic"].astype(float),
        )
    title = study.name

    # Fig. 2: histograms of the baseline cell of each model variant
    base = table[_group_mask(table, study, "model") & ~table["augment"].astype(bool)]
    base = base.drop_duplicates("model")
    if len(base):
        n = len(base)
        fig, axes = subplots(1, n, figsize=(4.2 * n, 3.4), dpi=110, squeeze=False)
        for ax, rec in zip(axes[0], base.to_dict("records"), strict=True):
            tr = _audit_tables(out, rec["cell"])
            if tr is None:
                continue
            draw_histogram(
                ax,
                tr["nearest_val_corr"].to_numpy(),
                tr["nearest_synthetic_corr"].to_numpy(),
                rec["tau"],
                title=f"{rec['model']}: N_mem {rec['n_mem']}/{rec['n_train']}, "
                f"N_copies {rec['n_copies']}/{rec['n_synthetic']}",
                legend=ax is axes[0][0],
            )
        fig.suptitle(f"{title}: nearest-neighbour correlations (Fig. 2)", fontsize=10)
        fig.tight_layout()
        written.append(figdir / "histograms.png")
        save_figure(fig, written[-1])

    # Fig. 3: augmentation on/off per model
    aug = table[_group_mask(table, study, "augment", any_seed=True)]
    models_both = [m for m, g in aug.groupby("model") if g["augment"].nunique() == 2]
    if models_both:
        fig, axes = subplots(1, 2, figsize=(8.5, 3.4), dpi=110)
        width = 0.38
        x = np.arange(len(models_both))
        for ax, col, label in zip(
            axes,
            ("pct_mem", "pct_copies"),
            ("N_mem (% of training)", "N_copies (% synthetic)"),
            strict=True,
        ):
            for j, flag in enumerate((False, True)):
                groups = [
                    aug[(aug["model"] == m) & (aug["augment"] == flag)][col].astype(float)
                    for m in models_both
                ]
                vals = [float(g.mean()) for g in groups]
                # several generator seeds: the bar is their mean, the whisker their range
                spread = [
                    [v - float(g.min()) for v, g in zip(vals, groups, strict=True)],
                    [float(g.max()) - v for v, g in zip(vals, groups, strict=True)],
                ]
                bars = ax.bar(x + (j - 0.5) * width, vals, width,
                              yerr=spread if any(len(g) > 1 for g in groups) else None,
                              capsize=2,
                              label="augmentation" if flag else "no augmentation")  # fmt: skip
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
                twin = f"control_{col}"
                if twin in aug and aug[twin].notna().any():
                    ctrl = [
                        float(aug[(aug["model"] == m) & (aug["augment"] == flag)][twin].mean())
                        for m in models_both
                    ]
                    ax.plot(x + (j - 0.5) * width, ctrl, "kx", ms=7,
                            label="negative control" if j == 0 else None)  # fmt: skip
            ax.set_xticks(x, models_both)
            ax.set_ylabel(label)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title}: augmentation (Fig. 3)", fontsize=10)
        fig.tight_layout()
        written.append(figdir / "augmentation.png")
        save_figure(fig, written[-1])

    # Fig. 7: training-set size; Fig. 8: iterations, with FID and MS-SSIM
    mem_panels: list[_Panel] = [
        ("N_mem (images)", [("n_mem", "o-", "", None)]),
        ("N_mem (% of training)", [("pct_mem", "o-", "", None)]),
        ("N_copies (% of synthetic)", [("pct_copies", "o-", "", None)]),
    ]
    kinds = sorted(
        {str(k) for k in table.get("independent_features", pd.Series(dtype=object)).dropna()}
    )
    independent = f"independent features ({', '.join(kinds) or 'n/a'})"
    fid_panels: list[_Panel] = [
        (
            "FID to validation\ndetector features\n(dotted: training data)",
            [("fid_detector", "o-", "", "fid_train_val_detector")],
        )
    ]
    if np.isfinite(table["fid_independent"].astype(float)).any():
        fid_panels.append(
            (
                f"FID to validation\n{independent}\n(dotted: training data)",
                [("fid_independent", "o-", "", "fid_train_val_independent")],
            )
        )
    quality_panels: list[_Panel] = [
        *fid_panels,
        ("MS-SSIM of synthetic pairs\n(dotted: real)", [("ms_ssim", "o-", "", "ms_ssim_real")]),
        ("%", [("pct_mem", "o-", " N_mem %", None), ("pct_copies", "s--", " N_copies %", None)]),
    ]
    for factor, xlabel, panels, name, fig_title in (
        ("n_train", "training images", mem_panels, "training-size", "training-set size (Fig. 7)"),
        ("iterations", "iterations", quality_panels, "iterations", "training iterations (Fig. 8)"),
    ):
        path = figdir / f"{name}.png"
        if _factor_figure(table, study, factor, xlabel, panels, f"{title}: {fig_title}", path):
            written.append(path)

    # memorization against quality, per model variant, in each feature space
    spaces = [
        (col, label)
        for col, label in (("fid_detector", "detector features"), ("fid_independent", independent))
        if np.isfinite(table[col].astype(float)).any()
    ]
    if spaces:
        fig, axes = subplots(1, len(spaces), figsize=(5.6 * len(spaces), 4.0), dpi=110)
        axes = np.atleast_1d(axes)
        for ax, (col, label) in zip(axes, spaces, strict=True):
            pts = table[np.isfinite(table[col].astype(float))]
            for m, g in pts.groupby("model"):
                ax.scatter(g[col], g["pct_copies"], label=m, s=30)
            ax.set_xlabel(f"FID, {label} (lower is better)")
            ax.set_ylabel("N_copies (% of synthetic)")
            ax.legend(fontsize=8)
        fig.suptitle(f"{title}: memorization against quality", fontsize=10)
        fig.tight_layout()
        written.append(figdir / "quality-vs-memorization.png")
        save_figure(fig, written[-1])
    return written


__all__ = [
    "COLUMNS",
    "FACTORS",
    "OLD_COLUMN_NAMES",
    "Cell",
    "StudyConfig",
    "StudyResult",
    "load_study",
    "markdown_table",
    "plan",
    "plot_study",
    "run_study",
    "seed_table",
    "write_table",
]
