"""On-disk cache of embeddings, keyed by detector fingerprint and item key.

Layout: ``cache_dir/<detector fingerprint[:24]>/shard-<sha>.safetensors``. ``Detector.embed``
computes new embeddings in chunks of ``SHARD_ROWS`` images (:func:`embed_in_shards`) and
writes each chunk as one shard holding ``keys`` (n, 32) uint8 (the SHA-256 of each item's
content + preprocessing, ``dataset.item_key(i)``) and ``embeddings`` (n, d) float32,
atomically; a killed run therefore resumes from its last complete shard. Under torchrun
each rank embeds and writes its own part. Reading loads every shard's keys into a dict
(32 bytes per image: 100k images are ~3 MB of index). When shards pile up they are merged
into one at the end of a run, so 100k images never mean 100k files. A damaged shard is
ignored (its images are recomputed) with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from medmem import _distributed
from medmem._errors import MedmemWarning
from medmem._io import atomic_save

logger = logging.getLogger(__name__)

MAX_SHARDS = 16
SHARD_ROWS = 4096  # images per shard while embedding: a killed run loses at most these


class EmbeddingCache:
    """Embeddings of one detector, looked up by item key (hex SHA-256)."""

    def __init__(self, cache_dir: str | Path, detector_fingerprint: str, embed_dim: int) -> None:
        self.root = Path(cache_dir) / detector_fingerprint[:24]
        self.embed_dim = embed_dim
        self._index: dict[bytes, tuple[Path, int]] = {}
        self._scan()

    def _scan(self) -> None:
        self._index.clear()
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("shard-*.safetensors")):
            keys = self._read(path, "keys")
            if keys is None:
                continue
            for row, key in enumerate(keys.numpy()):
                self._index[key.tobytes()] = (path, row)

    def _read(self, path: Path, name: str) -> torch.Tensor | None:
        try:
            with safe_open(str(path), framework="pt") as fh:
                t = fh.get_tensor(name)
                if name == "embeddings" and (t.ndim != 2 or t.shape[1] != self.embed_dim):
                    raise ValueError(f"embeddings of shape {tuple(t.shape)}")
                return t
        except FileNotFoundError:  # removed by a concurrent merge
            return None
        except (SafetensorError, OSError, ValueError) as exc:
            warnings.warn(
                f"{path}: unreadable embedding cache shard ({exc}); its images will be "
                "recomputed. Delete the file to silence this warning.",
                category=MedmemWarning,
                stacklevel=3,
            )
            return None

    def get(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (found mask (n,), embeddings (n, d) with rows filled where found)."""
        out = np.zeros((len(keys), self.embed_dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            hit = self._index.get(bytes.fromhex(key))
            if hit is not None:
                by_shard.setdefault(hit[0], []).append((i, hit[1]))
        for path, pairs in by_shard.items():
            emb = self._read(path, "embeddings")
            if emb is None:
                continue
            arr = emb.numpy()
            rows = np.array([r for _, r in pairs])
            if rows.max() >= arr.shape[0]:
                continue
            idx = np.array([i for i, _ in pairs])
            out[idx] = arr[rows]
            found[idx] = True
        return found, out

    def put(self, keys: list[str], embeddings: np.ndarray, *, merge: bool = True) -> None:
        """Store new rows as one shard, then (``merge``) merge shards if there are many."""
        if not keys:
            return
        key_arr = np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8)
        key_arr = key_arr.reshape(len(keys), 32)
        path = self._write(key_arr, np.ascontiguousarray(embeddings, dtype=np.float32))
        for row, key in enumerate(key_arr):
            self._index[key.tobytes()] = (path, row)
        if merge:
            self.compact()

    def compact(self) -> None:
        """Merge the shards into one when there are more than ``MAX_SHARDS``."""
        shards = sorted(self.root.glob("shard-*.safetensors"))
        if len(shards) > MAX_SHARDS:
            self._scan()
            self._merge(shards)

    def _write(self, key_arr: np.ndarray, emb: np.ndarray) -> Path:
        name = hashlib.sha256(key_arr.tobytes() + emb.tobytes()).hexdigest()[:32]
        path = self.root / f"shard-{name}.safetensors"
        tensors = {"keys": torch.from_numpy(key_arr.copy()), "embeddings": torch.from_numpy(emb)}
        atomic_save(path, lambda tmp: save_file(tensors, tmp))
        return path

    def _merge(self, shards: list[Path]) -> None:
        keys = list(self._index)
        found, emb = self.get([k.hex() for k in keys])
        keys = [k for k, f in zip(keys, found, strict=True) if f]
        if not keys:
            return
        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        merged = self._write(key_arr, emb[found])
        for path in shards:
            if path != merged:
                path.unlink(missing_ok=True)
        logger.info("merged %d embedding cache shards into %s", len(shards), merged.name)
        self._scan()


def embed_in_shards(
    compute: Callable[[np.ndarray], np.ndarray],
    n: int,
    dim: int,
    cache: EmbeddingCache | None = None,
    keys: list[str] | None = None,
) -> np.ndarray:
    """Embeddings (n, dim) of items 0..n-1: cached rows read back, the rest computed.

    ``compute(indices)`` returns the (len(indices), dim) embeddings of those items. Missing
    items are computed in chunks of ``SHARD_ROWS``, each written to ``cache`` as one shard
    as soon as it is done (so a killed run resumes from its last complete shard). Under
    torchrun each rank computes its contiguous part and the parts are gathered in order:
    every rank returns the same array as one process would.
    """
    out = np.zeros((n, dim), dtype=np.float32)
    todo = np.arange(n)
    if cache is not None:
        assert keys is not None and len(keys) == n
        found, cached = cache.get(keys)
        out[found] = cached[found]
        todo = np.flatnonzero(~found)
        if found.any():
            logger.info("embedding cache: %d of %d images found", int(found.sum()), n)
        _distributed.barrier()  # every rank has read the cache before any rank writes
    if not len(todo):
        return out
    mine = _distributed.split(todo)
    parts = [np.zeros((0, dim), dtype=np.float32)]
    for start in range(0, len(mine), SHARD_ROWS):
        idx = mine[start : start + SHARD_ROWS]
        emb = np.asarray(compute(idx), dtype=np.float32)
        if cache is not None and keys is not None:
            cache.put([keys[i] for i in idx], emb, merge=False)
        parts.append(emb)
    out[todo] = _distributed.gather_rows(np.concatenate(parts, axis=0))
    if cache is not None:
        _distributed.barrier()  # all shards written
        if _distributed.is_main():
            cache.compact()
        _distributed.barrier()  # merged before any rank reads the cache again
    return out


__all__ = ["SHARD_ROWS", "EmbeddingCache", "embed_in_shards"]
