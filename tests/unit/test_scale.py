"""Hospital scale: sharded resumable embeddings; embedding and audit under 2 gloo processes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medmem import _distributed
from medmem.data import ArrayDataset
from medmem.detector import Detector, _cache

pytestmark = pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning")

TINY = dict(resnet_channels=(8, 8, 16, 16), embed_dim=16, epochs=1, batch_size=4, lr=1e-3, seed=0)

AUDIT = dict(n_bootstrap=20, n_controls=4, percentile=80, batch_size=3, quiet=True)


def _images(n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand((n, 1, 6, 6), generator=g), size=(32, 32), mode="bicubic")
    x = x[:, 0] - x[:, 0].amin(dim=(1, 2), keepdim=True)
    return (x / x.amax(dim=(1, 2), keepdim=True)).numpy()


@pytest.fixture(scope="module")
def det() -> Detector:
    return Detector.train(ArrayDataset(_images(8, 1)), quiet=True, **TINY)  # 2 steps of 4


# ---------------------------------------------------------------- sharded, resumable
def test_killed_embedding_resumes_from_its_shards(det, tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "SHARD_ROWS", 3)
    data = ArrayDataset(_images(11, 2))
    full = det.embed(data, quiet=True)
    forward = det._forward
    computed: list[int] = []

    def killed_after_two(dataset, *args):  # noqa: ANN001, ANN202
        if len(computed) == 2:
            raise KeyboardInterrupt("killed")
        computed.append(len(dataset))
        return forward(dataset, *args)

    monkeypatch.setattr(det, "_forward", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        det.embed(data, cache_dir=tmp_path, quiet=True)
    assert len(list(tmp_path.rglob("shard-*.safetensors"))) == 2  # two complete shards

    computed.clear()
    monkeypatch.setattr(det, "_forward", lambda d, *a: computed.append(len(d)) or forward(d, *a))
    resumed = det.embed(data, cache_dir=tmp_path, quiet=True)
    assert computed == [3, 2]  # only the 5 images not in a shard
    np.testing.assert_allclose(resumed, full, rtol=1e-5, atol=1e-6)
    computed.clear()
    np.testing.assert_array_equal(det.embed(data, cache_dir=tmp_path, quiet=True), resumed)
    assert computed == []


def test_shards_are_merged_at_the_end_of_a_run(det, tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "SHARD_ROWS", 2)
    monkeypatch.setattr(_cache, "MAX_SHARDS", 3)
    data = ArrayDataset(_images(11, 3))
    first = det.embed(data, cache_dir=tmp_path, quiet=True)
    assert len(list(tmp_path.rglob("shard-*.safetensors"))) == 1
    np.testing.assert_array_equal(det.embed(data, cache_dir=tmp_path, quiet=True), first)


# ---------------------------------------------------------------- one process: no-ops
def test_not_distributed_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not _distributed.init_from_env()
    assert (_distributed.rank(), _distributed.world_size(), _distributed.is_main()) == (0, 1, True)
    np.testing.assert_array_equal(_distributed.split(np.arange(5)), np.arange(5))
    x = np.ones((3, 2), dtype=np.float32)
    assert _distributed.gather_rows(x) is x
    _distributed.barrier()


# ---------------------------------------------------------------- 2 gloo processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _audit_numbers(result) -> dict:  # noqa: ANN001
    """summary.json's content (less timings) and both tables, as JSON values."""
    summary = {k: v for k, v in result.summary.items() if k != "timings_s"}
    tables = {"training": result.training, "synthetic": result.synthetic}
    out = {"summary": summary} | {k: t.to_dict(orient="list") for k, t in tables.items()}
    return json.loads(json.dumps(out, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _assert_close(a, b, path: str = "") -> None:  # noqa: ANN001
    """Equal JSON values; numbers equal up to float order (flags and ids exactly)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6, nan_ok=True), path
    else:
        assert a == b, path


def _searches() -> dict[str, np.ndarray]:
    """Exact searches (self excluded, k = 3, small blocks), with every installed backend."""
    from medmem.search import nearest

    x = np.random.default_rng(0).standard_normal((23, 8)).astype(np.float32)
    x[15] = x[3]  # an exact tie
    backends = ["torch"] + (["faiss"] if importlib.util.find_spec("faiss") else [])
    out = {}
    for backend in backends:
        v, i = nearest(x, x, k=3, exclude_self=True, block_size=4, backend=backend)
        out |= {f"{backend}_v": v, f"{backend}_i": i}
    return out


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    """One rank: torchrun's environment, then the same calls as the 1-process reference."""
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_PORT=str(port)
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    assert _distributed.init_from_env()
    import medmem

    # DDP training: each rank forwards half of each batch, NT-Xent over the global batch
    trained = Detector.train(ArrayDataset(np.load(Path(tmp) / "det_train.npy")), quiet=True, **TINY)
    det = Detector.load(Path(tmp) / "det")
    sets = {k: ArrayDataset(np.load(Path(tmp) / f"{k}.npy")) for k in ("tr", "va", "sy")}
    emb = det.embed(sets["sy"], batch_size=3, cache_dir=Path(tmp) / "cache", quiet=True)
    result = medmem.audit(sets["tr"], sets["va"], sets["sy"], detector=det, **AUDIT)
    searches = _searches()  # each rank searches its share of the queries
    if _distributed.is_main():  # rank 0 alone writes
        np.savez(Path(tmp) / "search_2.npz", **searches)
        trained.save(Path(tmp) / "det_2")
        np.save(Path(tmp) / "emb_2.npy", emb)
        (Path(tmp) / "audit_2.json").write_text(json.dumps(_audit_numbers(result)))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one(det, tmp_path):
    import medmem

    sets = {"tr": _images(12, 4), "va": _images(9, 5), "sy": _images(7, 6)}
    sets["sy"][:2] = sets["tr"][[3, 8]]  # two copies
    for k, v in sets.items():
        np.save(tmp_path / f"{k}.npy", v)
    det.save(tmp_path / "det")
    np.save(tmp_path / "det_train.npy", _images(8, 1))
    one = Detector.load(tmp_path / "det")
    data = {k: ArrayDataset(v) for k, v in sets.items()}
    emb_1 = one.embed(data["sy"], batch_size=3, quiet=True)
    result_1 = medmem.audit(data["tr"], data["va"], data["sy"], detector=one, **AUDIT)

    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    # training: the same losses and weights as one process, up to float order
    ddp = Detector.load(tmp_path / "det_2")
    np.testing.assert_allclose(ddp.loss_history_, det.loss_history_, rtol=1e-5)
    # Conv biases just before a batch norm have zero gradient (the norm removes them): Adam
    # turns their float-order noise into lr-sized steps, and the norms' running means follow
    # them. Every other weight agrees to float order; embeddings to ~1e-3.
    weights = ddp.model_.state_dict()
    far = {k: float((weights[k] - w).abs().max()) for k, w in det.model_.state_dict().items()}
    far = {k for k, v in far.items() if v > 1e-4}
    assert all(k.endswith(("downsample.0.bias", "downsample.1.running_mean")) for k in far), far
    np.testing.assert_allclose(
        ddp.embed(data["tr"], quiet=True), det.embed(data["tr"], quiet=True), atol=1e-2
    )
    np.testing.assert_allclose(np.load(tmp_path / "emb_2.npy"), emb_1, rtol=1e-5, atol=1e-6)
    with np.load(tmp_path / "search_2.npz") as two_searches:
        for name, value in _searches().items():
            np.testing.assert_allclose(two_searches[name], value, rtol=1e-6, atol=1e-6)
    # each rank wrote its own shards to the cache, merged by rank 0 only when many
    assert len(list((tmp_path / "cache").rglob("shard-*.safetensors"))) == 2
    two = json.loads((tmp_path / "audit_2.json").read_text())
    one_numbers = _audit_numbers(result_1)
    assert one_numbers["summary"]["n_copies"] >= 2  # the planted copies are found
    _assert_close(one_numbers, two)


def test_only_rank_0_claims_the_output(tmp_path, monkeypatch):
    from medmem import cli

    monkeypatch.setenv("RANK", "1")
    assert not cli._is_writer()
    cli._claim(None, tmp_path / "out", inputs=[str(tmp_path)])  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "0")
    assert cli._is_writer()
