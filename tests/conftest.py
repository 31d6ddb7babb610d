"""Shared test helpers: a pixel-correlation stand-in for the copy detector; the device.

The suite runs on the CPU, where medmem promises bit-identical results for the same seed
and data: GPUs are hidden from it (and from the processes it starts) unless
``MEDMEM_TEST_CUDA=1``. With that set, the CUDA paths run too, and the tests marked
``cpu_exact`` (bit-identical weights, samples or reruns: cuDNN and cuBLAS kernels are not
deterministic) are skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

TEST_CUDA = os.environ.get("MEDMEM_TEST_CUDA") == "1"
if not TEST_CUDA:  # read by CUDA when it starts (lazily, after this): the suite sees no GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not TEST_CUDA:
        return
    skip = pytest.mark.skip(reason="bit-identical results are a CPU claim (MEDMEM_TEST_CUDA=1)")
    for item in items:
        if "cpu_exact" in item.keywords:
            item.add_marker(skip)


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
