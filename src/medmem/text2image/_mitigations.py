"""Inference-time mitigations of memorization, applied to the prompt before sampling.

* ``gaussian_noise``: Gaussian noise on the text encoder's output states, sigma =
  ``strength`` x the states' standard deviation (Somepalli et al., 2023, GNI).
* ``random_tokens``: ``strength`` random whole words of the encoder's vocabulary inserted at
  random positions (RT).
* ``repeat_words``: ``strength`` random words of the prompt repeated in place (CWR).
* ``random_numbers``: ``strength`` random integers inserted at random positions (RNA).
* ``prompt_optimization``: the token states are optimised (Adam, lr 0.05, ``strength``
  steps) to minimise d_t at the first sampling step over fresh noises (Wen et al., 2024).
* ``attention_rescale``: in every cross-attention of the conditional pass, padding keys are
  masked out and the beginning token's logit is multiplied by ``strength`` (Ren et al.,
  2024).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from medmem._errors import InputError
from medmem._seeds import derive_seed
from medmem._validation import check_choice
from medmem.text2image._encoder import EncodedText
from medmem.text2image._model import TextToImageModel
from medmem.text2image._scores import Generation, generate, guidance_gap

MITIGATIONS = (
    "none",
    "gaussian_noise",
    "random_tokens",
    "repeat_words",
    "random_numbers",
    "prompt_optimization",
    "attention_rescale",
)
DEFAULT_STRENGTH = {
    "none": 0.0,
    "gaussian_noise": 0.5,
    "random_tokens": 4,
    "repeat_words": 4,
    "random_numbers": 4,
    "prompt_optimization": 10,
    "attention_rescale": 1.25,
}


@dataclass(frozen=True)
class Mitigation:
    """One inference-time mitigation and its strength (None: the default above)."""

    kind: str = "none"
    strength: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.kind, "mitigation", MITIGATIONS)
        if self.strength is not None and self.strength < 0:
            raise InputError(f"mitigation strength must be >= 0, got {self.strength}.")

    @property
    def value(self) -> float:
        """The strength in use."""
        return float(DEFAULT_STRENGTH[self.kind] if self.strength is None else self.strength)

    @property
    def label(self) -> str:
        """e.g. "random_tokens(4)"."""
        return "none" if self.kind == "none" else f"{self.kind}({self.value:g})"

    def texts(self, prompts: list[str], vocab: list[str]) -> list[str]:
        """The prompts after a text-level mitigation (unchanged for the others)."""
        if self.kind not in ("random_tokens", "repeat_words", "random_numbers"):
            return list(prompts)
        k = int(round(self.value))
        out = []
        for i, text in enumerate(prompts):
            rng = random.Random(derive_seed(self.seed, 11, i))
            words = text.split()
            for _ in range(k):
                if self.kind == "random_tokens":
                    new = vocab[rng.randrange(len(vocab))]
                elif self.kind == "repeat_words":
                    new = words[rng.randrange(len(words))] if words else ""
                else:
                    new = str(rng.randrange(0, 10**6))
                words.insert(rng.randrange(len(words) + 1), new)
            out.append(" ".join(w for w in words if w))
        return out

    def prepare(self, model: TextToImageModel, prompts: list[str]) -> tuple[EncodedText, dict]:
        """Encoded (mitigated) prompts and the ``generate`` keyword arguments it needs."""
        texts = self.texts(prompts, model.encoder.vocab_words())
        cond = model.encode_prompts(texts)
        kwargs: dict[str, Any] = {}
        if self.kind == "gaussian_noise":
            gen = torch.Generator().manual_seed(derive_seed(self.seed, 12))
            noise = torch.randn(cond.states.shape, generator=gen)
            cond.states = cond.states + self.value * cond.states.std() * noise
        elif self.kind == "prompt_optimization":
            cond.states = optimize_prompt(model, cond.states, steps=int(self.value), seed=self.seed)
        elif self.kind == "attention_rescale":
            kwargs = {"key_mask": cond.mask.clone(), "begin_scale": self.value}
        return cond, kwargs


def optimize_prompt(
    model: TextToImageModel,
    states: torch.Tensor,
    *,
    steps: int = 10,
    lr: float = 0.05,
    n_noise: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """Token states (P, L, d) moved by Adam to minimise the first-step d_t (Wen et al.)."""
    e = states.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([e], lr=lr)
    sched = model.scheduler("ddim")
    sched.set_timesteps(model.config.sampling.steps)
    t0 = int(sched.timesteps[0])
    P = len(e)
    for k in range(steps):
        gen = torch.Generator().manual_seed(derive_seed(seed, 13, k))
        z = torch.randn((P * n_noise, *model.latent_shape), generator=gen)
        t = torch.full((P * n_noise,), t0, dtype=torch.long)
        with torch.enable_grad():
            d, _, _ = guidance_gap(model, z, t, e.repeat_interleave(n_noise, 0))
            loss = d.mean()
            opt.zero_grad()
            loss.backward()
        opt.step()
    return e.detach()


def mitigated_generate(
    model: TextToImageModel, prompts: list[str], mitigation: Mitigation, **kwargs: Any
) -> Generation:
    """:func:`generate` on ``prompts`` under ``mitigation`` (same noises as unmitigated)."""
    cond, extra = mitigation.prepare(model, prompts)
    return generate(model, cond, **extra, **kwargs)


__all__ = ["DEFAULT_STRENGTH", "MITIGATIONS", "Mitigation", "mitigated_generate", "optimize_prompt"]
