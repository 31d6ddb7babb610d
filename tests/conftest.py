"""Shared test helpers: a pixel-correlation stand-in for the copy detector."""

from __future__ import annotations

import numpy as np
import pytest


class PixelDetector:
    """Embeds an image as its pixels: exact copies correlate 1, no training needed.

    Duck-types what ``medmem.audit`` uses of a Detector (``embed``, ``fingerprint``), so
    tests of the outputs (report, screening) run the real audit pipeline in a second.
    """

    fingerprint = "0" * 52 + "pixeldetector"
    train_fingerprint_ = None

    def embed(self, dataset, **_: object) -> np.ndarray:
        return np.stack([np.asarray(dataset[i]).ravel() for i in range(len(dataset))])


@pytest.fixture(scope="session")
def pixel_detector() -> PixelDetector:
    return PixelDetector()
