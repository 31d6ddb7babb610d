"""``report.html``: an audit's verdict, evidence and settings on one self-contained page.

The page opens offline in any browser: figures are embedded as base64 PNG, the CSS is
inline, there is no JavaScript, and a Content-Security-Policy forbids loading anything.
Every string that comes from the data (ids, file names, paths, extractor names,
calibration texts) is HTML-escaped. Every verdict number sits in an element with an ``id``
(``n_mem``, ``n_copies``, ``tau``, ``tau_mem``...) and its full-precision value in
``data-value``, so tools and tests can read the page back.

The report shows training images and their ids: it is as confidential as the training data.
Share the release folder of ``medmem screen`` instead.
"""

from __future__ import annotations

import base64
import html
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmem import __version__
from medmem._audit import calibration_sentence, low_sensitivity_warning
from medmem._io import atomic_write_text
from medmem._plots import central_slices, plot_histogram, png_base64
from medmem._templates import asset, render, trusted

# Element ids of the verdict numbers (and the summary keys they show). Documented for tools
# and tests that read the page back.
VERDICT_IDS = {
    "n_mem": "summary['n_mem']",
    "n_train": "summary['n_train']",
    "pct_mem": "summary['pct_mem']",
    "n_copies": "summary['n_copies']",
    "n_synthetic": "summary['n_synthetic']",
    "pct_copies": "summary['pct_copies']",
    "n_val": "summary['n_val']",
    "tau": "summary['tau'] (copies)",
    "tau_mem": "summary['tau_mem'] (memorized)",
    "percentile": "summary['percentile']",
    "alpha": "summary['alpha']",
    "calibration": "summary['calibration']; data-value = its name",
    "calibration_sentence": "what the calibration guarantees, in one sentence",
    "paper_tau": "summary['paper']['tau']",
    "paper_n_mem, paper_n_copies, paper_pct_mem, paper_pct_copies": "summary['paper'][key]",
    "paper_expected_chance_copies": "summary['paper']['chance']['expected_copies']",
    "<key>_ci_low, <key>_ci_high": "summary['intervals'][key], key in tau, tau_mem, n_mem, "
    "n_copies, pct_mem, pct_copies",
    "ci_confidence": "summary['intervals']['confidence']",
    "expected_chance_copies": "summary['chance']['expected_copies']",
    "expected_chance_copies_ci_low/high": "summary['chance']['expected_copies_ci']",
    "excess_copies": "summary['chance']['excess_copies']",
    "false_copy_rate": "summary['chance']['false_copy_rate']",
    "n_train_patients": "summary['patients']['n_train_patients']",
    "n_patients_mem": "summary['patients']['n_patients_mem']",
    "pct_patients_mem": "summary['patients']['pct_patients_mem']",
    "controls_n": "summary['controls']['n']",
    "controls_caught": "summary['controls']['caught']",
    "control_sensitivity": "summary['controls']['sensitivity']",
    "control_sensitivity_ci_low/high": "summary['controls']['sensitivity_ci']",
    "null_n, null_n_above_tau, null_expected_copies, null_excess_copies, null_n_mem": (
        "summary['null_synthetic'][key] (n, n_above_tau, expected_copies, excess_copies, "
        "n_mem); null_<key>_ci_low/high: its intervals"
    ),
    "verdict": "the headline; data-verdict = none | copies | within_chance | above_chance",
    "q_<key>": "quality[key], key in fid, precision, recall, density, coverage, "
    "ms_ssim_synthetic, ms_ssim_real; q_extractor: quality['extractor']",
}


# ---------------------------------------------------------------------------- helpers
def _e(value: Any) -> str:
    """HTML-escape any value (quotes too)."""
    return html.escape(str(value), quote=True)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if not _finite(value):
            return str(value)
        return format(value, fmt)
    return str(value)


def _num(elem_id: str, value: Any, fmt: str = "") -> str:
    """A number in a span with an id and its full-precision value in data-value."""
    raw = repr(float(value)) if isinstance(value, (float, np.floating)) else str(value)
    return (
        f'<span class="num" id="{_e(elem_id)}" data-value="{_e(raw)}">{_e(_fmt(value, fmt))}</span>'
    )


def _ci(elem_id: str, interval: Any, fmt: str, confidence: float | None = None) -> str:
    """' (95% CI lo–hi)' with ids elem_id_ci_low / _ci_high; '' when absent."""
    if not isinstance(interval, Sequence) or len(interval) != 2:
        return ""
    label = f"{100 * confidence:g}% CI" if confidence else "CI"
    return (
        f" ({label} {_num(elem_id + '_ci_low', interval[0], fmt)}&ndash;"
        f"{_num(elem_id + '_ci_high', interval[1], fmt)})"
    )


def _count_ci(count_key: str, pct_key: str, ci: dict[str, Any]) -> str:
    """'; 95% CI lo–hi images (lo–hi%)' from the bootstrap intervals; '' when absent."""
    counts, pcts = ci.get(count_key), ci.get(pct_key)
    if not isinstance(counts, Sequence) or len(counts) != 2:
        return ""
    conf = ci.get("confidence")
    label = f"{100 * conf:g}% CI" if conf else "CI"
    out = (
        f"; {label} {_num(count_key + '_ci_low', counts[0], '.0f')}&ndash;"
        f"{_num(count_key + '_ci_high', counts[1], '.0f')}"
    )
    if isinstance(pcts, Sequence) and len(pcts) == 2:
        out += (
            f" ({_num(pct_key + '_ci_low', pcts[0], '.1f')}&ndash;"
            f"{_num(pct_key + '_ci_high', pcts[1], '.1f')}%)"
        )
    return out


def _img(b64: str, alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _kv(items: dict[str, Any] | None) -> str:
    """A definition list of a flat dict (nested values shown as compact text)."""
    if not items:
        return '<p class="sub">none recorded</p>'

    def show(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return _fmt(v, ".6g")
        if isinstance(v, dict):
            return ", ".join(f"{a}: {show(b)}" for a, b in v.items())
        if isinstance(v, (list, tuple)):
            return ", ".join(show(x) for x in v)
        return str(v)

    rows = [f"<dt>{_e(k)}</dt><dd>{_e(show(v))}</dd>" for k, v in items.items()]
    return '<dl class="kv">' + "".join(rows) + "</dl>"


# ---------------------------------------------------------------------------- sections
def _headline(s: dict[str, Any]) -> tuple[str, str]:
    """(verdict key, sentence) for the top of the page."""
    n_copies, n_syn = int(s["n_copies"]), int(s["n_synthetic"])
    chance = s.get("chance") or {}
    ci = chance.get("expected_copies_ci")
    if n_copies == 0:
        return "none", f"No synthetic image of {n_syn} is a near-copy of a training image."
    if isinstance(ci, Sequence) and len(ci) == 2 and _finite(ci[1]):
        if n_copies > float(ci[1]):
            return (
                "above_chance",
                f"{n_copies} of {n_syn} synthetic images are near-copies of training images: "
                "more than chance explains, so the model has memorized training images.",
            )
        return (
            "within_chance",
            f"{n_copies} of {n_syn} synthetic images exceed tau, about as many as novel images "
            "do by chance; inspect the flagged images below before release.",
        )
    return "copies", f"{n_copies} of {n_syn} synthetic images are near-copies of training images."


def _verdict(s: dict[str, Any]) -> str:
    ci = s.get("intervals") or {}
    conf = ci.get("confidence")
    key, sentence = _headline(s)
    stats = [
        (
            "N_copies (synthetic images)",
            _num("n_copies", s["n_copies"]),
            f"of {_num('n_synthetic', s['n_synthetic'])} synthetic images = "
            f"{_num('pct_copies', s['pct_copies'], '.1f')}% of "
            f"{_e(s.get('pct_copies_denominator', 'n_synthetic'))}"
            + _count_ci("n_copies", "pct_copies", ci),
        ),
        (
            "N_mem (training images)",
            _num("n_mem", s["n_mem"]),
            f"of {_num('n_train', s['n_train'])} training images = "
            f"{_num('pct_mem', s['pct_mem'], '.1f')}% of "
            f"{_e(s.get('pct_mem_denominator', 'n_train'))}" + _count_ci("n_mem", "pct_mem", ci),
        ),
    ]
    stats += _threshold_cards(s, ci, conf)
    patients = s.get("patients")
    if isinstance(patients, dict) and "n_patients_mem" in patients:
        stats.append(
            (
                "Patients with a memorized image",
                _num("n_patients_mem", patients["n_patients_mem"]),
                f"of {_num('n_train_patients', patients.get('n_train_patients', 'n/a'))} "
                f"training patients = "
                f"{_num('pct_patients_mem', patients.get('pct_patients_mem'), '.1f')}% of "
                "n_train_patients",
            )
        )
    chance = s.get("chance")
    if isinstance(chance, dict) and "expected_copies" in chance:
        design = chance.get("design_false_copy_rate")
        stats.append(
            (
                "Copies expected by chance",
                _num("expected_chance_copies", chance["expected_copies"], ".1f"),
                f"novel images called copies at a rate of "
                f"{_num('false_copy_rate', chance.get('false_copy_rate'), '.3f')}"
                + (f" (by design about {_e(_fmt(design, '.2f'))})" if design is not None else "")
                + f"{_ci('expected_chance_copies', chance.get('expected_copies_ci'), '.1f', conf)}"
                + (
                    f"; excess over chance {_num('excess_copies', chance['excess_copies'], '.1f')}"
                    f"{_ci('excess_copies', chance.get('excess_copies_ci'), '.1f', conf)}"
                    if "excess_copies" in chance
                    else ""
                ),
            )
        )
    paper = s.get("paper")
    if s.get("calibration", "paper") != "paper" and isinstance(paper, dict) and "tau" in paper:
        p_chance = paper.get("chance") or {}
        stats.append(
            (
                "The paper's threshold, for comparison",
                _num("paper_tau", paper["tau"], ".4f"),
                f"the {_e(_fmt(s['percentile'], 'g'))}th percentile of training-to-nearest-"
                f"validation correlations (Dar et al.): N_copies "
                f"{_num('paper_n_copies', paper.get('n_copies'))} "
                f"({_num('paper_pct_copies', paper.get('pct_copies'), '.1f')}% of n_synthetic), "
                f"N_mem {_num('paper_n_mem', paper.get('n_mem'))} "
                f"({_num('paper_pct_mem', paper.get('pct_mem'), '.1f')}% of n_train)"
                + (
                    f"; copies expected by chance at it "
                    f"{_num('paper_expected_chance_copies', p_chance['expected_copies'], '.1f')}"
                    if "expected_copies" in p_chance
                    else ""
                ),
            )
        )
    controls = s.get("controls")
    if isinstance(controls, dict) and "sensitivity" in controls:
        stats.append(
            (
                "Positive controls caught (sensitivity)",
                _num("control_sensitivity", controls["sensitivity"], ".1%"),
                f"{_num('controls_caught', controls.get('caught', 'n/a'))} of "
                f"{_num('controls_n', controls.get('n', 'n/a'))} known varied copies of training "
                "images reach tau"
                + _ci("control_sensitivity", controls.get("sensitivity_ci"), ".1%", 0.95),
            )
        )
    cards = "".join(
        f'<div class="stat"><div class="label">{label}</div><div class="big">{big}</div>'
        f'<div class="detail">{detail}</div></div>'
        for label, big, detail in stats
    )
    boot = ""
    if ci:
        boot = (
            f'<p class="sub">Intervals: {_num("ci_confidence", conf, "g")} coverage, '
            f"{_e(ci.get('n_bootstrap', ''))} bootstrap replicates; {_e(ci.get('method', ''))}.</p>"
        )
    name = s.get("calibration", "paper")
    calib = (
        f'<p id="calibration-line">Calibration: <span id="calibration" data-value="{_e(name)}">'
        f"<b>{_e(name)}</b></span> (alpha = {_num('alpha', _alpha_of(s), 'g')}): "
        f'<span id="calibration_sentence">{_e(calibration_sentence(s))}</span>.</p>'
    )
    score = s.get("score")
    if isinstance(score, dict) and score.get("method"):
        calib += (
            f'<p id="score-line">Score: <b>{_e(score["method"])}</b>: '
            f"{_e(score.get('description', ''))}.</p>"
        )
    warning = low_sensitivity_warning(s)
    low = f'<p class="warn" id="low-sensitivity">{_e(warning)}</p>' if warning else ""
    return (
        f'<section class="card verdict {key}" id="verdict-card">'
        f'<p class="headline" id="verdict" data-verdict="{key}">{_e(sentence)}</p>'
        f'{low}{calib}<div class="grid">{cards}</div>{boot}</section>'
    )


def _alpha_of(s: dict[str, Any]) -> float:
    return float(s.get("alpha", (100.0 - float(s["percentile"])) / 100.0))


def _threshold_cards(
    s: dict[str, Any], ci: dict[str, Any], conf: float | None
) -> list[tuple[str, str, str]]:
    """The cards of tau (copies) and tau_mem (memorized), worded by calibration."""
    name = s.get("calibration", "paper")
    n_val = _num("n_val", s.get("n_val", "n/a"))
    q = _num("percentile", s["percentile"], "g")
    if name == "paper":
        return [
            (
                "tau = tau_mem (copies and memorized)",
                _num("tau", s["tau"], ".4f"),
                f"the paper's threshold: the {q}th percentile of training-to-nearest-validation "
                f"correlations ({n_val} validation images), for copies and memorized images"
                f"{_ci('tau', ci.get('tau'), '.4f', conf)}"
                + f"<span hidden>{_num('tau_mem', s.get('tau_mem', s['tau']), '.4f')}</span>",
            )
        ]
    info = s.get("calibration_info") or {}
    bounds = info.get("false_copy_rate_bounds")
    rate = (
        f" (between {_e(_fmt(bounds[0], '.3f'))} and {_e(_fmt(bounds[1], '.3f'))})"
        if isinstance(bounds, Sequence) and len(bounds) == 2
        else ""
    )
    m = info.get("m", s.get("n_synthetic"))
    how = (
        "unbiased estimate, n_synthetic <= n_val"
        if isinstance(m, int) and m <= int(s.get("n_val", 0) or 0)
        else "conservative estimate, n_synthetic > n_val"
    )
    return [
        (
            "tau (copy threshold)",
            _num("tau", s["tau"], ".4f"),
            f"{_e(name)} quantile of the {n_val} validation images' nearest-training "
            f"correlations at the {q}th percentile: a synthetic image is a copy when its "
            f"nearest training image correlates at or above it; novel images cross it at a "
            f"rate of about {_e(_fmt(_alpha_of(s), 'g'))}{rate}"
            f"{_ci('tau', ci.get('tau'), '.4f', conf)}",
        ),
        (
            "tau_mem (memorized threshold)",
            _num("tau_mem", s.get("tau_mem", s["tau"]), ".4f"),
            f"a training image is memorized when its nearest synthetic image correlates at or "
            f"above it; set so that about {_e(_fmt(_alpha_of(s), 'g'))} of training images "
            f"would be called memorized if no synthetic image were a copy ({_e(how)})"
            f"{_ci('tau_mem', ci.get('tau_mem'), '.4f', conf)}",
        ),
    ]


def _explanation(s: dict[str, Any]) -> str:
    q = _fmt(s["percentile"], "g")
    rate = _fmt(100 * _alpha_of(s), "g")
    name = s.get("calibration", "paper")
    if name == "paper":
        calib = f"""<b>tau</b> (used for copies and memorized images alike) is the {_e(q)}th
percentile of the correlations between each training image and its nearest validation image
(patients the generator never saw), the paper's threshold. It compares maxima over the
validation images with maxima over the training (or synthetic) images, so when the validation
set is the smaller, more than {_e(rate)}% of truly novel images exceed it; the chance row
above estimates how many. The default conformal calibration does not have this problem."""
    else:
        calib = f"""<b>tau</b> is calibrated on the validation images (patients the generator
never saw), scored against the training set exactly as synthetic images are: each one's
correlation with its nearest training image. It is the {_e(name)} quantile of those scores
at the {_e(q)}th percentile, so {_e(calibration_sentence(s))}. A few flagged images are
expected even from a model that copies nothing; the chance row above estimates how many.
<b>tau_mem</b> is set so that about {_e(rate)}% of training images would be called memorized
if the synthetic images were novel (docs/calibration.md). The paper's threshold and its
counts are shown beside, for comparison."""
    return f"""
<section class="card" id="meaning"><h2>What these numbers mean, and what they do not</h2>
<p>A copy detector (a network trained so that an image and its flipped, slightly rotated or
contrast-changed version lie close together) turns every image into an embedding; two images
are compared by the Pearson correlation of their embeddings. {calib}</p>
<p><b>N_copies</b> counts <i>synthetic</i> images whose nearest training image correlates at
or above tau (share of n_synthetic). <b>N_mem</b> counts <i>training</i> images with at least
one synthetic image at or above tau_mem (share of n_train). One training image can be copied many
times, so N_copies is usually larger than N_mem.</p>
<p>A copy here means a near-copy <i>up to flips, small rotations and contrast changes, as seen
by this detector</i>; it is not pixel identity, and the detector can miss copies altered in
other ways. Zero copies is evidence, not a proof of privacy: it does not rule out other
leaks (rare findings, membership inference, attributes of patients). Look at the gallery:
the final judgement on a flagged image is a person's.</p>
<p class="warn">This report shows training images and their ids: keep it as confidential as
the training data. Share the output of <code>medmem screen</code> instead.</p>
</section>"""


def _null_synthetic(s: dict[str, Any]) -> str:
    """The null-synthetic section: copies expected from a generator that never saw the
    training set, beside the validation-based chance estimate; '' without one."""
    null = s.get("null_synthetic")
    if not isinstance(null, dict) or "expected_copies" not in null:
        return ""
    conf = null.get("confidence")
    val = null.get("validation_expected_copies")
    val_ci = null.get("validation_expected_copies_ci")
    val_text = (
        f" The validation-based estimate (real images of patients not in training) is "
        f"{_e(_fmt(val, '.1f'))}"
        f"{_ci('null_validation_expected_copies', val_ci, '.1f', conf)}."
        if val is not None
        else ""
    )
    comparable = (
        ""
        if null.get("n_mem_comparable")
        else f" (the null set has {_e(null['n'])} images, the synthetic set "
        f"{_e(s['n_synthetic'])}: N_mem depends on the set size, compare with care)"
    )
    return (
        '<section class="card" id="null-synthetic"><h2>Chance level of generator outputs '
        "(null synthetic set)</h2>"
        f"<p>{_num('null_n_above_tau', null['n_above_tau'])} of {_num('null_n', null['n'])} "
        "images from a generator that never saw the training set reach tau "
        f"({_e(_fmt(100 * null['share_above_tau'], '.1f'))}%). Among "
        f"{_e(s['n_synthetic'])} synthetic images that implies "
        f"{_num('null_expected_copies', null['expected_copies'], '.1f')} false copies"
        f"{_ci('null_expected_copies', null.get('expected_copies_ci'), '.1f', conf)}; the "
        f"audit found {_e(s['n_copies'])}, an excess of "
        f"{_num('null_excess_copies', null['excess_copies'], '+.1f')}"
        f"{_ci('null_excess_copies', null.get('excess_copies_ci'), '+.1f', conf)}."
        f"{val_text} Training images whose nearest null image reaches tau_mem: "
        f"{_num('null_n_mem', null['n_mem'])}"
        f"{_ci('null_n_mem', null.get('n_mem_ci'), '.1f', conf)} (N_mem "
        f"{_e(s['n_mem'])}){comparable}.</p>"
        f"<p class='sub'>{_e(null.get('method', ''))}</p></section>"
    )


def _histogram(result: Any) -> str:
    t = result.training
    s = result.summary
    if len(t) == 0:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "histogram.png"
        plot_histogram(
            t["nearest_val_corr"].to_numpy(dtype=np.float64),
            t["nearest_synthetic_corr"].to_numpy(dtype=np.float64),
            float(s["tau"]),
            path,
            title="Per training image: nearest validation vs nearest synthetic correlation",
        )
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        '<section class="card" id="histogram"><h2>Correlation histogram</h2>'
        + _img(b64, "histogram of nearest-validation and nearest-synthetic correlations", "figure")
        + '<p class="sub">For each training image: the correlation with its nearest validation '
        "image (novel patients) and with its nearest synthetic image; the dashed line is tau. "
        "Mass of the synthetic histogram at the right of the threshold is memorization (the "
        f"paper's Fig. 2); training images are called memorized at tau_mem = "
        f"{_e(_fmt(float(s.get('tau_mem', s['tau'])), '.4f'))}.</p></section>"
    )


def _gallery(result: Any, n: int) -> str:
    tau = float(result.summary["tau"])
    pairs = result.gallery_pairs(n) if n > 0 else []
    head = '<section class="card gallery" id="gallery"><h2>Top synthetic images and their '
    head += "nearest training images</h2>"
    if not pairs:
        return (
            head + '<p class="sub">No images to show: the result holds no datasets (it was '
            "loaded from disk or built from embeddings).</p></section>"
        )
    is_3d = len(central_slices(pairs[0].synthetic)) > 1
    views = " (three central slices each)" if is_3d else ""
    rows = []
    for rank, p in enumerate(pairs, 1):
        flag = "copy" if p.corr >= tau else "novel"
        syn = "".join(
            _img(png_base64(v), f"synthetic {p.synthetic_id}") for v in central_slices(p.synthetic)
        )
        tra = "".join(
            _img(png_base64(v), f"training {p.train_id}") for v in central_slices(p.train)
        )
        rows.append(
            f'<tr class="pair" data-copy="{flag == "copy"}"><td>{rank}</td><td>{syn}<br>'
            f'<span class="id">{_e(p.synthetic_id)}</span></td><td>{tra}<br>'
            f'<span class="id">{_e(p.train_id)}</span></td><td>{_e(_fmt(p.corr, ".4f"))}<br>'
            f'<span class="tag {flag}">{flag}</span></td></tr>'
        )
    return (
        head + f'<p class="sub">The {len(pairs)} synthetic images most correlated with a training '
        f"image{views}, beside that training image. tau = {_e(_fmt(tau, '.4f'))}.</p>"
        "<table><thead><tr><th>#</th><th>synthetic</th><th>nearest training image</th>"
        "<th>correlation</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _copies_table(result: Any, limit: int = 100) -> str:
    syn = result.synthetic
    if len(syn) == 0 or "copy" not in syn:
        return ""
    copies = syn[syn["copy"].astype(bool)].sort_values(
        ["nearest_train_corr", "synthetic_id"], ascending=[False, True], kind="stable"
    )
    if len(copies) == 0:
        return ""
    shown = copies.head(limit)
    rows = "".join(
        f'<tr><td class="id">{_e(r.synthetic_id)}</td><td class="id">{_e(r.nearest_train_id)}'
        f"</td><td>{_e(_fmt(float(r.nearest_train_corr), '.4f'))}</td></tr>"
        for r in shown.itertuples(index=False)
    )
    more = (
        f" (the first {len(shown)} of {len(copies)}; all are in synthetic.csv)"
        if len(copies) > len(shown)
        else ""
    )
    return (
        f'<section class="card" id="copies"><h2>Synthetic images called copies{more}</h2>'
        "<table><thead><tr><th>synthetic_id</th><th>nearest_train_id</th>"
        f"<th>nearest_train_corr</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _quality(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    rows = [
        ("FID", "fid", ".4g", "lower = synthetic features distributed more like real ones"),
        ("precision", "precision", ".3f", "share of synthetic images on the real manifold"),
        ("recall", "recall", ".3f", "share of real images on the synthetic manifold"),
        ("density", "density", ".3f", "about 1 for real-like; above 1 when crowding real images"),
        ("coverage", "coverage", ".3f", "share of real images with a synthetic neighbour"),
        ("MS-SSIM synthetic", "ms_ssim_synthetic", ".4f", "lower = more diverse"),
        ("MS-SSIM real (reference)", "ms_ssim_real", ".4f", "the same for the real images"),
    ]
    body = "".join(
        f"<tr><th>{label}</th><td>{_num('q_' + key, q[key], fmt)}</td><td>{note}</td></tr>"
        for label, key, fmt, note in rows
        if key in q and q[key] is not None
    )
    trained = q.get("extractor_trained_on")
    extra = f" (trained here on the {_e(trained)} images)" if trained else ""
    sizes = ""
    if "n_real" in q and "n_synthetic" in q:
        sizes = f"; {_e(q['n_real'])} real and {_e(q['n_synthetic'])} synthetic images"
    k = f"; k = {_e(q['k'])}" if "k" in q else ""
    return (
        '<section class="card" id="quality"><h2>Quality and diversity</h2>'
        f'<p>Features: <code id="q_extractor">{_e(q.get("extractor", "unknown"))}</code>{extra}'
        f"{sizes}{k}. An FID is comparable only with FIDs from the same extractor and set "
        "sizes.</p>"
        f"<table><tbody>{body}</tbody></table>"
        '<p class="sub">A model that copies its training data scores well on FID and '
        "precision: read these beside N_copies, never instead of it (the paper, section "
        "2.4.2).</p></section>"
    )


def _settings(s: dict[str, Any]) -> str:
    general = {
        "medmem version": s.get("medmem_version", __version__),
        "schema version": s.get("schema_version"),
        "spatial_dims": s.get("spatial_dims"),
        "image_size": s.get("image_size"),
        "embedding_dim": s.get("embedding_dim"),
        "patients shared by train and val": s.get("n_patients_shared_train_val"),
        "train/val patient overlap": s.get("patient_overlap"),
    }
    general = {k: v for k, v in general.items() if v is not None}
    parts = [
        '<section class="card" id="settings"><h2>Settings and fingerprints</h2>',
        _kv(general),
    ]
    for title, key in (
        ("Settings", "settings"),
        ("Fingerprints (SHA-256)", "fingerprints"),
        ("Sources", "sources"),
        ("Timings (s)", "timings_s"),
    ):
        value = s.get(key)
        if isinstance(value, dict) and value:
            parts.append(f"<h3>{title}</h3>" + _kv(value))
    controls = s.get("controls")
    if isinstance(controls, dict) and controls:
        parts.append("<h3>Positive controls</h3>" + _kv(controls))
    info = s.get("calibration_info")
    if isinstance(info, dict) and info:
        parts.append("<h3>Calibration</h3>" + _kv(info))
    chance = s.get("chance")
    if isinstance(chance, dict) and chance:
        parts.append("<h3>Chance</h3>" + _kv(chance))
    paper = s.get("paper")
    if isinstance(paper, dict) and paper:
        parts.append("<h3>The paper's threshold</h3>" + _kv(paper))
    skipped = s.get("skipped_files") or []
    if skipped:
        items = "".join(
            f"<li><code>{_e(it.get('set', ''))}: {_e(it.get('path', ''))}</code> "
            f"&ndash; {_e(it.get('reason', ''))}</li>"
            for it in skipped[:20]
        )
        more = f"<p class='sub'>and {len(skipped) - 20} more</p>" if len(skipped) > 20 else ""
        parts.append(f"<h3>Skipped files ({len(skipped)})</h3><ul>{items}</ul>{more}")
    parts.append("</section>")
    return "".join(parts)


def _identity(result: Any, n: int = 8, limit: int = 100) -> str:
    """The identity section: counts, threshold, and evidence pairs (images when held)."""
    block = result.summary.get("identity")
    syn = result.synthetic
    if not isinstance(block, dict) or "identity" not in syn:
        return ""
    thr = float(block["tau_identity"])
    hits = syn[syn["identity"].astype(bool)].sort_values(
        ["identity_corr", "synthetic_id"], ascending=[False, True], kind="stable"
    )
    images = getattr(result, "_images", {}) or {}
    train_ds, syn_ds = images.get("train"), images.get("synthetic")
    train_pos = {t: i for i, t in enumerate(train_ds.ids)} if train_ds is not None else {}
    syn_pos = {t: i for i, t in enumerate(syn_ds.ids)} if syn_ds is not None else {}
    rows = []
    for rank, r in enumerate(hits.head(limit).itertuples(index=False), 1):
        pics = ""
        if rank <= n and r.synthetic_id in syn_pos and r.nearest_patient_train_id in train_pos:
            a = syn_ds[syn_pos[r.synthetic_id]][0].numpy()
            b = train_ds[train_pos[r.nearest_patient_train_id]][0].numpy()
            pics = "".join(
                _img(png_base64(v), f"synthetic {r.synthetic_id}") for v in central_slices(a)
            ) + "".join(
                _img(png_base64(v), f"training {r.nearest_patient_train_id}")
                for v in central_slices(b)
            )
        rows.append(
            f'<tr><td>{rank}</td><td class="id">{_e(r.synthetic_id)}</td>'
            f'<td class="id">{_e(r.nearest_patient_id)}</td>'
            f'<td class="id">{_e(r.nearest_patient_train_id)}</td>'
            f"<td>{_e(_fmt(float(r.identity_corr), '.4f'))}</td><td>{pics}</td></tr>"
        )
    more = (
        f" (the first {limit} of {len(hits)}; all are in synthetic.csv)"
        if len(hits) > limit
        else ""
    )
    training = block.get("detector", {}) or {}
    info = training.get("training") or {}
    few = (
        f" The identity detector saw only {_e(info.get('n_repeat_patients'))} training patients "
        "with two or more images: its identity scores are close to copy scores."
        if info.get("few_repeat_patients")
        else ""
    )
    table = (
        "<table><thead><tr><th>#</th><th>synthetic_id</th><th>nearest_patient_id</th>"
        "<th>evidence training image</th><th>identity_corr</th><th>synthetic | training</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No synthetic image reaches the identity threshold.</p>"
    )
    return (
        '<section class="card" id="identity"><h2>Identity: synthetic images that re-identify '
        f"a training patient{more}</h2>"
        f"<p>{_num('n-synthetic-identity', block['n_synthetic_identity'])} of "
        f"{_e(result.summary['n_synthetic'])} synthetic images re-identify a training patient; "
        f"{_num('n-patients-reidentified', block['n_patients_reidentified'])} of "
        f"{_e(block['n_train_patients'])} training patients are re-identified. Identity "
        f"threshold {_num('tau-identity', thr, '.4f')} (calibrated on validation patients: "
        f"a novel patient's image crosses it with probability about "
        f"{_e(_fmt(block['alpha'], '.2f'))}; expected by chance "
        f"{_e(_fmt(block['expected_by_chance'], '.1f'))}). Not copies: same patient, another "
        f"image.{few}</p>{table}</section>"
    )


def render_report(result: Any, *, quality: dict[str, Any] | None = None, n_gallery: int = 8) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    s = result.summary
    sections = "".join(
        [
            _verdict(s),
            _explanation(s),
            _null_synthetic(s),
            _histogram(result),
            _gallery(result, n_gallery),
            _copies_table(result),
            _identity(result),
            _quality(quality),
            _settings(s),
        ]
    )
    return render(
        "report.html",
        css=asset("report.css"),
        version=s.get("medmem_version", __version__),
        n_train=s["n_train"],
        n_val=s.get("n_val", "n/a"),
        n_synthetic=s["n_synthetic"],
        sections=trusted(sections),  # built by the helpers above, every value escaped by _e
    )


def write_report(
    result: Any,
    folder: str | Path,
    *,
    quality: dict[str, Any] | None = None,
    n_gallery: int = 8,
) -> Path:
    """Write ``report.html`` (self-contained, offline) into ``folder``; return its path.

    Args:
        result: an :class:`~medmem.AuditResult`. The gallery needs the datasets that
            ``medmem.audit`` attaches; without them the page says so.
        folder: where to write (created if missing); the file is written atomically.
        quality: a dict from :func:`medmem.metrics.quality`, shown when given.
        n_gallery: number of top synthetic/training pairs shown.

    Summary keys read: ``n_mem``, ``n_train``, ``pct_mem``, ``n_copies``, ``n_synthetic``,
    ``pct_copies`` (and their ``*_denominator``), ``n_val``, ``tau``, ``percentile``,
    ``intervals`` (``confidence``, ``n_bootstrap``, ``method``, ``tau``, ``tau_mem``,
    ``n_mem``, ``n_copies``, ``pct_mem``, ``pct_copies``); when present: ``calibration``
    (default ``"paper"`` for summaries written before schema 2), ``alpha``, ``tau_mem``,
    ``calibration_info``, ``paper`` (``tau``, ``n_mem``, ``n_copies``, ``pct_mem``,
    ``pct_copies``, ``chance``), ``chance``
    (``expected_copies``, ``expected_copies_ci``, ``excess_copies``, ``excess_copies_ci``,
    ``false_copy_rate``, ``design_false_copy_rate``), ``patients`` (``n_train_patients``,
    ``n_patients_mem``, ``pct_patients_mem``), ``controls`` (``n``, ``caught``,
    ``sensitivity``, ``sensitivity_ci``; all keys listed under settings), and
    ``medmem_version``, ``schema_version``, ``spatial_dims``, ``image_size``,
    ``embedding_dim``, ``settings``, ``fingerprints``, ``sources``, ``timings_s``,
    ``skipped_files``. Element ids: see ``VERDICT_IDS``.

    Example:
        >>> result = medmem.audit(train, val, synthetic)  # doctest: +SKIP
        >>> write_report(result, "audit/")  # doctest: +SKIP
        PosixPath('audit/report.html')
    """
    path = Path(folder) / "report.html"
    atomic_write_text(path, render_report(result, quality=quality, n_gallery=n_gallery))
    return path


def screenshot(
    page: str | Path,
    png: str | Path,
    *,
    window_size: tuple[int, int] = (1280, 1900),
    timeout: float = 120.0,
) -> Path:
    """A PNG screenshot of an HTML page (e.g. an audit's report.html) in headless Chromium.

    Example:
        >>> screenshot("audit/report.html", "docs/images/report.png")  # doctest: +SKIP
    """
    import subprocess

    from medmem._browser import chromium_available, headless_command
    from medmem._errors import InputError

    page, png = Path(page).resolve(), Path(png).resolve()
    if not page.is_file():
        raise InputError(f"{page}: no such HTML page.")
    if not chromium_available():
        raise InputError("screenshot needs Chromium (apt-get install chromium).")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = headless_command(
            profile,
            "--hide-scrollbars",
            f"--window-size={window_size[0]},{window_size[1]}",
            f"--screenshot={png}",
            page.as_uri(),
        )
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    return png


__all__ = ["VERDICT_IDS", "render_report", "screenshot", "write_report"]
