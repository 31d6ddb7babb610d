"""Record the cells of study configs that have not been run yet, for docs/results/study.md.

    python -m benchmarks.study_plans configs/study/nih-cxr-cpu.yaml configs/study/ixi-3d-cpu.yaml

Writes docs/results/study-plans.json: per config its settings (``StudyConfig.to_dict``), the
cells in run order (key, model, n_train, iterations of the last stage and of every stage,
augment, seed, control) and the counts of cells and of training runs. Plans only: nothing
is trained. A config whose baseline uses every available image reads its data to count them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from medmem.study import load_study, plan

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "study-plans.json"


def _relative(settings: dict) -> dict:
    """The data paths relative to the project root (load_study makes them absolute)."""
    data = settings["generative"].get("data", {})
    for key in ("train", "val"):
        if isinstance(data.get(key), str) and Path(data[key]).is_absolute():
            data[key] = os.path.relpath(data[key], ROOT)
    return settings


def record(path: Path) -> dict:
    study = load_study(path)
    cells = plan(study)
    return {
        "config": path.resolve().relative_to(ROOT).as_posix(),
        "command": f"medmem study {path.resolve().relative_to(ROOT).as_posix()} --plan",
        "settings": _relative(study.to_dict()),
        "n_cells": len(cells),
        "n_main_cells": sum(not c.control for c in cells),
        "n_control_cells": sum(c.control for c in cells),
        "n_training_runs": len({c.run_key for c in cells}),
        "cells": [
            {
                "key": c.key,
                "model": c.model,
                "n_train": c.n_train,
                "iterations": c.iterations,
                "stage_iterations": {
                    s: c.config.stage_settings(s).iterations for s in c.config.stages
                },
                "augment": c.augment,
                "seed": c.seed,
                "control": c.control,
                "run": c.run_key,
            }
            for c in cells
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path, help="study configs (YAML)")
    args = parser.parse_args()
    records = [record(p) for p in args.configs]
    OUT.write_text(json.dumps({"plans": records}, indent=2) + "\n")
    for r in records:
        print(f"{r['config']}: {r['n_cells']} cells in {r['n_training_runs']} training runs")
    print(f"-> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
