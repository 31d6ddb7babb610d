"""``TextToImageModel``: a frozen KL autoencoder and text encoder, a cross-attention UNet.

The UNet (MONAI ``DiffusionModelUNet(with_conditioning=True)``) cross-attends, at every
level with attention and in its middle block, to the last-layer hidden states of every
prompt token. Cross-attention runs through :class:`AttentionControl`, which can record the
attention probabilities (entropy score, Ren et al.) and edit the logits (mitigation).
Saved as JSON + safetensors; the text encoder is referenced by path, not copied.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from monai.networks.blocks import CrossAttentionBlock
from monai.networks.nets import DiffusionModelUNet
from torch import nn

import medmem
from medmem._errors import InputError
from medmem._io import MODEL_CONFIG, load_tensors, save_model_folder
from medmem._validation import require_einops
from medmem.generative import (
    DiffusionConfig,
    GenerativeConfig,
    GenerativeModel,
    build_autoencoder,
    latent_shape,
    make_scheduler,
)
from medmem.text2image._config import Text2ImageConfig
from medmem.text2image._encoder import EncodedText, TextEncoder

SCHEMA_VERSION = 1
MODEL_KIND = "medmem.text2image.TextToImageModel"
CONFIG_NAME = MODEL_CONFIG


def build_conditional_unet(
    diffusion: DiffusionConfig,
    latent_channels: int,
    cross_attention_dim: int,
    spatial_dims: int = 2,
) -> DiffusionModelUNet:
    """The diffusion UNet with cross-attention to ``cross_attention_dim``-sized token states."""
    require_einops("diffusion")
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=latent_channels,
        out_channels=latent_channels,
        channels=diffusion.channels,
        num_res_blocks=diffusion.num_res_blocks,
        attention_levels=diffusion.attention_levels,
        num_head_channels=diffusion.num_head_channels,
        norm_num_groups=diffusion.norm_num_groups,
        with_conditioning=True,
        cross_attention_dim=cross_attention_dim,
        transformer_num_layers=1,
    )


class AttentionControl:
    """Runs the UNet's cross-attention by hand: records entropies, edits logits.

    Attributes (set before a forward pass):
        record: keep the per-item attention entropy of every cross-attention call.
        key_mask: bool (B_edit, L): False keys are masked out (-inf) for the first
            ``B_edit`` batch items (attention masking); None = off.
        begin_scale: the logit of key 0 ([CLS], the beginning token) is multiplied by this
            for the first ``B_edit`` items (Ren et al.'s rescaling); None = off.
        entropy_mask: bool (B, L): entropy is computed over these keys only (renormalised);
            None = all keys.
        entropies: per call, (B,) entropy averaged over heads and queries.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.modules = [m for m in unet.modules() if isinstance(m, CrossAttentionBlock)]
        self.record = False
        self.key_mask: torch.Tensor | None = None
        self.begin_scale: float | None = None
        self.entropy_mask: torch.Tensor | None = None
        self.entropies: list[torch.Tensor] = []
        self._saved: list[Any] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[AttentionControl]:
        """Route cross-attention through :meth:`_forward` inside the block."""
        for m in self.modules:
            self._saved.append(m.forward)
            m.forward = lambda x, context=None, _m=m: self._forward(_m, x, context)
        try:
            yield self
        finally:
            for m, f in zip(self.modules, self._saved, strict=True):
                m.forward = f
            self._saved = []

    def pop_entropy(self) -> torch.Tensor:
        """Mean entropy over the recorded calls (layers), per batch item; clears the record."""
        if not self.entropies:
            raise RuntimeError("no cross-attention call was recorded")
        out = torch.stack(self.entropies).mean(0)
        self.entropies = []
        return out

    def _forward(
        self, m: CrossAttentionBlock, x: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        q = m.input_rearrange(m.to_q(x))  # (B, heads, Q, dh)
        k = m.input_rearrange(m.to_k(context))  # (B, heads, L, dh)
        v = m.input_rearrange(m.to_v(context))
        logits = torch.einsum("blxd,blyd->blxy", q, k) * m.scale  # (B, heads, Q, L)
        if self.begin_scale is not None or self.key_mask is not None:
            logits = logits.clone()
            n = self.key_mask.shape[0] if self.key_mask is not None else logits.shape[0]
            if self.begin_scale is not None:
                logits[:n, :, :, 0] = logits[:n, :, :, 0] * self.begin_scale
            if self.key_mask is not None:
                km = self.key_mask.to(logits.device)[:, None, None, :]
                logits[:n] = logits[:n].masked_fill(~km, float("-inf"))
        p = logits.softmax(dim=-1)
        if self.record:
            with torch.no_grad():
                pe = p.detach()
                if self.entropy_mask is not None:
                    em = self.entropy_mask.to(pe.device)[:, None, None, :].to(pe.dtype)
                    pe = pe * em
                    pe = pe / pe.sum(-1, keepdim=True).clamp_min(1e-12)
                ent = -(pe * pe.clamp_min(1e-12).log()).sum(-1)  # (B, heads, Q)
                self.entropies.append(ent.mean(dim=(1, 2)).float())
        out = torch.einsum("bhxy,bhyd->bhxd", p, v)
        return m.drop_output(m.out_proj(m.out_rearrange(out)))


class TextToImageModel:
    """A text-conditional LDM: ``eps``, ``decode``, ``encode_prompts``, ``save``, ``load``.

    Attributes:
        config: the :class:`Text2ImageConfig`.
        first_stage: the autoencoder's :class:`GenerativeConfig` (image size, latent shape).
        autoencoder, unet: the networks (eval mode; the autoencoder is frozen).
        encoder: the frozen :class:`TextEncoder`.
        scale_factor: latents are multiplied by it before diffusion (1 / std).
        empty: the encoded empty prompt (classifier-free guidance's unconditional input).
        control: the :class:`AttentionControl` of the UNet.

    Example:
        >>> model = TextToImageModel.load("runs/t2i/model")  # doctest: +SKIP
        >>> cond = model.encode_prompts(["No acute disease."])  # doctest: +SKIP
        >>> eps = model.eps(z, t, cond.states)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: Text2ImageConfig,
        first_stage: GenerativeConfig,
        autoencoder: nn.Module,
        unet: nn.Module,
        encoder: TextEncoder,
        *,
        scale_factor: float = 1.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.first_stage = first_stage
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.unet = unet
        self.encoder = encoder
        self.scale_factor = float(scale_factor)
        self.info = dict(info or {})
        self.empty = encoder.encode([""])
        self.control = AttentionControl(unet)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls, config: Text2ImageConfig, *, encoder: TextEncoder | None = None
    ) -> TextToImageModel:
        """A fresh model: the autoencoder of ``config.autoencoder``, a random UNet."""
        if not config.autoencoder:
            raise InputError(
                "config.autoencoder is required: a saved medmem.generative model (e.g. a VAE "
                "trained with medmem generate train) whose KL autoencoder is the first stage."
            )
        gm = GenerativeModel.load(config.autoencoder, device="cpu")
        if "autoencoder" not in gm.networks or gm.config.autoencoder.kind != "kl":
            raise InputError(
                f"{config.autoencoder}: needs a KL autoencoder (model 'vae' or 'ldm' with "
                "autoencoder.kind 'kl')."
            )
        encoder = encoder or TextEncoder(config.text.encoder, max_length=config.text.max_length)
        first = gm.config.replace(model="ldm", diffusion=config.diffusion, sampling=config.sampling)
        unet = build_conditional_unet(
            config.diffusion, first.autoencoder.latent_channels, encoder.dim, first.spatial_dims
        )
        return cls(config, first, gm.networks["autoencoder"], unet, encoder)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(channels, *spatial) of the diffusion latents."""
        return latent_shape(self.first_stage)

    def scheduler(self, sampler: str = "ddim") -> Any:
        """A MONAI DDPM/DDIM scheduler with the model's noise schedule."""
        return make_scheduler(self.first_stage, sampler)

    # ------------------------------------------------------------------ use
    def encode_prompts(self, texts: list[str]) -> EncodedText:
        """Token states of ``texts`` from the frozen text encoder."""
        return self.encoder.encode(list(texts))

    def eps(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predicted noise for latents ``z`` (B, C, *S) at timesteps ``t`` (B,) given token
        states ``context`` (B, L, d)."""
        with self.control.installed():
            return self.unet(z, timesteps=t, context=context)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents (posterior means) of images (B, 1, H, W) in [0, 1]."""
        return self.autoencoder.encode(images)[0].float() * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [0, 1] from scaled latents."""
        return self.autoencoder.decode_stage_2_outputs(z / self.scale_factor).float().clamp(0, 1)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``config.json``, ``unet.safetensors`` and ``autoencoder.safetensors``."""
        return save_model_folder(
            directory,
            {"unet": self.unet, "autoencoder": self.autoencoder},
            {
                "schema_version": SCHEMA_VERSION,
                "kind": MODEL_KIND,
                "config": self.config.to_dict(),
                "first_stage": self.first_stage.to_dict(),
                "text_encoder": self.encoder.path,
                "text_dim": self.encoder.dim,
                "scale_factor": self.scale_factor,
                "info": self.info,
                "medmem_version": medmem.__version__,
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, directory: str | Path, *, encoder: TextEncoder | None = None) -> TextToImageModel:
        """Rebuild a model saved with :meth:`save` (never unpickles); ``directory`` may be a
        run folder (its ``model/`` is used)."""
        directory = Path(directory)
        if (directory / "model" / CONFIG_NAME).is_file():
            directory = directory / "model"
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise InputError(
                f"{cfg_path} not found: {directory} is not a saved text-to-image model "
                "(medmem prompts train writes RUN/model)."
            )
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        if meta.get("kind") != MODEL_KIND or meta.get("schema_version") != SCHEMA_VERSION:
            raise InputError(
                f"{cfg_path}: not a medmem text-to-image model (schema {SCHEMA_VERSION})."
            )
        config = Text2ImageConfig.from_dict(meta["config"], "config")
        first = GenerativeConfig.from_dict(meta["first_stage"], "first_stage")
        encoder = encoder or TextEncoder(meta["text_encoder"], max_length=config.text.max_length)
        if encoder.dim != meta["text_dim"]:
            raise InputError(
                f"{cfg_path}: the model cross-attends to {meta['text_dim']}-d token states but "
                f"the text encoder {encoder.path} gives {encoder.dim}-d ones; use the encoder it "
                "was trained with."
            )
        ae = build_autoencoder(first)
        unet = build_conditional_unet(
            config.diffusion, first.autoencoder.latent_channels, encoder.dim, first.spatial_dims
        )
        for name, net in (("unet", unet), ("autoencoder", ae)):
            _, state = load_tensors(directory / f"{name}.safetensors", fix="Retrain the model.")
            net.load_state_dict(state, strict=True)
        return cls(
            config,
            first,
            ae,
            unet.eval(),
            encoder,
            scale_factor=meta["scale_factor"],
            info=meta.get("info", {}),
        )


__all__ = ["AttentionControl", "TextToImageModel", "build_conditional_unet"]
