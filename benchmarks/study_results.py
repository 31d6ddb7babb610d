"""Publish finished `medmem study` folders into docs/: figures, tables and a JSON record.

    python -m benchmarks.study_results runs/study-nih-cxr runs/study-phantoms-3d

For each study folder: redraws its figures from ``results.csv`` (``medmem.study.plot_study``)
and copies them to ``docs/figures/study-<name>-*.png``,
writes ``docs/results/study-<name>.md`` (the results table, the means across generator
seeds and the run times, as measured) with its numbers in ``docs/results/study-<name>.json``
beside it, and puts the record in ``docs/results/study.json`` (replacing one of the same
name). The written analysis in ``docs/results/study.md`` quotes these files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from benchmarks._common import machine
from medmem import AuditResult
from medmem.study import (
    OLD_COLUMN_NAMES,
    StudyConfig,
    comparisons_markdown,
    factor_comparisons,
    markdown_table,
    plot_study,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

SHOW = [
    "model", "model_type", "n_train", "iterations", "epochs", "augment", "seed", "role",
    "tau", "n_mem", "pct_mem", "n_copies", "pct_copies", "expected_copies", "control_n_mem",
    "control_n_copies", "excess_copies_control", "excess_copies_control_ci_low",
    "excess_copies_control_ci_high", "excess_mem_control", "excess_mem_control_ci_low",
    "excess_mem_control_ci_high", "n_patients_mem", "fid_detector", "fid_train_val_detector",
    "fid_independent", "fid_train_val_independent", "ms_ssim", "ms_ssim_real", "precision",
    "recall", "median_synthetic_nearest_train", "median_train_nearest_val", "train_seconds",
]  # fmt: skip


def publish(folder: Path) -> dict:
    study = json.loads((folder / "study.json").read_text())
    name = study["name"]
    table = pd.read_csv(folder / "results.csv").rename(columns=OLD_COLUMN_NAMES)
    # the figures again from the table as it stands: a study writes its table after every
    # cell but its figures only when an invocation ends, so a study still running (or one
    # stopped mid-way) would publish figures older than its table
    plot_study(table, folder, StudyConfig.from_dict(study))
    table = table.assign(**_medians(folder, table["cell"]))
    figures = []
    for png in sorted((folder / "figures").glob("*.png")):
        dest = DOCS / "figures" / f"study-{name}-{png.name}"
        shutil.copyfile(png, dest)
        figures.append(dest.relative_to(DOCS).as_posix())
    comparisons = _comparisons(table, study)
    seconds = table[["train_seconds", "sample_seconds", "audit_seconds"]].sum()
    det = json.loads((folder / "detector" / "study-detector.json").read_text())
    ind_path = folder / "detector-independent" / "study-detector.json"
    independent = json.loads(ind_path.read_text()) if ind_path.exists() else None
    seeds_path = folder / "results-seeds.json"
    seeds = json.loads(seeds_path.read_text())["rows"] if seeds_path.exists() else []
    seeds_md = []
    if seeds:
        seeds_md = [
            "## Across generator seeds",
            "",
            (folder / "results-seeds.md").read_text().strip(),
            "",
        ]
    md = [
        f"# Study `{name}`: results table (generated)",
        "",
        f"Written by `python -m benchmarks.study_results {folder}` from `{folder}/results.csv`",
        f"(the output of `medmem study`). Machine: {machine()}, shared with other jobs.",
        f"The numbers are in [study-{name}.json](study-{name}.json).",
        "",
        # columns a study written before them lacks (epochs, role, controls, fid_independent)
        markdown_table(table, [c for c in SHOW if c in table and table[c].notna().any()]),
        "pct_mem: % of n_train; pct_copies: % of n_synthetic (= n_train); expected_copies:",
        "copies expected by chance at tau (the audit's estimate from validation images);",
        "fid_detector: Frechet distance in the shared detector's feature space, synthetic vs",
        "validation images (fid_train_val_detector: training vs validation images, the",
        "reference); fid_independent: the same in a second feature space not learned from the",
        f"training images (independent_features: {study.get('independent_features', 'none')});",
        "results written before the renames had only the detector's FID, as `fid`;",
        "median_synthetic_nearest_train: median correlation of a synthetic image with its",
        "nearest training image; median_train_nearest_val: of a training image with its",
        "nearest validation image (both from the cell's audit tables);",
        "ms_ssim: mean MS-SSIM of synthetic pairs (ms_ssim_real: of validation pairs);",
        "train_seconds: training time spent for the cell in its run (cells of one run share",
        "the earlier iterations).",
        "",
        "excess_*_control: the cell's count minus its negative control's (the same",
        "generator trained on as many images of other patients, audited against the same",
        "training set), with a 95% Newcombe interval (ci_low, ci_high).",
        "",
        *seeds_md,
        *_comparisons_md(comparisons),
        f"Shared detector: trained on {det['n_train']} images, settings {det['settings']}.",
        f"Total: training {seconds['train_seconds'] / 60:.1f} min, sampling "
        f"{seconds['sample_seconds'] / 60:.1f} min, audits and quality "
        f"{seconds['audit_seconds'] / 60:.1f} min.",
        "",
    ]
    (DOCS / "results" / f"study-{name}.md").write_text("\n".join(md) + "\n")
    record = {
        "name": name,
        "settings": study,
        "machine": machine(),
        "detector": det,
        # the second FID feature space: what it learned from (images, patients)
        "independent_extractor": independent,
        "rows": json.loads(table.to_json(orient="records")),
        "seeds": seeds,
        "comparisons": comparisons,
        "figures": figures,
    }
    write_record(record)
    return record


def _medians(folder: Path, cells: pd.Series) -> dict[str, list]:
    """Per cell, from its audit's tables: the median correlation of a synthetic image with
    its nearest training image, and of a training image with its nearest validation image
    (where the synthetic images sit against real novel images)."""
    syn, val = [], []
    for cell in cells:
        audit = folder / "cells" / str(cell) / "audit"
        res = AuditResult.load(audit) if (audit / "summary.json").exists() else None
        syn.append(float(res.synthetic["nearest_train_corr"].median()) if res else None)
        val.append(float(res.training["nearest_val_corr"].median()) if res else None)
    return {"median_synthetic_nearest_train": syn, "median_train_nearest_val": val}


COMPARISONS_HEADING = "## Factors against each other"


def _comparisons(table: pd.DataFrame, settings: dict) -> list[dict]:
    """Each factor's values against each other (``medmem.study.factor_comparisons``)."""
    study = StudyConfig.from_dict(settings)
    return json.loads(factor_comparisons(table, study).to_json(orient="records"))


def _comparisons_md(comparisons: list[dict]) -> list[str]:
    if not comparisons:
        return []
    return [COMPARISONS_HEADING, "", comparisons_markdown(comparisons).strip(), ""]


def add_comparisons(record: dict) -> dict:
    """A published record with its factor comparisons computed from its rows, and its page
    (docs/results/study-<name>.md) with them as a section before the detector line: for
    records whose study folder is no longer at hand (the numbers are the record's own)."""
    table = pd.DataFrame(record["rows"]).rename(columns=OLD_COLUMN_NAMES)
    record = {**record, "comparisons": _comparisons(table, record["settings"])}
    page = DOCS / "results" / f"study-{record['name']}.md"
    if page.exists():
        lines = page.read_text().splitlines()
        at = next(i for i, x in enumerate(lines) if x.startswith("Shared detector:"))
        if COMPARISONS_HEADING in lines:  # replace the section written before
            start = lines.index(COMPARISONS_HEADING)
            del lines[start:at]
            at = start
        lines[at:at] = _comparisons_md(record["comparisons"])
        page.write_text("\n".join(lines) + "\n")
    return record


def write_record(record: dict) -> Path:
    """docs/results/study-<name>.json: the numbers of study-<name>.md, beside it."""
    path = DOCS / "results" / f"study-{record['name']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="finished study folders")
    parser.add_argument(
        "--split-only",
        action="store_true",
        help="only write study-<name>.json for every record already in docs/results/study.json",
    )
    parser.add_argument(
        "--comparisons-only",
        action="store_true",
        help="only add each factor's values against each other to every record in "
        "docs/results/study.json (and its page), from the record's own rows",
    )
    args = parser.parse_args()
    if args.split_only or args.comparisons_only:
        path = DOCS / "results" / "study.json"
        records = json.loads(path.read_text())
        if args.comparisons_only:
            records = [add_comparisons(r) for r in records]
            path.write_text(json.dumps(records, indent=2) + "\n")
        for r in records:
            print(f"{r['name']}: {len(r['rows'])} cells -> {write_record(r)}")
        return
    record = [publish(f) for f in args.folders]
    # study.json keeps the records of studies not published this time (matched by name)
    path = DOCS / "results" / "study.json"
    names = {r["name"] for r in record}
    kept = (
        [r for r in json.loads(path.read_text()) if r["name"] not in names] if path.exists() else []
    )
    path.write_text(json.dumps(kept + record, indent=2) + "\n")
    for r in record:
        print(f"{r['name']}: {len(r['rows'])} cells -> docs/results/study-{r['name']}.md")


if __name__ == "__main__":
    main()
