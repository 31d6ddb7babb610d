"""medmem.search: blocked exact search equals brute force, ties, memory bounds, errors."""

from __future__ import annotations

import numpy as np
import pytest

from medmem import InputError
from medmem.search import nearest, pearson, standardize


def _brute(q: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference: dense Pearson matrix (np.corrcoef) and a stable descending sort."""
    c = np.corrcoef(q.astype(np.float64), b.astype(np.float64))[: len(q), len(q) :]
    order = np.argsort(-c, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(c, order, 1), order


@pytest.mark.parametrize("block_size", [1, 3, 16, 1000])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_blocked_equals_brute_force(block_size: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((37, 12)).astype(np.float32)
    b = rng.standard_normal((53, 12)).astype(np.float32) * 3 + 1
    v, i = nearest(q, b, k=k, block_size=block_size)
    rv, ri = _brute(q, b, k)
    assert v.shape == (37, k) and i.shape == (37, k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(v, rv, atol=1e-5)
    assert np.all(np.diff(v, axis=1) <= 0)


def test_pearson_is_invariant_to_offset_and_scale() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 9))
    np.testing.assert_allclose(pearson(a, 5 * a + 2), pearson(a, a), atol=1e-6)
    np.testing.assert_allclose(np.diag(pearson(a, -a)), -1.0, atol=1e-6)
    np.testing.assert_allclose(pearson(a, a), np.corrcoef(a), atol=1e-6)


@pytest.mark.parametrize("block_size", [1, 2, 4, 64])
@pytest.mark.parametrize("k", [1, 3])
def test_ties_go_to_the_lowest_base_index(block_size: int, k: int) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 6)).astype(np.float32)
    filler = rng.standard_normal((3, 6)).astype(np.float32)
    # base: filler, then each query three times (exact ties), interleaved with filler
    base = np.concatenate([filler, q, filler, q, q], 0)
    v, i = nearest(q, base, k=k, block_size=block_size)
    expected = np.stack([3 + np.arange(5), 11 + np.arange(5), 16 + np.arange(5)], 1)[:, :k]
    np.testing.assert_array_equal(i, expected)
    np.testing.assert_allclose(v, 1.0, atol=1e-6)


def _integer_ties() -> tuple[np.ndarray, np.ndarray]:
    """Small-integer rows with many exact ties, searched as given (``standardized=True``):
    their products are exact in float32 whatever the BLAS kernel's order of summation, so
    the tests below see the tie rule itself. (Standardised rows are not exact: a BLAS may
    round two equal correlations 1 ulp apart depending on where the rows fall in a block;
    seen on a 16-core host, not on the 2-core CI machine.)"""
    rng = np.random.default_rng(5)
    base = rng.integers(0, 3, size=(40, 4)).astype(np.float32)  # many exact ties
    base[:, 0] += np.arange(40) % 2  # avoid constant rows
    return base[::3].copy(), base


def test_same_inputs_same_outputs_for_any_block_size() -> None:
    q, base = _integer_ties()
    results = [nearest(q, base, k=4, block_size=bs, standardized=True)[1] for bs in (1, 5, 8, 40)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_same_top1_for_any_block_size_with_ties() -> None:
    """k = 1 takes a two-pass path (best block, then the position in it): ties across and
    within blocks still go to the lowest index, the same for every block size."""
    q, base = _integer_ties()
    ref = nearest(q, base, k=2, block_size=40, standardized=True)[1][:, :1]  # top-k path
    for bs in (1, 2, 5, 8, 13, 40):
        got = nearest(q, base, k=1, block_size=bs, standardized=True)[1]
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("maxima_blocks", [1, 3, 64])
def test_top1_reduces_block_maxima_in_chunks(
    monkeypatch: pytest.MonkeyPatch, maxima_blocks: int
) -> None:
    """The k = 1 path keeps each base block's row maxima and reduces them once per chunk of
    blocks: ties within and across chunks, a shorter last block and the exclusion of a
    query's own row give the top-k path's answer for any chunk length."""
    from medmem import search

    monkeypatch.setattr(search, "_MAXIMA_BLOCKS", maxima_blocks)
    q, base = _integer_ties()
    base = np.concatenate([base] * 5)  # 200 rows: every tie repeated 40 rows apart
    for bs in (1, 4, 8, 12, 44):  # 1, 1, 2, 3 and 11 base rows per block
        ref = nearest(q, base, k=2, block_size=bs, standardized=True)[1][:, :1]
        got = nearest(q, base, k=1, block_size=bs, standardized=True)[1]
        np.testing.assert_array_equal(got, ref)
        assert np.all(got < 40)  # the first of the five copies
    x = base[:120]
    for bs in (12, 44):
        ref = nearest(x, x, k=2, block_size=bs, standardized=True, exclude_self=True)[1]
        got = nearest(x, x, k=1, block_size=bs, standardized=True, exclude_self=True)[1]
        np.testing.assert_array_equal(got, ref[:, :1])
        assert not np.any(got[:, 0] == np.arange(120))


@pytest.mark.parametrize("k", [1, 2])
def test_exclude_self(k: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 5)).astype(np.float32)
    for bs in (3, 7, 50):
        v, i = nearest(x, x, k=k, block_size=bs, exclude_self=True)
        assert not np.any(i == np.arange(20)[:, None])
        c = np.corrcoef(x)
        np.fill_diagonal(c, -np.inf)
        np.testing.assert_array_equal(i[:, 0], np.argmax(c, axis=1))
    # a duplicate of each row in another block: it, not the row itself, is the nearest
    dup = np.concatenate([x, x], 0)
    for bs in (3, 7, 50):
        v, i = nearest(dup, dup, k=k, block_size=bs, exclude_self=True)
        np.testing.assert_array_equal(i[:, 0], np.r_[np.arange(20, 40), np.arange(20)])
        np.testing.assert_allclose(v[:, 0], 1.0, atol=1e-6)


def test_accepts_torch_tensors() -> None:
    import torch

    x = torch.randn(6, 5)
    v, i = nearest(x, x, k=1)
    assert i[:, 0].tolist() == list(range(6))


def test_standardize_rows_have_zero_mean_unit_norm() -> None:
    x = np.random.default_rng(0).standard_normal((10, 7)) * 4 + 3
    s = standardize(x)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s.mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1, atol=1e-6)


@pytest.mark.parametrize(
    ("q", "b", "kwargs", "match"),
    [
        (np.ones((2, 3)), np.random.rand(4, 3), {}, "row 0 is constant"),
        (np.random.rand(2, 3), np.random.rand(4, 5), {}, "d=3 but base has d=5"),
        (np.random.rand(2, 3), np.random.rand(2, 3), {"k": 3}, "larger than the number"),
        (np.random.rand(3), np.random.rand(2, 3), {}, "expected a 2-d array"),
        (np.zeros((0, 3)), np.random.rand(2, 3), {}, "is empty"),
        (np.array([[1.0, np.nan, 2.0]]), np.random.rand(2, 3), {}, "NaN"),
        (np.random.rand(2, 3), np.random.rand(2, 3), {"k": 0}, "k must be an integer >= 1"),
        (np.random.rand(2, 3), np.random.rand(2, 3), {"block_size": -1}, "block_size"),
    ],
)
def test_bad_inputs_raise_clear_errors(q, b, kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        nearest(q, b, **kwargs)


# ---------------------------------------------------------------- backends and devices
def _faiss_or_skip() -> None:
    pytest.importorskip("faiss", reason="faiss not installed (pip install medmem[faiss])")


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_faiss_backend_equals_torch(k: int, exclude_self: bool) -> None:
    _faiss_or_skip()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    q = x if exclude_self else x[:120]
    tv, ti = nearest(q, x, k=k, block_size=64, exclude_self=exclude_self)
    fv, fi = nearest(q, x, k=k, block_size=64, exclude_self=exclude_self, backend="faiss")
    np.testing.assert_array_equal(fi, ti)
    np.testing.assert_allclose(fv, tv, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_faiss_backend_keeps_the_tie_rule(k: int) -> None:
    _faiss_or_skip()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 6)).astype(np.float32)
    filler = rng.standard_normal((3, 6)).astype(np.float32)
    # each query five times in base: more exact ties than FAISS returns candidates
    base = np.concatenate([filler, q, filler, q, q, q, q], 0)
    _, ti = nearest(q, base, k=k, block_size=4)
    fv, fi = nearest(q, base, k=k, block_size=4, backend="faiss")
    np.testing.assert_array_equal(fi, ti)
    np.testing.assert_array_equal(fi[:, 0], 3 + np.arange(5))
    np.testing.assert_allclose(fv, 1.0, atol=1e-5)


def test_faiss_backend_ties_many_duplicates() -> None:
    _faiss_or_skip()
    rng = np.random.default_rng(5)
    base = rng.integers(0, 3, size=(60, 4)).astype(np.float32)  # many exact ties
    base[:, 0] += np.arange(60) % 2
    q = base[::3].copy()
    for k in (1, 4):
        np.testing.assert_array_equal(
            nearest(q, base, k=k, backend="faiss")[1], nearest(q, base, k=k)[1]
        )


def test_unknown_backend_and_missing_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    x = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(InputError, match="backend must be one of"):
        nearest(x, x, backend="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(InputError, match=r"medmem\[faiss\]"):
        nearest(x, x, backend="faiss")


def test_device_argument_and_tensor_device() -> None:
    import torch

    rng = np.random.default_rng(4)
    q, b = rng.standard_normal((20, 8)), rng.standard_normal((30, 8))
    ref = nearest(q, b, k=2)
    for dev in ("cpu", torch.device("cpu")):
        got = nearest(q, b, k=2, device=dev)
        np.testing.assert_array_equal(got[1], ref[1])
    if torch.cuda.is_available():  # runs on the queries' GPU
        got = nearest(torch.from_numpy(q).cuda(), torch.from_numpy(b).cuda(), k=2)
        np.testing.assert_array_equal(got[1], ref[1])


def test_standardize_in_chunks_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import medmem.search as search

    x = np.random.default_rng(1).standard_normal((25, 6)) * 3 + 2
    whole = standardize(x)
    monkeypatch.setattr(search, "_STANDARDIZE_ROWS", 4)
    np.testing.assert_array_equal(standardize(x), whole)
    x[22] = 7.0
    with pytest.raises(InputError, match="row 22 is constant"):
        standardize(x)


def test_device_path_checks_and_standardizes_as_the_host_path() -> None:
    """CUDA inputs are checked and standardised where they are (``_on_device``); the same
    code on CPU tensors gives the host path's values and, for bad rows, its errors."""
    import torch

    import medmem.search as search

    x = np.random.default_rng(5).standard_normal((30, 6)) * 3 + 2
    got = search._on_device(torch.from_numpy(x), "queries", standardized=False)
    np.testing.assert_allclose(got.numpy(), standardize(x), rtol=0, atol=1e-7)
    same = search._on_device(torch.from_numpy(x), "queries", standardized=True)
    np.testing.assert_array_equal(same.numpy(), x.astype(np.float32))
    x[4] = 7.0
    with pytest.raises(InputError, match="row 4 is constant"):
        search._on_device(torch.from_numpy(x), "queries", standardized=False)
    x[4] = np.nan
    with pytest.raises(InputError, match="row 4 contains NaN"):
        search._on_device(torch.from_numpy(x), "queries", standardized=True)
    with pytest.raises(InputError, match="expected d=5"):
        search._on_device(torch.zeros((3, 6)), "base", standardized=True, dim=5)
