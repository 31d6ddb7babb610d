"""``Text2ImageConfig``: settings of a text-conditional latent diffusion model, from YAML.

The diffusion UNet and noise schedule reuse :class:`medmem.generative.DiffusionConfig`; the
first stage is a saved ``medmem.generative`` model (its KL autoencoder), referenced by path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medmem._errors import InputError
from medmem._section import ConfigSection
from medmem._validation import check_choice, check_in_range, check_positive_int
from medmem.generative import DiffusionConfig, SamplingConfig

MARKER_MODES = ("keep", "remove", "neutral", "random")


@dataclass(frozen=True)
class TextConfig(ConfigSection):
    """The frozen text encoder and the caption treatment in training.

    Args:
        encoder: local folder of a Hugging Face encoder; None = bundled all-MiniLM-L6-v2.
        max_length: tokens per prompt (padded/truncated); cross-attention sees all of them.
        caption_dropout: probability that a training caption is replaced by the empty prompt
            (classifier-free guidance).
        markers: de-identification markers in training captions: "keep" (as written),
            "remove", "neutral" (replaced by ``neutral_word``) or "random" (a random
            vocabulary word) -- the training-time fix.
        random_variants: with ``markers: random``, each caption gets this many seeded
            variants with fresh random words (encoded once); every draw picks one at
            random.
        neutral_word: the word of ``markers: neutral``.
        caption_replacement: probability of replacing a training caption by a random
            sequence of vocabulary words (training-time mitigation "random caption
            replacement", Somepalli et al., NeurIPS 2023). The random captions come from a
            seeded pool of ``random_variants`` x 16 sequences, encoded once, whose lengths
            follow the training captions' word counts.
    """

    encoder: str | None = None
    max_length: int = 64
    caption_dropout: float = 0.1
    markers: str = "keep"
    neutral_word: str = "unspecified"
    random_variants: int = 16
    caption_replacement: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(self.max_length, "text.max_length", minimum=4)
        check_in_range(self.caption_dropout, "text.caption_dropout", 0.0, 1.0, high_open=True)
        check_choice(self.markers, "text.markers", MARKER_MODES)
        check_positive_int(self.random_variants, "text.random_variants")
        check_in_range(self.caption_replacement, "text.caption_replacement", 0.0, 1.0)


@dataclass(frozen=True)
class Text2ImageTrainConfig(ConfigSection):
    """Training loop settings.

    Args:
        seed: seeds initialisation, batches, caption dropout and noise.
        checkpoint_every: checkpoint every N iterations (resume exactly).
        log_every: a losses.csv row every N iterations.
        drop_high_d: training-time mitigation of Wen et al. (ICLR 2024): leave out of the
            loss every sample whose d_t = ||eps(x_t, c) - eps(x_t, empty)||_2 exceeds
            ``drop_high_d`` times the running median of d_t at similar timesteps (10 bins
            of t, the last 256 values each). 0 = off. Wen et al. use a fixed threshold
            tuned per model; a multiple of the median is scale-free, and per-timestep
            because d_t's scale depends strongly on t.
        drop_warmup: iterations before samples are dropped (the medians fill meanwhile).
    """

    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    drop_high_d: float = 0.0
    drop_warmup: int = 1000

    def __post_init__(self) -> None:
        check_positive_int(self.seed, "train.seed", minimum=0)
        if self.drop_high_d != 0.0 and not 1.0 <= float(self.drop_high_d) <= 100.0:
            raise InputError(
                f"train.drop_high_d must be 0 (off) or a factor in [1, 100] times the running "
                f"median of d_t, got {self.drop_high_d}."
            )
        check_positive_int(self.drop_warmup, "train.drop_warmup", minimum=0)
        check_positive_int(self.checkpoint_every, "train.checkpoint_every")
        check_positive_int(self.log_every, "train.log_every")


@dataclass(frozen=True)
class Text2ImageConfig(ConfigSection):
    """All settings of one text-to-image LDM.

    Args:
        data: CSV of training pairs (columns ``path_column`` and ``text_column``; paths
            relative to the CSV's folder).
        path_column, text_column: its columns.
        autoencoder: a saved ``medmem.generative`` model (or run folder) whose KL
            autoencoder is the frozen first stage.
        diffusion: the UNet (cross-attention at the levels with attention) and schedule.
        guidance_scale: classifier-free guidance scale in sampling.
        sampling: default sampler and steps.
        text, train: the sections above.
    """

    data: str | None = None
    path_column: str = "path"
    text_column: str = "text"
    autoencoder: str | None = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    guidance_scale: float = 5.0
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(sampler="ddim", steps=50)
    )
    text: TextConfig = field(default_factory=TextConfig)
    train: Text2ImageTrainConfig = field(default_factory=Text2ImageTrainConfig)

    def __post_init__(self) -> None:
        check_in_range(self.guidance_scale, "guidance_scale", 0.0, 100.0)
        if not any(self.diffusion.attention_levels):
            raise InputError(
                "diffusion.attention_levels: at least one level needs attention, where the "
                "UNet cross-attends to the prompt (e.g. [false, true, true])."
            )


def load_t2i_config(path: str | Path) -> Text2ImageConfig:
    """Read a YAML config; relative ``data``/``autoencoder``/``text.encoder`` paths are
    relative to the YAML file's folder.

    Example:
        >>> cfg = load_t2i_config("configs/text2image/ldm-t2i-cpu.yaml")  # doctest: +SKIP
    """
    keys = ((None, "data"), (None, "autoencoder"), ("text", "encoder"))
    return Text2ImageConfig.from_yaml(path, keys)


__all__ = [
    "MARKER_MODES",
    "Text2ImageConfig",
    "Text2ImageTrainConfig",
    "TextConfig",
    "load_t2i_config",
]
