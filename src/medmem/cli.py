"""Command-line interface: a thin layer over the Python API.

Errors about inputs print one line and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from medmem import __version__
from medmem._errors import MedmemError, OutputExistsError

log = logging.getLogger("medmem")


class _Group(click.Group):
    """Turns medmem's errors into one clear line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedmemError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"medmem: error: {exc}", err=True)
            sys.exit(2)


def _size(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.lower().replace("x", ",").split(",") if v)
    except ValueError:
        raise click.BadParameter(
            f"expected sizes like 128,128 or 64x64x64, got {value!r}"
        ) from None
    if len(parts) not in (2, 3) or min(parts) < 1:
        raise click.BadParameter(f"expected 2 or 3 positive sizes, got {value!r}")
    return parts


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{out}: output folder exists. Choose another folder, or pass --overwrite."
        )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medmem")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or progress messages.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """medmem: find patient data memorized by generative models of medical images.

    \b
    Example:
      medmem demo --out demo-out
      medmem audit --train train/ --val val/ --synthetic synth/ --out audit/
    """
    ctx.ensure_object(dict)
    ctx.obj.update(quiet=quiet, debug=debug)
    if quiet:
        os.environ["MEDMEM_QUIET"] = "1"
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )


def _data_options(f: Any) -> Any:
    f = click.option(
        "--patient-id-pattern",
        default=None,
        help="Regular expression taking the patient id from file names, e.g. '^(\\d+)_' "
        "(named group 'patient' or group 1).",
    )(f)
    f = click.option(
        "--skip-unreadable",
        is_flag=True,
        help="Skip files that cannot be read (listed in summary.json) instead of stopping.",
    )(f)
    f = click.option(
        "--image-size", default=None, help="Preprocessed size, e.g. 128,128 or 64,64,64."
    )(f)
    f = click.option(
        "--spatial-dims",
        type=click.Choice(["2", "3"]),
        default=None,
        help="2 or 3 (default: detected from the files).",
    )(f)
    return f


def _detector_options(f: Any) -> Any:
    f = click.option("--epochs", type=int, default=None, help="Detector training epochs.")(f)
    f = click.option("--batch-size", type=int, default=None, help="Detector batch size K.")(f)
    f = click.option("--embed-dim", type=int, default=None, help="Embedding size.")(f)
    f = click.option("--lr", type=float, default=None, help="Learning rate.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(f)
    return f


def _overrides(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _load(
    src: str,
    opts: dict[str, Any],
    *,
    image_size: tuple[int, ...] | None = None,
    like: Any = None,
    option: str = "",
) -> Any:
    """Load one set; ``like`` (the training set) fixes spatial_dims and image_size."""
    from medmem.data import load_dataset

    dims = int(opts["spatial_dims"]) if opts["spatial_dims"] else None
    if like is not None:
        dims = dims or like.spatial_dims
        image_size = image_size or tuple(like.image_size)
    try:
        return load_dataset(
            src,
            spatial_dims=dims,
            image_size=image_size or _size(opts["image_size"]),
            patient_id_pattern=opts["patient_id_pattern"],
            skip_unreadable=opts["skip_unreadable"],
            quiet=bool(os.environ.get("MEDMEM_QUIET")),
        )
    except MedmemError as exc:
        if like is not None and "spatial_dims" in str(exc):
            raise type(exc)(
                f"{option}: the training images are {like.spatial_dims}D, so these must be "
                f"too (2D and 3D cannot be mixed). {exc}"
            ) from None
        raise


@main.command("train-detector")
@click.option("--train", "train_src", required=True, help="Training images: folder, glob or CSV.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Detector folder.")
@click.option(
    "--checkpoint-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoints every epoch; rerun with the same folder to resume after a kill.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@_data_options
@_detector_options
@click.pass_context
def train_detector(
    ctx: click.Context,
    train_src: str,
    out: Path,
    checkpoint_dir: Path | None,
    overwrite: bool,
    epochs: int | None,
    batch_size: int | None,
    embed_dim: int | None,
    lr: float | None,
    seed: int,
    **data_opts: Any,
) -> None:
    """Train the self-supervised copy detector (NT-Xent) on training images.

    \b
    Example:
      medmem train-detector --train data/train --out detector/ --epochs 30
    """
    from medmem.detector import Detector

    _check_out(out, overwrite)
    train = _load(train_src, data_opts)
    log.info(
        "training a %dD detector on %d images from %s", train.spatial_dims, len(train), train_src
    )
    det = Detector.train(
        train,
        checkpoint_dir=checkpoint_dir,
        quiet=ctx.obj["quiet"],
        **_overrides(
            spatial_dims=train.spatial_dims,
            image_size=tuple(train.image_size),
            epochs=epochs,
            batch_size=batch_size,
            embed_dim=embed_dim,
            lr=lr,
            seed=seed,
        ),
    )
    det.save(out)
    click.echo(f"detector saved to {out} (fingerprint {det.fingerprint[:12]})")


@main.command("audit")
@click.option("--train", "train_src", required=True, help="Training images: folder, glob or CSV.")
@click.option(
    "--val",
    "val_src",
    required=True,
    help="Validation images of patients not in training: folder, glob or CSV.",
)
@click.option("--synthetic", "syn_src", required=True, help="Synthetic images to audit.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--detector",
    "detector_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A trained detector folder (default: train one on --train).",
)
@click.option(
    "--percentile",
    type=float,
    default=95.0,
    show_default=True,
    help="tau = this percentile of train->nearest-validation correlations.",
)
@click.option(
    "--allow-patient-overlap",
    is_flag=True,
    help="Allow patients in both --train and --val (normally an error).",
)
@click.option(
    "--n-bootstrap",
    type=int,
    default=1000,
    show_default=True,
    help="Bootstrap replicates for the 95% intervals.",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Cache embeddings here (by detector and file content).",
)
@click.option(
    "--n-controls",
    type=int,
    default=100,
    show_default=True,
    help="Positive controls: varied copies of training images whose catch rate "
    "at tau is reported as the measured sensitivity.",
)
@click.option("--no-controls", is_flag=True, help="Skip the positive controls.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@_data_options
@_detector_options
@click.pass_context
def audit_cmd(
    ctx: click.Context,
    train_src: str,
    val_src: str,
    syn_src: str,
    out: Path,
    detector_dir: Path | None,
    percentile: float,
    allow_patient_overlap: bool,
    n_bootstrap: int,
    cache_dir: Path | None,
    n_controls: int,
    no_controls: bool,
    overwrite: bool,
    epochs: int | None,
    batch_size: int | None,
    embed_dim: int | None,
    lr: float | None,
    seed: int,
    **data_opts: Any,
) -> None:
    """Audit synthetic images for copies of training images.

    Calibrates tau on the validation set (patients not in training), then writes
    summary.json, training.csv, synthetic.csv and figures to --out.

    \b
    Example:
      medmem audit --train train/ --val val/ --synthetic synth/ --out audit/
      medmem audit --train train.csv --val val.csv --synthetic 'samples/*.png' \\
          --detector detector/ --out audit/ --patient-id-pattern '^(\\d+)_'
    """
    from medmem.audit import audit, format_verdict
    from medmem.detector import Detector

    _check_out(out, overwrite)
    detector = Detector.load(detector_dir) if detector_dir else None
    size = tuple(detector.config.image_size) if detector is not None else None
    train = _load(train_src, data_opts, image_size=size)
    val = _load(val_src, data_opts, image_size=size, like=train, option="--val")
    syn = _load(syn_src, data_opts, image_size=size, like=train, option="--synthetic")
    result = audit(
        train,
        val,
        syn,
        detector=detector,
        percentile=percentile,
        allow_patient_overlap=allow_patient_overlap,
        n_bootstrap=n_bootstrap,
        seed=seed,
        cache_dir=cache_dir,
        n_controls=0 if no_controls else n_controls,
        quiet=ctx.obj["quiet"],
        detector_overrides=_overrides(
            epochs=epochs, batch_size=batch_size, embed_dim=embed_dim, lr=lr, seed=seed
        ),
    )
    result.save(out, overwrite=overwrite)
    click.echo(format_verdict(result.summary))
    click.echo(f"results in {out}")


@main.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Folder for the demo's data and results.",
)
@click.option(
    "--spatial-dims",
    type=click.Choice(["2", "3"]),
    default="2",
    show_default=True,
    help="2D chest-radiograph-like phantoms or 3D volumes.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.pass_context
def demo_cmd(ctx: click.Context, out: Path, spatial_dims: str, seed: int, overwrite: bool) -> None:
    """Run the whole pipeline on built-in phantom data with known copies.

    Writes phantom training/validation sets (PNG, DICOM, NIfTI) and a synthetic set of
    novel phantoms plus known copies and variations of training images, trains a detector,
    audits, and reports how many known copies were recovered.

    \b
    Example:
      medmem demo --out demo-out
    """
    from medmem.demo import run_demo

    _check_out(out, overwrite)
    report = run_demo(
        out, spatial_dims=int(spatial_dims), seed=seed, overwrite=overwrite, quiet=ctx.obj["quiet"]
    )
    click.echo(report)


if __name__ == "__main__":  # pragma: no cover
    main()
