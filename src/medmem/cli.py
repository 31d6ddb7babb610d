"""Command-line interface: a thin layer over the Python API.

Errors about inputs print one line and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from medmem import __version__
from medmem._errors import MedmemError

log = logging.getLogger("medmem")


# Python argument names in the API's messages, as the CLI spells them.
_CLI_NAMES = (
    (re.compile(r" \((overwrite|resume|force|drop_nonimages|drop_identifying)=True\)"), ""),
    (re.compile(r"\bpass (\w+)=True\b"), lambda m: f"pass --{m.group(1).replace('_', '-')}"),
    (re.compile(r"\bskip_unreadable=True\b"), "--skip-unreadable"),
    (re.compile(r"\bpatient_id_pattern\b"), "--patient-id-pattern"),
    (re.compile(r"\bspatial_dims=(\d)"), r"--spatial-dims \1"),
    (re.compile(r" \(path_column=, patient_column=\)"), ""),
)


def cli_message(text: str) -> str:
    """An API error message with Python argument names replaced by the CLI's flags."""
    for rx, repl in _CLI_NAMES:
        text = rx.sub(repl, text)
    return text


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """``warnings.formatwarning`` of the CLI: logs the warning as one line (flags as the
    CLI spells them, no source file or code line) and leaves nothing else to print.

    Installed as the formatter rather than ``showwarning`` so that code recording warnings
    (``warnings.catch_warnings(record=True)``, ``pytest.warns``) still gets them."""
    text = " ".join(str(message).split())
    log.warning("medmem: warning: %s", cli_message(text))
    return ""


class _Group(click.Group):
    """Turns medmem's errors into one clear line (naming CLI flags) and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedmemError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"medmem: error: {cli_message(str(exc))}", err=True)
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


_AUDIT_BYTES = 64 << 20  # an audit's tables, figures and report (medmem._io.MIN_FREE_BYTES)


def _is_writer() -> bool:
    """False on torchrun ranks other than 0: they compute alongside rank 0, write nothing."""
    return int(os.environ.get("RANK", "0")) == 0


def _claim(
    ctx: click.Context,
    out: Path,
    overwrite: bool = False,
    *,
    inputs: Any = (),
    keep: Any = (),
    resume: bool = False,
    kind: str = "folder",
    need_bytes: int | None = None,
    shared: bool = False,
) -> None:
    """Claim ``--out`` for the whole command, before any work (medmem._io.claim_output):
    not an input, writable, not being written by another medmem run (``shared``: joining
    one). ``inputs`` are image sources (``--out`` may not be, hold or lie in them); ``keep``
    are folders read whole (a model, a detector, a cache: ``--out`` may not be or hold
    them). Under torchrun only rank 0 claims (and writes)."""
    if not _is_writer():
        return
    from medmem._io import claim_output
    from medmem.data._sources import input_roots

    claim = claim_output(
        out,
        inputs=input_roots(list(inputs)) + [(Path(p), False) for p in keep if p is not None],
        overwrite=overwrite,
        resume=resume,
        flag="--out",
        kind=kind,
        need_bytes=need_bytes,
        shared=shared,
    )
    ctx.with_resource(claim)


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
    # the flag reaches each command through ctx.obj and then the API's quiet= arguments;
    # the process environment is left alone
    ctx.obj.update(quiet=quiet, debug=debug)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        from medmem._distributed import init_from_env

        init_from_env()
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    warnings.formatwarning = _log_warning  # one logged line, not file:line + code


def _data_options(f: Any) -> Any:
    f = click.option(
        "--patient-id-pattern",
        default=None,
        help="Regular expression taking the patient id from file names, e.g. '^(\\d+)_' "
        "(named group 'patient' or group 1); training and validation images only.",
    )(f)
    f = click.option(
        "--patient-column",
        default=None,
        help="CSV manifests: the patient-id column (default 'patient_id', else 'Patient ID', "
        "'patient' or 'subject_id').",
    )(f)
    f = click.option(
        "--path-column",
        default=None,
        help="CSV manifests: the image column (default 'path', else 'file', 'filename', "
        "'image' or 'Image Index').",
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
    f = click.option(
        "--spatial-mode",
        type=click.Choice(["resample", "crop"]),
        default="resample",
        show_default=True,
        help="How images reach --image-size: 'resample' keeps the whole field of view; "
        "'crop' centre-crops or pads (voxel size kept, anatomy outside the crop lost).",
    )(f)
    return f


def _detector_options(f: Any) -> Any:
    f = click.option("--epochs", type=int, default=None, help="Detector training epochs.")(f)
    f = click.option("--batch-size", type=int, default=None, help="Detector batch size K.")(f)
    f = click.option("--embed-dim", type=int, default=None, help="Embedding size.")(f)
    f = click.option("--lr", type=float, default=None, help="Learning rate.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(f)
    f = click.option(
        "--arch",
        type=click.Choice(["resnet", "conv"]),
        default=None,
        help="Detector encoder: 'resnet' (default, 2D and 3D) or 'conv' (the paper's 3D one).",
    )(f)
    f = click.option(
        "--variations",
        default=None,
        help="Training variations of the detector: 'default' (broad: geometry, intensity, "
        "resolution, blends), 'paper' (flip, rotate, contrast), 'all', or kinds separated by "
        "commas, e.g. flip,rotate,zoom.",
    )(f)
    f = click.option(
        "--input-size",
        default=None,
        help="Size the detector works at, e.g. 64,64 (default: each side of --image-size "
        "capped at 64 in 2D, 32 in 3D).",
    )(f)
    f = click.option(
        "--no-early-stopping",
        is_flag=True,
        help="Train all --epochs instead of stopping when copy retrieval saturates.",
    )(f)
    return f


def _overrides(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _detector_settings(opts: dict[str, Any]) -> dict[str, Any]:
    """DetectorConfig overrides from the detector options (taken out of ``opts``)."""
    from medmem.detector import VariationConfig

    arch = opts.pop("arch", None)
    variations = opts.pop("variations", None)
    input_size = _size(opts.pop("input_size", None))
    no_early = opts.pop("no_early_stopping", False)
    out = _overrides(arch=arch, input_size=input_size)
    if variations is not None:
        try:
            out["variations"] = VariationConfig.preset(variations)
        except MedmemError as exc:
            raise click.BadParameter(str(exc), param_hint="--variations") from None
    if no_early:
        out["early_stopping"] = False
    return out


def _load(
    src: str,
    opts: dict[str, Any],
    *,
    image_size: tuple[int, ...] | None = None,
    like: Any = None,
    option: str = "",
    quiet: bool,
) -> Any:
    """Load one set; ``like`` (the training set) fixes spatial_dims and image_size."""
    from medmem.data import load_dataset

    dims = int(opts["spatial_dims"]) if opts["spatial_dims"] else None
    if like is not None:
        dims = dims or like.spatial_dims
        image_size = image_size or tuple(like.image_size)
    # patient ids matter for training and validation (the overlap check); synthetic file
    # names are the generator's and need not follow the pattern
    pattern = None if option in ("--synthetic", "--null-synthetic") else opts["patient_id_pattern"]
    try:
        return load_dataset(
            src,
            spatial_dims=dims,
            image_size=image_size or _size(opts["image_size"]),
            patient_id_pattern=pattern,
            path_column=opts.get("path_column"),
            patient_column=opts.get("patient_column"),
            skip_unreadable=opts["skip_unreadable"],
            quiet=quiet,
            spatial_mode=opts.get("spatial_mode") or "resample",
        )
    except MedmemError as exc:
        if like is not None and "spatial_dims" in str(exc):
            raise type(exc)(
                f"{option}: the training images are {like.spatial_dims}D, so these must be "
                f"too (2D and 3D cannot be mixed). {exc}"
            ) from None
        raise


def _load_for_detector(
    src: str, opts: dict[str, Any], detector: Any, detector_dir: Path | None, *, quiet: bool
) -> Any:
    """Load the training set at the detector's image size; a detector made for the other
    dimensionality is named (the size alone would not say why)."""
    if detector is None:
        return _load(src, opts, quiet=quiet)
    cfg = detector.config
    try:
        return _load(src, opts, image_size=tuple(cfg.image_size), quiet=quiet)
    except MedmemError as exc:
        if "image_size" not in str(exc):
            raise
        raise type(exc)(
            f"--detector {detector_dir}: is for {cfg.spatial_dims}D images of size "
            f"{tuple(cfg.image_size)}, which the images of --train {src} cannot be ({exc}). Use "
            "a detector trained on such images, or leave --detector out to train one."
        ) from None


def _warn_ignored_with_detector(
    detector_dir: Path | None, size: Any, opts: dict[str, Any], training: dict[str, Any]
) -> None:
    """Say which options a given --detector overrides (they would otherwise pass silently)."""
    wanted = _size(opts.get("image_size"))
    if wanted is not None and tuple(wanted) != tuple(size):
        log.warning(
            "medmem: warning: --image-size %s is ignored: the images are preprocessed to the "
            "detector's image size %s (--detector %s). Leave --image-size out, or train a "
            "detector at that size.",
            ",".join(map(str, wanted)),
            ",".join(map(str, size)),
            detector_dir,
        )
    if training:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(training))
        log.warning(
            "medmem: warning: %s ignored: --detector %s is already trained. Leave them out, "
            "or leave --detector out to train a detector with them.",
            flags,
            detector_dir,
        )


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
@click.option(
    "--objective",
    type=click.Choice(["copy", "identity"]),
    default="copy",
    show_default=True,
    help="'copy': an image and its variation are positives (the paper); 'identity': images "
    "of the same patient are positives (needs patient ids, e.g. --patient-id-pattern); for "
    "audit --identity-detector.",
)
@_data_options
@_detector_options
@click.pass_context
def train_detector(
    ctx: click.Context,
    train_src: str,
    out: Path,
    checkpoint_dir: Path | None,
    overwrite: bool,
    objective: str,
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
      medmem train-detector --train data/train --out id-detector/ --objective identity \\
          --patient-id-pattern '^(\\d+)_'
    """
    from medmem.detector import Detector

    _claim(ctx, out, overwrite, inputs=[train_src], keep=[checkpoint_dir])
    settings = _detector_settings(data_opts)
    train = _load(train_src, data_opts, quiet=ctx.obj["quiet"])
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
        objective=objective,
        **settings,
    )
    if not _is_writer():
        return
    from medmem._io import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:  # a kill -9 never leaves half a detector
        det.save(tmp, overwrite=True)
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
@click.option(
    "--null-synthetic",
    "null_src",
    default=None,
    help="Images sampled from a generator that never saw the training set (e.g. trained on "
    "other patients): scored like --synthetic; their share above tau gives the copies a "
    "non-memorizing generator would produce (summary.json null_synthetic).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--detector",
    "detector_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A trained detector folder (default: train one on --train).",
)
@click.option(
    "--identity-detector",
    "identity_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A detector trained with --objective identity: adds the identity section (nearest "
    "training patient per synthetic image, calibrated identity threshold); needs training "
    "patient ids.",
)
@click.option(
    "--percentile",
    type=float,
    default=95.0,
    show_default=True,
    help="Nominal rate: novel images are called copies with probability (100 - this)/100 "
    "(conformal calibration); with --calibration paper, tau = this percentile of "
    "train->nearest-validation correlations.",
)
@click.option(
    "--calibration",
    type=click.Choice(["conformal", "conservative", "paper"]),
    default="conformal",
    show_default=True,
    help="How tau (copies) and tau_mem (memorized) are set, with alpha = (100 - "
    "--percentile)/100. conformal: novel images exchangeable with the validation images are "
    "called copies with probability about alpha (within 1/(n_val + 1)) whatever the set "
    "sizes; conservative: at most alpha; paper: the paper's tau (percentile of "
    "train->nearest-val correlations), no such guarantee (novel images cross it more often "
    "when --val is smaller than --train). The paper's tau and counts are always reported.",
)
@click.option(
    "--score",
    type=click.Choice(["aligned", "embedding"]),
    default="aligned",
    show_default=True,
    help="How a synthetic (or validation) image is scored against a training image. aligned: "
    "the detector's embeddings pick the candidate training images, then each pair is "
    "scored by its normalized cross-correlation after the best alignment (flips, rotations, "
    "zooms, shifts), tile by tile, minus half its correlation with other candidates (its "
    "background); catches shifted, zoomed and partly replaced copies. "
    "embedding: the correlation of the detector's embeddings alone, as the paper.",
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
    null_src: str | None,
    out: Path,
    detector_dir: Path | None,
    identity_dir: Path | None,
    percentile: float,
    calibration: str,
    score: str,
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
    from medmem._audit import audit, check_audit_args, format_verdict
    from medmem._resume import remove_resume, resume_root
    from medmem.detector import Detector

    quiet = ctx.obj["quiet"]
    # the API's own checks, before any dataset (or the detector) is read
    check_audit_args(
        percentile=percentile,
        calibration=calibration,
        n_bootstrap=n_bootstrap,
        seed=seed,
        n_controls=0 if no_controls else n_controls,
        score=score,
    )
    _claim(
        ctx,
        out,
        overwrite,
        inputs=[train_src, val_src, syn_src] + ([null_src] if null_src else []),
        keep=[detector_dir, cache_dir, identity_dir],
        need_bytes=_AUDIT_BYTES if detector_dir else 2 * _AUDIT_BYTES,  # + detector, checkpoint
    )
    settings = _detector_settings(data_opts)
    detector = Detector.load(detector_dir) if detector_dir else None
    identity_detector = Detector.load(identity_dir) if identity_dir else None
    size = tuple(detector.config.image_size) if detector is not None else None
    if detector is not None:
        _warn_ignored_with_detector(
            detector_dir,
            size,
            data_opts,
            _overrides(epochs=epochs, batch_size=batch_size, embed_dim=embed_dim, lr=lr) | settings,
        )
    train = _load_for_detector(train_src, data_opts, detector, detector_dir, quiet=quiet)
    val = _load(val_src, data_opts, image_size=size, like=train, option="--val", quiet=quiet)
    syn = _load(syn_src, data_opts, image_size=size, like=train, option="--synthetic", quiet=quiet)
    null = (
        None
        if null_src is None
        else _load(
            null_src, data_opts, image_size=size, like=train, option="--null-synthetic", quiet=quiet
        )
    )
    result = audit(
        train,
        val,
        syn,
        detector=detector,
        percentile=percentile,
        calibration=calibration,
        allow_patient_overlap=allow_patient_overlap,
        n_bootstrap=n_bootstrap,
        seed=seed,
        cache_dir=cache_dir,
        n_controls=0 if no_controls else n_controls,
        quiet=quiet,
        detector_overrides=_overrides(
            epochs=epochs, batch_size=batch_size, embed_dim=embed_dim, lr=lr, seed=seed
        )
        | settings,
        checkpoint_dir=None if detector is not None else resume_root(out),
        score=score,
        identity_detector=identity_detector,
        null_synthetic=null,
    )
    if not _is_writer():
        return
    result.save(out, overwrite=overwrite)
    remove_resume(out)
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

    _claim(ctx, out, overwrite)
    report = run_demo(
        out, spatial_dims=int(spatial_dims), seed=seed, overwrite=overwrite, quiet=ctx.obj["quiet"]
    )
    click.echo(report)


@main.command("label")
@click.option(
    "--audit", "audit_dir", required=True, type=click.Path(path_type=Path), help="Audit folder."
)
@click.option(
    "--n", "n", type=int, default=100, show_default=True, help="Pairs to label (drawn around tau)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the draw.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="The page to write (default: AUDIT/labels.html); pairs.csv is written beside it.",
)
@click.option("--train", "train_src", default=None, help="Training images (default: the audit's).")
@click.option(
    "--synthetic", "syn_src", default=None, help="Synthetic images (default: the audit's)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing page and pairs.csv.")
@click.pass_context
def label_cmd(
    ctx: click.Context,
    audit_dir: Path,
    n: int,
    seed: int,
    out: Path | None,
    train_src: str | None,
    syn_src: str | None,
    overwrite: bool,
) -> None:
    """Write a blind page to label training / nearest-synthetic pairs as copy or novel.

    The page (one HTML file, works offline) shows --n pairs drawn around tau, without
    correlations or verdicts; save labels.csv from it, then run `medmem validate`.

    \b
    Example:
      medmem label --audit audit/ --n 100
      medmem validate --audit audit/ --labels ~/Downloads/labels.csv
    """
    from medmem.label import make_labeling_page

    out = out if out is not None else audit_dir / "labels.html"
    _claim(ctx, out, overwrite, inputs=[train_src, syn_src], resume=True, kind="file")
    page = make_labeling_page(
        audit_dir,
        out,
        n=n,
        seed=seed,
        train=train_src,
        synthetic=syn_src,
        overwrite=overwrite,
        quiet=ctx.obj["quiet"],
    )
    click.echo(f"labelling page: {page} (open it in a browser); pairs: {page.parent / 'pairs.csv'}")


@main.command("validate")
@click.option(
    "--audit", "audit_dir", required=True, type=click.Path(path_type=Path), help="Audit folder."
)
@click.option(
    "--labels",
    "labels_csv",
    required=True,
    type=click.Path(path_type=Path),
    help="labels.csv saved from the labelling page.",
)
@click.option(
    "--pairs",
    "pairs_csv",
    type=click.Path(path_type=Path),
    default=None,
    help="pairs.csv written beside the page (default: AUDIT/pairs.csv, else beside --labels).",
)
def validate_cmd(audit_dir: Path, labels_csv: Path, pairs_csv: Path | None) -> None:
    """Compare human copy/novel labels with the audit's verdicts (sensitivity, specificity).

    Human "copy" is positive, "novel" negative, "unsure" excluded; writes
    AUDIT/validation.json.

    \b
    Example:
      medmem validate --audit audit/ --labels ~/Downloads/labels.csv
    """
    from medmem.label import format_validation, validate

    result = validate(audit_dir, labels_csv, pairs_csv=pairs_csv)
    click.echo(format_validation(result))
    click.echo(f"written to {Path(audit_dir) / 'validation.json'}")


@main.command("quality")
@click.option(
    "--real", "real_src", required=True, help="Real images (e.g. validation): folder, glob or CSV."
)
@click.option("--synthetic", "syn_src", required=True, help="Synthetic images to measure.")
@click.option(
    "--detector",
    "detector_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Features from this trained detector folder (e.g. the audit's detector).",
)
@click.option(
    "--extractor",
    "extractor_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Features from a TorchScript file (torch.jit.save) or a torch.export .pt2 file.",
)
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write JSON here."
)
@click.option("--k", type=int, default=5, show_default=True, help="k of precision/recall.")
@click.option("--n-pairs", type=int, default=None, help="MS-SSIM pairs (default: one per image).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per batch.")
@click.option(
    "--epochs",
    type=int,
    default=20,
    show_default=True,
    help="Epochs of the detector trained on --real when no --detector/--extractor is given.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@_data_options
@click.pass_context
def quality_cmd(
    ctx: click.Context,
    real_src: str,
    syn_src: str,
    detector_dir: Path | None,
    extractor_file: Path | None,
    json_out: Path | None,
    k: int,
    n_pairs: int | None,
    batch_size: int,
    epochs: int,
    seed: int,
    **data_opts: Any,
) -> None:
    """FID, precision/recall, density/coverage and MS-SSIM diversity of synthetic images.

    Features come from --detector (best: the audit's own detector, so the numbers live in
    the audit's feature space) or --extractor; with neither, a detector is trained on
    --real first (and the output says so). MS-SSIM is reported for both sets.

    \b
    Example:
      medmem quality --real val/ --synthetic synth/ --detector audit-detector/
      medmem quality --real val/ --synthetic synth/ --extractor radimagenet.pt --json q.json
    """
    from medmem._io import atomic_write_json
    from medmem.detector import Detector
    from medmem.metrics import format_quality, quality

    if detector_dir is not None and extractor_file is not None:
        raise click.UsageError("give --detector or --extractor, not both.")
    extractor: Any = None
    size = None
    if detector_dir is not None:
        extractor = Detector.load(detector_dir)
        size = tuple(extractor.config.image_size)
    elif extractor_file is not None:
        extractor = str(extractor_file)
    quiet = ctx.obj["quiet"]
    real = _load(real_src, data_opts, image_size=size, quiet=quiet)
    syn = _load(syn_src, data_opts, image_size=size, like=real, option="--synthetic", quiet=quiet)
    if extractor is None:
        log.warning(
            "no --detector or --extractor: training a detector on the %d --real images "
            "(%d epochs) as the feature extractor. Pass --detector (e.g. the audit's) to "
            "measure in the audit's feature space.",
            len(real),
            epochs,
        )
    q = quality(
        real,
        syn,
        extractor=extractor,
        k=k,
        n_pairs=n_pairs,
        seed=seed,
        batch_size=batch_size,
        detector_overrides={"epochs": epochs},
        quiet=ctx.obj["quiet"],
    )
    click.echo(format_quality(q))
    if json_out is not None:
        atomic_write_json(json_out, q)
        click.echo(f"written to {json_out}")


@main.command("screen")
@click.option(
    "--audit",
    "audit_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The --out folder of `medmem audit`.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Release folder.")
@click.option(
    "--synthetic",
    "syn_src",
    default=None,
    help="The audited synthetic images (default: the source recorded in summary.json).",
)
@click.option(
    "--margin",
    type=float,
    default=0.0,
    show_default=True,
    help="Also withhold images whose nearest_train_corr is within this margin below tau.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option(
    "--drop-nonimages",
    is_flag=True,
    help="Leave out (and count) files that are not generator images, e.g. an earlier "
    "audit's gallery.png, instead of refusing.",
)
@click.option(
    "--drop-identifying",
    is_flag=True,
    help="Leave out (and count) files whose metadata or bytes identify a training or "
    "validation patient, instead of refusing.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Screen even when the audit's measured control sensitivity is below 0.8 "
    "(a near-blind detector).",
)
@click.option(
    "--drop",
    "drop",
    multiple=True,
    type=click.Choice(["identity"]),
    help="Withhold also these verdicts: 'identity' = synthetic images that re-identify a "
    "training patient (an audit with --identity-detector).",
)
@click.pass_context
def screen_cmd(
    ctx: click.Context,
    audit_dir: Path,
    out: Path,
    syn_src: str | None,
    margin: float,
    overwrite: bool,
    drop_nonimages: bool,
    drop_identifying: bool,
    force: bool,
    drop: tuple[str, ...],
) -> None:
    """Write the release set: the audited synthetic images that are not copies.

    Writes the synthetic files with nearest_train_corr < tau - margin into --out,
    de-identified in their own formats (DICOM: PS3.15 Basic Application Level
    Confidentiality Profile; PNG/JPEG/TIFF: no text, EXIF or XMP; NIfTI: no description
    or extensions), with release_manifest.csv and README.txt. Nothing written names a
    training image or patient. Refuses synthetic images that differ from the audited
    ones, files that are not generator images and files that identify a patient.

    \b
    Example:
      medmem screen --audit audit/ --out release/
      medmem screen --audit audit/ --out release/ --synthetic synth/ --margin 0.02
    """
    from medmem.screen import screen

    _claim(ctx, out, overwrite, inputs=[audit_dir, syn_src])
    result = screen(
        audit_dir,
        out,
        synthetic=syn_src,
        margin=margin,
        overwrite=overwrite,
        quiet=ctx.obj["quiet"],
        drop_nonimages=drop_nonimages,
        drop_identifying=drop_identifying,
        force=force,
        drop=drop,
    )
    click.echo(str(result))


@main.command("study")
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Study folder (default: runs/study-<config name>). Run again to resume.",
)
@click.option("--cell", "cells", multiple=True, help="Run only this cell (repeatable).")
@click.option("--plan", "show_plan", is_flag=True, help="List the cells and exit.")
@click.option(
    "--join",
    is_flag=True,
    help="Run beside another `medmem study` of the same config on the same --out (another "
    "CPU core, another GPU): take the cells no other process is running (each cell is "
    "locked on its own).",
)
@click.pass_context
def study_cmd(
    ctx: click.Context,
    config_path: Path,
    out: Path | None,
    cells: tuple[str, ...],
    show_plan: bool,
    join: bool,
) -> None:
    """Reproduce the paper's factor experiments (model type, size, augmentation, training
    iterations, training-set size) on your data: one generator per cell, audited with one
    shared detector; writes results.csv/.md and figures/.

    Stopped and started again with the same --out, it skips the finished cells.

    \b
    Example:
      medmem study configs/study/nih-cxr-cpu.yaml --out runs/study-nih-cxr
      medmem study configs/study/nih-cxr-cpu.yaml --out runs/study-nih-cxr --join  # 2nd core
      medmem study configs/study/nih-cxr-cpu.yaml --plan
    """
    from medmem.study import load_study, plan, run_study

    study = load_study(config_path)
    if show_plan:
        for cell in plan(study):
            click.echo(cell.key)
        return
    out = out if out is not None else Path("runs") / f"study-{config_path.name.split('.')[0]}"
    _claim(ctx, out, resume=True, inputs=[config_path], shared=join)
    result = run_study(study, out, only=list(cells) or None, quiet=ctx.obj["quiet"], join=join)
    click.echo(
        f"study {study.name}: {len(result.computed)} cells computed, {len(result.skipped)} "
        f"reused; table: {out / 'results.md'}; figures: {out / 'figures'}"
    )


@main.group("generate", cls=_Group)
def generate_group() -> None:
    """Train generative models (2D/3D latent diffusion, VAE, GAN) and sample from them.

    \b
    Example:
      medmem generate train --config configs/generative/ldm-2d-cpu.yaml --out runs/ldm-2d
      medmem generate sample --model runs/ldm-2d --n 100 --out synth/
      medmem audit --train TRAIN --val VAL --synthetic synth/manifest.csv --out audit/
    """


@generate_group.command("train")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="YAML config (see configs/generative/).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run folder (default: runs/<config name>).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: the config's).")
@click.pass_context
def generate_train_cmd(
    ctx: click.Context, config_path: Path, out: Path | None, resume: bool, device: str | None
) -> None:
    """Train the model a YAML config describes; writes checkpoints, losses.csv, model/.

    Training is seeded and resumes exactly after a kill (--resume). With a `tracking`
    section, memorization is audited at chosen iterations (tracking.csv, tracking.png).
    Under torchrun, each process trains on its share of every batch (DDP).

    \b
    Example:
      medmem generate train --config configs/generative/ldm-2d-cpu.yaml --out runs/ldm-2d
      medmem generate train --config configs/generative/ldm-2d-cpu.yaml --out runs/ldm-2d --resume
    """
    from medmem.generative import load_config, train

    config = load_config(config_path)
    out = out if out is not None else Path("runs") / config_path.name.split(".")[0]
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun, rank 0 writes
        data = config.data
        sources = [data.train, data.val] if data.source == "files" else []
        _claim(ctx, out, resume=True, inputs=[config_path, *sources])
    result = train(config, out, resume=resume, device=device, quiet=ctx.obj["quiet"])
    spi = ", ".join(f"{k} {v:.3f} s/it" for k, v in result.seconds_per_iteration.items())
    click.echo(f"trained {config.model} -> {out / 'model'} ({spi})")


@generate_group.command("sample")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Saved model folder, or a training run folder.",
)
@click.option("--n", "n", required=True, type=int, help="Number of images.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--steps", type=int, default=None, help="Denoising steps (LDM; default: config's).")
@click.option(
    "--sampler",
    type=click.Choice(["ddpm", "ddim"]),
    default=None,
    help="LDM sampler (default: the config's).",
)
@click.option("--batch-size", type=int, default=None, help="Images per batch.")
@click.option("--device", default=None, help="cpu, cuda... (default: CUDA when present).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.pass_context
def generate_sample_cmd(
    ctx: click.Context,
    model_dir: Path,
    n: int,
    out: Path,
    seed: int,
    steps: int | None,
    sampler: str | None,
    batch_size: int | None,
    device: str | None,
    overwrite: bool,
) -> None:
    """Sample images: 16-bit PNG (2D) or NIfTI (3D) plus manifest.csv for `medmem audit`.

    \b
    Example:
      medmem generate sample --model runs/ldm-2d --n 100 --out synth/ --sampler ddim --steps 50
    """
    from medmem.generative import GenerativeModel, write_samples

    _claim(ctx, out, overwrite, keep=[model_dir])
    model = GenerativeModel.load(model_dir, device=device)
    images = model.sample(
        n, seed=seed, steps=steps, sampler=sampler, batch_size=batch_size, quiet=ctx.obj["quiet"]
    )
    write_samples(images, out)
    click.echo(f"wrote {n} samples to {out} (manifest: {out / 'manifest.csv'})")


@main.group("prompts", cls=_Group)
def prompts_group() -> None:
    """Text-to-image memorization: train a text-conditional LDM on (image, report) pairs,
    score prompts (d_t, attention entropy), rank tokens, measure mitigations.

    \b
    Example:
      medmem prompts train --config configs/text2image/ldm-t2i-cpu.yaml --out runs/t2i
      medmem prompts score --model runs/t2i --prompts prompts.csv --out runs/t2i-scores
      medmem prompts mitigate --model runs/t2i --prompts prompts.csv --out runs/t2i-mitigate
    """


@prompts_group.command("train")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="YAML config (see configs/text2image/).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.pass_context
def prompts_train_cmd(ctx: click.Context, config_path: Path, out: Path, resume: bool) -> None:
    """Train the text-to-image LDM of a YAML config (a CSV of image paths and report texts,
    a saved KL autoencoder, a frozen text encoder); writes checkpoints, losses.csv, model/.

    \b
    Example:
      medmem prompts train --config configs/text2image/ldm-t2i-cpu.yaml --out runs/t2i
    """
    from medmem.text2image import load_t2i_config, train_t2i

    _claim(ctx, out, resume=True, inputs=[config_path])
    result = train_t2i(load_t2i_config(config_path), out, resume=resume, quiet=ctx.obj["quiet"])
    click.echo(
        f"trained text-to-image LDM -> {out / 'model'} ({result.seconds_per_iteration:.3f} s/it)"
    )


def _prompts_inputs(model_dir: Path, prompts_csv: Path, text_column: str) -> tuple[Any, Any]:
    from medmem.text2image import TextToImageModel, read_prompts

    return TextToImageModel.load(model_dir), read_prompts(prompts_csv, text_column=text_column)


_model_option = click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Saved text-to-image model, or its training run folder.",
)
_prompts_option = click.option(
    "--prompts",
    "prompts_csv",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV with a prompt per row (column 'text'; optional boolean 'memorized').",
)


@prompts_group.command("score")
@_model_option
@_prompts_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--text-column", default="text", show_default=True, help="Prompt column.")
@click.option(
    "--n-per-prompt", type=int, default=4, show_default=True, help="Generations per prompt."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--steps", type=int, default=None, help="DDIM steps (default: the model's).")
@click.option(
    "--flag-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Share of prompts flagged (highest first-step d_t).",
)
@click.option("--no-tokens", is_flag=True, help="Skip the token attribution.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.pass_context
def prompts_score_cmd(
    ctx: click.Context,
    model_dir: Path,
    prompts_csv: Path,
    out: Path,
    text_column: str,
    n_per_prompt: int,
    seed: int,
    steps: int | None,
    flag_fraction: float,
    no_tokens: bool,
    overwrite: bool,
) -> None:
    """Rank prompts by memorization (d_t, Wen et al.; attention entropy, Ren et al.) and
    their tokens by the gradient of d_t; writes prompts-ranked.csv, tokens-*.csv, figures,
    report.html and summary.json (detection AUROC when a 'memorized' column is given).

    \b
    Example:
      medmem prompts score --model runs/t2i --prompts prompts.csv --out runs/t2i-scores
    """
    from medmem.text2image import score_prompts

    _claim(ctx, out, overwrite, inputs=[prompts_csv], keep=[model_dir])
    model, prompts = _prompts_inputs(model_dir, prompts_csv, text_column)
    summary = score_prompts(
        model,
        prompts,
        out,
        n_per_prompt=n_per_prompt,
        seed=seed,
        steps=steps,
        tokens=not no_tokens,
        flag_fraction=flag_fraction,
        quiet=ctx.obj["quiet"],
    )
    for score, d in summary.get("detection", {}).items():
        click.echo(f"{score}: AUROC {d['auroc']:.3f}, TPR at 1% FPR {d['tpr_at_1pct_fpr']:.3f}")
    click.echo(f"{summary['n_prompts']} prompts scored; ranked: {out / 'prompts-ranked.csv'}")


@prompts_group.command("mitigate")
@_model_option
@_prompts_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--text-column", default="text", show_default=True, help="Prompt column.")
@click.option(
    "--mitigation",
    "kinds",
    multiple=True,
    help="gaussian_noise, random_tokens, repeat_words, random_numbers, "
    "prompt_optimization, attention_rescale (repeatable; default: all).",
)
@click.option(
    "--n-per-prompt", type=int, default=4, show_default=True, help="Generations per prompt."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--steps", type=int, default=None, help="DDIM steps (default: the model's).")
@click.option(
    "--train",
    "train_src",
    default=None,
    help="Training images (folder, glob or CSV; a CSV's 'text' column gives captions): "
    "with --val and --detector, audit each mitigation's images for copies.",
)
@click.option("--val", "val_src", default=None, help="Validation images (other patients).")
@click.option(
    "--detector",
    "detector_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Trained copy detector folder (medmem train-detector).",
)
@click.option(
    "--patient-id-pattern",
    default=None,
    help="Regular expression taking the patient id from file names, e.g. '^(\\d+)_'.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.pass_context
def prompts_mitigate_cmd(
    ctx: click.Context,
    model_dir: Path,
    prompts_csv: Path,
    out: Path,
    text_column: str,
    kinds: tuple[str, ...],
    n_per_prompt: int,
    seed: int,
    steps: int | None,
    train_src: str | None,
    val_src: str | None,
    detector_dir: Path | None,
    patient_id_pattern: str | None,
    overwrite: bool,
) -> None:
    """Measure inference-time mitigations on the prompts: d_t with and without each, from
    the same initial noises; writes mitigations.csv. With --train, --val and --detector,
    also the image copies of each mitigation (medmem.audit on its generations; a 'path'
    column of --prompts names each prompt's own training image).

    \b
    Example:
      medmem prompts mitigate --model runs/t2i --prompts prompts.csv --out runs/t2i-mit \\
          --mitigation random_tokens --mitigation attention_rescale
      medmem prompts mitigate --model runs/t2i --prompts prompts.csv --out runs/t2i-mit \\
          --train pairs.csv --val val/ --detector detector/
    """
    from medmem.text2image import MITIGATIONS, audit_mitigations, compare_mitigations

    given = [o for o, v in (("--train", train_src), ("--val", val_src)) if v]
    given += ["--detector"] if detector_dir else []
    if given and len(given) < 3:
        raise click.UsageError("the copy audit needs all of --train, --val and --detector.")
    _claim(
        ctx,
        out,
        overwrite,
        inputs=[prompts_csv, train_src, val_src],
        keep=[model_dir, detector_dir],
    )
    model, prompts = _prompts_inputs(model_dir, prompts_csv, text_column)
    quiet = ctx.obj["quiet"]
    common: dict[str, Any] = dict(
        kinds=kinds or MITIGATIONS, n_per_prompt=n_per_prompt, seed=seed, steps=steps, quiet=quiet
    )
    if not given:
        frame = compare_mitigations(model, prompts, out, **common)
        shown = ["mitigation", "d_first", "relative_change_d_first"]
    else:
        from medmem.detector import Detector

        if "path" in prompts.columns:  # each prompt's own training image, CSV-relative
            base = Path(prompts_csv).parent
            prompts["path"] = [str((base / p).resolve()) if p else "" for p in prompts["path"]]
        detector = Detector.load(detector_dir)
        opts = {
            "spatial_dims": None,
            "image_size": None,
            "patient_id_pattern": patient_id_pattern,
            "skip_unreadable": False,
        }
        size = tuple(detector.config.image_size)
        captions = _captions(str(train_src))
        if captions is not None:  # text-image pairs repeat images: each image once
            out.mkdir(parents=True, exist_ok=True)
            train_src = str(out / "train-images.csv")
            captions.drop_duplicates("path").to_csv(train_src, index=False)
        train = _load(str(train_src), opts, image_size=size, quiet=quiet)
        val = _load(str(val_src), opts, like=train, option="--val", quiet=quiet)
        frame = audit_mitigations(
            model,
            prompts,
            train,
            val,
            detector,
            out,
            captions=captions,
            **common,
        )
        shown = ["mitigation", "d_first", *[c for c in frame.columns if c.startswith("copies_")]]
    click.echo(frame[shown].to_string(index=False))


def _captions(src: str) -> Any:
    """A text-image pairs CSV's captions (``path`` made absolute, ``text``, optional
    ``finding`` and ``patient_id``), else None."""
    import pandas as pd

    csv = Path(src)
    if csv.suffix.lower() != ".csv" or not csv.is_file():
        return None
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if not {"path", "text"} <= set(frame.columns):
        return None
    frame["path"] = [str((csv.parent / p).resolve()) for p in frame["path"]]
    return frame[[c for c in ("path", "text", "finding", "patient_id") if c in frame.columns]]


if __name__ == "__main__":  # pragma: no cover
    main()
