"""The copy detector: a self-supervised encoder trained with NT-Xent (Dar et al., 4.2).

Public API:

* :class:`Detector` -- ``Detector.train(dataset, **settings)``, ``.embed(dataset)``,
  ``.save(dir)``, ``Detector.load(dir)``, ``.fingerprint``.
* :class:`DetectorConfig` -- all settings, paper defaults per ``spatial_dims``.
* :class:`ContrastiveEncoder` -- the network (MONAI ResNet or strided-conv encoder).
* :func:`nt_xent` -- the loss; :func:`multi_positive_nt_xent` -- the identity objective's.
* :func:`vary`, :func:`sample_variation`, :func:`apply_variation`, :func:`needs_partner`,
  :class:`VariationConfig`, :data:`VARIATION_KINDS` (:data:`DEFAULT_VARIATION_KINDS`,
  :data:`PAPER_VARIATION_KINDS`, :data:`CONTROL_VARIATION_KINDS`) -- the variations a
  copy may show.
"""

from __future__ import annotations

from medmem.detector._config import DetectorConfig, conv_downsamplings
from medmem.detector._detector import Detector
from medmem.detector._encoder import ContrastiveEncoder, resample
from medmem.detector._loss import multi_positive_nt_xent, nt_xent
from medmem.detector._variations import (
    CONTROL_VARIATION_KINDS,
    DEFAULT_VARIATION_KINDS,
    MANY_KINDS_PROB,
    PAPER_VARIATION_KINDS,
    VARIATION_KINDS,
    VARIATION_PRESETS,
    VariationConfig,
    apply_variation,
    needs_partner,
    sample_variation,
    vary,
)

__all__ = [
    "CONTROL_VARIATION_KINDS",
    "DEFAULT_VARIATION_KINDS",
    "MANY_KINDS_PROB",
    "PAPER_VARIATION_KINDS",
    "VARIATION_KINDS",
    "VARIATION_PRESETS",
    "ContrastiveEncoder",
    "Detector",
    "DetectorConfig",
    "VariationConfig",
    "apply_variation",
    "conv_downsamplings",
    "multi_positive_nt_xent",
    "needs_partner",
    "nt_xent",
    "resample",
    "sample_variation",
    "vary",
]
