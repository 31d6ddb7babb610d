"""The networks (models, in diffusers' sense): built from a config, weights kept apart.

MONAI's generative networks (AutoencoderKL, VQVAE, DiffusionModelUNet, PatchDiscriminator)
plus a small DCGAN-style generator; all take ``spatial_dims`` (one code path for 2D/3D).
"""

from __future__ import annotations

import torch
from monai.networks.nets import VQVAE, AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from torch import nn

from medmem._validation import require_einops
from medmem.generative._config import AutoencoderConfig, GenerativeConfig


def build_autoencoder(config: GenerativeConfig) -> nn.Module:
    """The first stage: AutoencoderKL (kind "kl") or VQVAE (kind "vq"), random weights."""
    ae: AutoencoderConfig = config.autoencoder
    if ae.kind == "kl" and any(ae.attention_levels):
        require_einops("autoencoder")
    if ae.kind == "kl":
        return AutoencoderKL(
            spatial_dims=config.spatial_dims,
            in_channels=1,
            out_channels=1,
            channels=ae.channels,
            latent_channels=ae.latent_channels,
            num_res_blocks=ae.num_res_blocks,
            attention_levels=ae.attention_levels,
            norm_num_groups=ae.norm_num_groups,
            with_encoder_nonlocal_attn=any(ae.attention_levels),
            with_decoder_nonlocal_attn=any(ae.attention_levels),
        )
    n = len(ae.channels)
    return VQVAE(
        spatial_dims=config.spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=ae.channels,
        num_res_layers=ae.num_res_blocks,
        num_res_channels=ae.channels,
        downsample_parameters=((2, 4, 1, 1),) * n,
        upsample_parameters=((2, 4, 1, 1, 0),) * n,
        num_embeddings=ae.num_embeddings,
        embedding_dim=ae.latent_channels,
        commitment_cost=ae.commitment_cost,
    )


def build_unet(config: GenerativeConfig) -> nn.Module:
    """The diffusion UNet on latents (in = out = latent channels)."""
    d = config.diffusion
    c = config.autoencoder.latent_channels
    require_einops("diffusion")  # the UNet's middle block always has attention
    return DiffusionModelUNet(
        spatial_dims=config.spatial_dims,
        in_channels=c,
        out_channels=c,
        channels=d.channels,
        num_res_blocks=d.num_res_blocks,
        attention_levels=d.attention_levels,
        num_head_channels=d.num_head_channels,
        norm_num_groups=d.norm_num_groups,
    )


def build_discriminator(spatial_dims: int, channels: int, layers: int) -> nn.Module:
    """MONAI PatchDiscriminator (as in the MONAI LDM tutorials)."""
    return PatchDiscriminator(
        spatial_dims=spatial_dims,
        channels=channels,
        in_channels=1,
        out_channels=1,
        num_layers_d=layers,
    )


class DCGANGenerator(nn.Module):
    """DCGAN-style generator: a vector of ``latent_dim`` N(0, 1) values -> an image.

    A dense layer makes a (channels, 4, ..., 4) map; each transposed-convolution block
    doubles the sides (BatchNorm + ReLU) until ``image_size``; a last convolution and a
    sigmoid give one channel in [0, 1]. Sides may differ (e.g. 32 x 256 x 256): axes that
    have reached their size stop growing.

    Example:
        >>> g = DCGANGenerator(2, (32, 32), latent_dim=16, channels=32)
        >>> g(torch.randn(2, 16)).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(
        self, spatial_dims: int, image_size: tuple[int, ...], *, latent_dim: int, channels: int
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.channels = channels
        conv_t = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.fc = nn.Linear(latent_dim, channels * 4**spatial_dims)
        blocks: list[nn.Module] = [norm(channels), nn.ReLU(inplace=True)]
        size = [4] * spatial_dims
        c = channels
        while any(s < t for s, t in zip(size, image_size, strict=True)):
            stride = tuple(2 if s < t else 1 for s, t in zip(size, image_size, strict=True))
            kernel = tuple(4 if st == 2 else 3 for st in stride)
            c_out = max(8, c // 2)
            blocks += [
                conv_t(c, c_out, kernel, stride=stride, padding=1, bias=False),
                norm(c_out),
                nn.ReLU(inplace=True),
            ]
            size = [s * st for s, st in zip(size, stride, strict=True)]
            c = c_out
        blocks += [conv(c, 1, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, 1, *image_size) in [0, 1]."""
        x = self.fc(z).view(z.shape[0], self.channels, *([4] * self.spatial_dims))
        return self.net(x)


def build_generator(config: GenerativeConfig) -> nn.Module:
    """The GAN baseline's generator."""
    return DCGANGenerator(
        config.spatial_dims,
        config.image_size,
        latent_dim=config.gan.latent_dim,
        channels=config.gan.channels,
    )


def networks_for_sampling(config: GenerativeConfig) -> dict[str, nn.Module]:
    """Fresh networks a saved model of ``config`` holds (names = weight files)."""
    if config.model == "gan":
        return {"generator": build_generator(config)}
    nets = {"autoencoder": build_autoencoder(config)}
    if config.model == "ldm":
        nets["unet"] = build_unet(config)
    return nets


__all__ = [
    "DCGANGenerator",
    "build_autoencoder",
    "build_discriminator",
    "build_generator",
    "build_unet",
    "networks_for_sampling",
]
