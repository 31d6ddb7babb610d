"""The NT-Xent loss of the paper's supplement S1.1 (SimCLR's normalised temperature-scaled
cross entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medmem._errors import InputError


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """NT-Xent loss of K positive pairs ``(z1[i], z2[i])``, averaged over all 2K anchors.

    The paper writes the batch as E = [e_1, e_1', ..., e_K, e_K']; here ``z1`` holds the
    e_i and ``z2`` the e_i' (interleaving them gives E). For every anchor a (each of the 2K
    embeddings, so both directions of each pair) with positive p:

        l_a = -log( exp(s(a, p) / T) / sum_{j != a} exp(s(a, j) / T) ),

    s = cosine similarity, T = temperature; the 2(K - 1) other embeddings of the batch are
    the negatives. The loss is mean_a l_a. (The paper's equation (1) prints the second
    direction without its -log; this is the loss of its reference [32] and the authors'
    code, pytorch-metric-learning's ``NTXentLoss``.)

    Args:
        z1: (K, d) embeddings of the images.
        z2: (K, d) embeddings of their variations.
        temperature: T > 0 (authors' code: 0.07).

    Example:
        >>> z = torch.randn(4, 8)
        >>> float(nt_xent(z, z)) < float(nt_xent(z, torch.randn(4, 8)))
        True
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise InputError(
            f"nt_xent expects z1 and z2 of the same shape (K, d) with K >= 1, got "
            f"{tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    if not temperature > 0:
        raise InputError(f"nt_xent temperature must be > 0, got {temperature!r}.")
    k = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # (2K, d), unit rows
    logits = (z @ z.T) / temperature  # (2K, 2K) cosine similarity / T
    self_mask = torch.eye(2 * k, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # j != a
    idx = torch.arange(k, device=z.device)
    positives = torch.cat([idx + k, idx])  # anchor a in z1 pairs with a + K, and back
    return F.cross_entropy(logits, positives)


def multi_positive_nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Multi-positive NT-Xent (supervised contrastive, SupCon's L_out) over patient labels.

    The 2K embeddings are E = [z1; z2] with labels [labels; labels]. For every anchor a, the
    positives P(a) are all other embeddings of the same label: its own variation and every
    view of the patient's other images in the batch. With s, T as in :func:`nt_xent`:

        l_a = -1/|P(a)| sum_{p in P(a)} log( exp(s(a, p) / T) / sum_{j != a} exp(s(a, j) / T) ),

    averaged over all 2K anchors. When every label occurs once, P(a) is the anchor's own
    variation and the loss equals :func:`nt_xent`.

    Args:
        z1: (K, d) embeddings of the images.
        z2: (K, d) embeddings of their variations.
        labels: (K,) integer patient label of each image.
        temperature: T > 0.

    Example:
        >>> z = torch.randn(4, 8)
        >>> lab = torch.arange(4)
        >>> bool(torch.isclose(multi_positive_nt_xent(z, z, lab), nt_xent(z, z)))
        True
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise InputError(
            f"multi_positive_nt_xent expects z1 and z2 of the same shape (K, d) with K >= 1, "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    labels = torch.as_tensor(labels, device=z1.device).reshape(-1)
    if labels.shape[0] != z1.shape[0]:
        raise InputError(f"labels must have {z1.shape[0]} entries, got {labels.shape[0]}.")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature!r}.")
    k = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * k, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    lab = torch.cat([labels, labels])
    pos = (lab[:, None] == lab[None, :]) & ~self_mask  # never empty: the own variation
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(dim=1) / pos.sum(dim=1)
    return per_anchor.mean()


__all__ = ["multi_positive_nt_xent", "nt_xent"]
