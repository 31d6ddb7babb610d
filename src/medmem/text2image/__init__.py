"""Text-to-image memorization: which prompts and tokens make a model regurgitate patients.

A text-conditional latent diffusion model (the KL autoencoder of ``medmem.generative``, a
MONAI cross-attention UNet, a frozen text encoder; classifier-free guidance) is trained on
(image, report) pairs. Its prompts are then scored for memorization -- d_t (Wen et al., ICLR
2024) and cross-attention entropy (Ren et al., ECCV 2024) -- their tokens ranked by the
gradient of d_t, de-identification markers ("XXXX", "___") analysed as their own group, and
inference-time mitigations measured the same way.

Example:
    >>> from medmem import text2image as t2i
    >>> cfg = t2i.load_t2i_config("configs/text2image/ldm-t2i-cpu.yaml")  # doctest: +SKIP
    >>> model = t2i.train_t2i(cfg, "runs/t2i").model  # doctest: +SKIP
    >>> gen = t2i.generate(model, model.encode_prompts(["No acute disease."]))  # doctest: +SKIP
    >>> gen.scores()["d_first"]  # doctest: +SKIP
"""

from __future__ import annotations

from medmem.text2image._analysis import (
    MARKER_GROUP,
    plot_bars,
    plot_score_histogram,
    plot_score_per_step,
    plot_step_auroc,
    pool_tokens,
    rank_prompts,
    token_table,
    write_html,
    write_table,
)
from medmem.text2image._config import (
    MARKER_MODES,
    Text2ImageConfig,
    Text2ImageTrainConfig,
    TextConfig,
    load_t2i_config,
)
from medmem.text2image._copies import CopyFlags, CopyJudge
from medmem.text2image._encoder import (
    MARKER_RE,
    EncodedText,
    TextEncoder,
    default_encoder_path,
    is_marker,
    words_of,
)
from medmem.text2image._mitigations import (
    DEFAULT_STRENGTH,
    MITIGATIONS,
    Mitigation,
    mitigated_generate,
    optimize_prompt,
)
from medmem.text2image._model import AttentionControl, TextToImageModel, build_conditional_unet
from medmem.text2image._scores import (
    MID_WINDOW,
    SCORES,
    Generation,
    detection,
    gap_gradient,
    generate,
    guidance_gap,
    initial_noise,
    token_significance,
)
from medmem.text2image._summaries import (
    auroc_per_step,
    detection_table,
    label_summary,
    marker_ablation,
    marker_attribution,
    marker_with_vs_without,
)
from medmem.text2image._train import Pairs, T2ITrainResult, read_pairs, train_t2i, treat_markers
from medmem.text2image._workflow import (
    audit_mitigations,
    compare_mitigations,
    read_prompts,
    score_prompts,
)

__all__ = [
    "DEFAULT_STRENGTH",
    "MARKER_GROUP",
    "MARKER_MODES",
    "MARKER_RE",
    "MID_WINDOW",
    "MITIGATIONS",
    "SCORES",
    "AttentionControl",
    "CopyFlags",
    "CopyJudge",
    "EncodedText",
    "Generation",
    "Mitigation",
    "Pairs",
    "T2ITrainResult",
    "Text2ImageConfig",
    "Text2ImageTrainConfig",
    "TextConfig",
    "TextEncoder",
    "TextToImageModel",
    "audit_mitigations",
    "auroc_per_step",
    "build_conditional_unet",
    "compare_mitigations",
    "default_encoder_path",
    "detection",
    "detection_table",
    "gap_gradient",
    "generate",
    "guidance_gap",
    "initial_noise",
    "is_marker",
    "label_summary",
    "load_t2i_config",
    "marker_ablation",
    "marker_attribution",
    "marker_with_vs_without",
    "mitigated_generate",
    "optimize_prompt",
    "plot_bars",
    "plot_score_histogram",
    "plot_score_per_step",
    "plot_step_auroc",
    "pool_tokens",
    "rank_prompts",
    "read_pairs",
    "read_prompts",
    "score_prompts",
    "token_significance",
    "token_table",
    "train_t2i",
    "treat_markers",
    "words_of",
    "write_html",
    "write_table",
]
