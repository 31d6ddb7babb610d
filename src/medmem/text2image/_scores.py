"""Prompt-level memorization scores, their detection accuracy, and token attribution.

* d_t (Wen et al., ICLR 2024): the norm of the text-conditional minus the unconditional
  noise prediction, ``||eps(x_t, c) - eps(x_t, empty)||_2``, at every sampling step of every
  generation. Memorized prompts pull the prediction hard towards one image, so d_t is large
  from the first step on.
* Cross-attention entropy (Ren et al., ECCV 2024): entropy of the attention over the prompt's
  ``max_length`` key positions (padding included: the UNet attends to it), averaged over
  heads, queries and cross-attention layers. Non-memorized prompts put
  most attention on few tokens (the beginning token); memorized ones spread it over their
  trigger tokens: the first-step entropy is higher.
* Token significance: the mean over steps of the gradient norm of d_t with respect to the
  text encoder's output state of each token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmem._errors import InputError
from medmem._progress import progress
from medmem._seeds import derive_seed
from medmem._stats import auroc
from medmem.text2image._encoder import EncodedText
from medmem.text2image._model import TextToImageModel

SCORES = ("d_first", "d_mean", "d_mid", "entropy_first")
# d_mid averages d_t over the sampling steps with t / num_train_timesteps in this window. It
# was chosen on the first CPU study run (seed 0, docs/results/text2image.md), where those
# steps separated the duplicated prompts best, and then fixed before it was tested on
# models trained afterwards.
MID_WINDOW = (0.74, 0.88)


def mid_steps(timesteps: list[int], num_train_timesteps: int) -> list[int]:
    """Indices of the sampling steps inside ``MID_WINDOW`` (the closest one if none is)."""
    lo, hi = MID_WINDOW
    frac = [t / num_train_timesteps for t in timesteps]
    inside = [i for i, f in enumerate(frac) if lo <= f <= hi]
    if inside:
        return inside
    centre = (lo + hi) / 2
    return [min(range(len(frac)), key=lambda i: abs(frac[i] - centre))]


@dataclass
class Generation:
    """Images and per-step scores of ``n_per_prompt`` generations of each prompt.

    Attributes:
        images: float (P, G, 1, H, W) in [0, 1].
        d: float (P, G, S): d_t per sampling step (S steps, first = noisiest).
        entropy: float (P, G, S): cross-attention entropy of the conditional pass.
        timesteps: the S timesteps.
        latents: (P, G, S, C, *spatial) latents entering each step, when kept.
        num_train_timesteps: the model's T (places the steps in ``MID_WINDOW``).
    """

    images: torch.Tensor
    d: torch.Tensor
    entropy: torch.Tensor
    timesteps: list[int]
    latents: torch.Tensor | None = None
    num_train_timesteps: int = 1000

    def scores(self) -> dict[str, np.ndarray]:
        """Per-prompt scores (means over generations): d_t at the first step, over all
        steps and over the steps in ``MID_WINDOW``; the first-step attention entropy."""
        mid = mid_steps(self.timesteps, self.num_train_timesteps)
        return {
            "d_first": self.d[:, :, 0].mean(1).numpy(),
            "d_mean": self.d.mean((1, 2)).numpy(),
            "d_mid": self.d[:, :, mid].mean((1, 2)).numpy(),
            "entropy_first": self.entropy[:, :, 0].mean(1).numpy(),
        }

    def save(self, path: str | Path, **meta: Any) -> Path:
        """Images, d_t and entropy as one safetensors file (no latents), with the
        timesteps and any JSON-able ``meta`` (e.g. ``seconds``); :meth:`load` reads it."""
        from medmem._io import save_tensors

        tensors = {"d": self.d, "entropy": self.entropy, "images": self.images}
        info = {"timesteps": list(self.timesteps), **meta}
        info["num_train_timesteps"] = self.num_train_timesteps
        save_tensors(path, {k: v.contiguous() for k, v in tensors.items()}, info)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> tuple[Generation, dict[str, Any]]:
        """``(generation, meta)`` of a file written by :meth:`save`."""
        from medmem._io import load_tensors

        meta, t = load_tensors(path, fix="Write it with Generation.save.")
        gen = cls(t["images"], t["d"], t["entropy"], list(meta["timesteps"]),
                  num_train_timesteps=int(meta.get("num_train_timesteps", 1000)))  # fmt: skip
        return gen, meta


def initial_noise(model: TextToImageModel, n: int, seed: int) -> torch.Tensor:
    """x_T of generations 0..n-1: the same for every prompt (paired comparisons)."""
    return torch.stack(
        [
            torch.randn(
                model.latent_shape, generator=torch.Generator().manual_seed(derive_seed(seed, g))
            )
            for g in range(n)
        ]
    )


def guidance_gap(
    model: TextToImageModel, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, eps_cond, eps_uncond) for latents z (B, ...), timesteps t (B,), cond (B, L, d);
    d = ||eps_cond - eps_uncond||_2 per item. Differentiable in ``cond``."""
    with torch.no_grad():
        eps_u = model.eps(z, t, model.empty.states.to(z.dtype).expand(len(z), -1, -1))
    eps_c = model.eps(z, t, cond)
    d = (eps_c - eps_u).flatten(1).norm(dim=1)
    return d, eps_c, eps_u


@torch.no_grad()
def generate(
    model: TextToImageModel,
    cond: EncodedText,
    *,
    n_per_prompt: int = 4,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 32,
    key_mask: torch.Tensor | None = None,
    begin_scale: float | None = None,
    keep_latents: bool = False,
    quiet: bool = False,
) -> Generation:
    """Sample ``n_per_prompt`` images per prompt with classifier-free guidance (DDIM),
    recording d_t and the attention entropy at every step.

    Args:
        model: the text-to-image model.
        cond: encoded prompts (``model.encode_prompts``), possibly mitigated.
        n_per_prompt: generations per prompt (initial noises shared across prompts).
        seed: seeds the initial noises.
        steps: DDIM steps (default ``config.sampling.steps``).
        guidance_scale: default ``config.guidance_scale``.
        batch_size: generations per UNet batch.
        key_mask: bool (P, L): keys to keep in the conditional cross-attention (masking).
        begin_scale: multiply the beginning token's attention logit (Ren et al.).
        keep_latents: keep each step's input latents (for token attribution).
        quiet: no progress bar.
    """
    if n_per_prompt < 1:
        raise InputError(f"n_per_prompt must be >= 1, got {n_per_prompt}.")
    steps = steps or model.config.sampling.steps
    g_scale = model.config.guidance_scale if guidance_scale is None else guidance_scale
    n_p = cond.states.shape[0]
    x_T = initial_noise(model, n_per_prompt, seed)
    prompt_of = torch.arange(n_p).repeat_interleave(n_per_prompt)
    gen_of = torch.arange(n_per_prompt).repeat(n_p)
    n = len(prompt_of)
    sched = model.scheduler("ddim")
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    S = len(timesteps)
    d_all = torch.zeros(n, S)
    ent_all = torch.zeros(n, S)
    imgs, lat = [], []
    ctl = model.control
    bar = progress(None, desc="sampling prompts", total=n, quiet=quiet, unit="image")
    empty = model.empty.states
    for b0 in range(0, n, batch_size):
        sel = slice(b0, min(n, b0 + batch_size))
        p_idx, g_idx = prompt_of[sel], gen_of[sel]
        nb = len(p_idx)
        z = x_T[g_idx].clone()
        ctx = torch.cat([cond.states[p_idx], empty.expand(nb, -1, -1)])
        steps_lat = []
        for s, t in enumerate(timesteps):
            if keep_latents:
                steps_lat.append(z.clone())
            tt = torch.full((2 * nb,), t, dtype=torch.long)
            ctl.record = True
            ctl.key_mask = key_mask[p_idx] if key_mask is not None else None
            ctl.begin_scale = begin_scale
            try:
                eps = model.eps(torch.cat([z, z]), tt, ctx)
                ent = ctl.pop_entropy()[:nb]
            finally:
                ctl.record, ctl.key_mask, ctl.begin_scale = False, None, None
            eps_c, eps_u = eps[:nb], eps[nb:]
            d_all[sel, s] = (eps_c - eps_u).flatten(1).norm(dim=1)
            ent_all[sel, s] = ent
            guided = eps_u + g_scale * (eps_c - eps_u)
            z, _ = sched.step(guided, t, z)
        imgs.append(model.decode(z))
        if keep_latents:
            lat.append(torch.stack(steps_lat, 1))
        bar.update(nb)
    bar.close()
    shape = (n_p, n_per_prompt)
    images = torch.cat(imgs)
    return Generation(
        images=images.reshape(*shape, *images.shape[1:]),
        d=d_all.reshape(*shape, S),
        entropy=ent_all.reshape(*shape, S),
        timesteps=timesteps,
        num_train_timesteps=sched.num_train_timesteps,
        latents=torch.cat(lat).reshape(*shape, S, *model.latent_shape) if keep_latents else None,
    )


def detection(positives: np.ndarray, negatives: np.ndarray, *, fpr: float = 0.01) -> dict:
    """AUROC and TPR at ``fpr`` of a score where higher means memorized.

    Convention: the threshold is the (k+1)-th highest negative score, k = floor(fpr * n_neg),
    so that at most ``fpr`` of negatives score strictly above it; TPR is the share of
    positives strictly above it. With fewer than 1/fpr negatives this is the share of
    positives above every negative.

    Example:
        >>> detection(np.array([3.0, 2.0]), np.array([1.0, 2.5]))["auroc"]
        0.75
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.sort(np.asarray(negatives, dtype=np.float64))[::-1]
    if pos.size == 0 or neg.size == 0:
        raise InputError("detection needs at least one positive and one negative prompt.")
    k = int(np.floor(fpr * neg.size))
    thr = neg[min(k, neg.size - 1)]
    return {
        "auroc": auroc(pos, neg),
        "tpr_at_1pct_fpr" if fpr == 0.01 else f"tpr_at_{fpr:g}_fpr": float((pos > thr).mean()),
        "threshold": float(thr),
        "n_pos": int(pos.size),
        "n_neg": int(neg.size),
    }


def gap_gradient(
    model: TextToImageModel, z: torch.Tensor, t: torch.Tensor, states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d_t of each (z[s], t[s]) under one prompt's token states (L, d), and its gradient
    with respect to those states, per step: (S,), (S, L, d)."""
    h = states.detach().to(z.dtype).unsqueeze(0).repeat(len(z), 1, 1).requires_grad_(True)
    with torch.enable_grad():
        d, _, _ = guidance_gap(model, z, t, h)
        (grad,) = torch.autograd.grad(d.sum(), h)  # item s only depends on h[s]
    return d.detach(), grad


def token_significance(
    model: TextToImageModel, gen: Generation, cond: EncodedText, *, quiet: bool = False
) -> np.ndarray:
    """Significance of every token of every prompt: (P, L), the mean over steps and
    generations of ||d d_t / d h_i||_2 (h_i: the encoder's output state of token i).

    ``gen`` must come from :func:`generate` with ``keep_latents=True`` on ``cond``.
    """
    if gen.latents is None:
        raise InputError("token_significance needs generate(..., keep_latents=True).")
    P, G, S = gen.d.shape
    out = np.zeros((P, cond.states.shape[1]))
    t = torch.tensor(gen.timesteps, dtype=torch.long)
    for p in progress(range(P), desc="token attribution", total=P, quiet=quiet):
        acc = torch.zeros(cond.states.shape[1])
        for g in range(G):
            _, grad = gap_gradient(model, gen.latents[p, g], t, cond.states[p])
            acc += grad.norm(dim=-1).mean(0)
        out[p] = (acc / G).numpy()
    return out


__all__ = [
    "SCORES",
    "Generation",
    "detection",
    "gap_gradient",
    "generate",
    "guidance_gap",
    "initial_noise",
    "token_significance",
]
