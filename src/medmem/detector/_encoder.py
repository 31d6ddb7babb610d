"""``ContrastiveEncoder``: the network that projects an image onto its embedding.

One code path for 2D and 3D through ``spatial_dims``, built from MONAI blocks:

* ``arch="resnet"`` (2D default): the paper's 2D model follows Packhäuser et al., a ResNet
  whose last classification layer is replaced by a dense layer with 128 outputs. Here it is
  ``monai.networks.nets.ResNet`` with basic blocks, ``num_classes=embed_dim``, and a
  stride-2 stem as in torchvision (MONAI's default stem keeps full resolution, ~4x slower).
* ``arch="conv"`` (3D default): the paper's 3D model, modified from MedDiff's VQ-VAE
  encoder: strided convolutions reduce the input to 4^d voxels x 8 channels, which are
  flattened and reduced by dense layers to a 32-d vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmem._errors import InputError
from medmem._validation import check_choice, check_positive_int
from medmem.detector._config import ARCHS, NORMS, conv_downsamplings


def _norm(norm: str) -> str | tuple:
    if norm == "group":
        return ("group", {"num_groups": 8})
    if norm == "instance":
        return ("instance", {"affine": True})
    return norm


class ContrastiveEncoder(nn.Module):
    """Image (B, C, *image_size) -> embedding (B, embed_dim); the paper's SS_theta.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        embed_dim: embedding length (default 128 in 2D, 32 in 3D, as in the paper).
        arch: "resnet" (default) or "conv" (the paper's 3D encoder).
        image_size: input size; required for "conv" (fixes the number of downsamplings and
            the dense layer), checked on input when given.
        input_size: the size the network works at: inputs of ``image_size`` are first
            resampled to it (area averaging when shrinking, an anti-aliased downsampling), so
            a 128x128 image costs what a 64x64 one does. None: ``image_size`` (no resampling).
        norm: "batch", "group" or "instance".
        resnet_layers, resnet_channels: blocks and channels of the four ResNet stages.
        conv_channels, conv_max_channels: stem channels of "conv", doubled per downsampling
            up to the cap.
        latent_channels: bottleneck channels of "conv" (paper: 8).
        hidden_dim, dropout: the dense head of "conv" (authors' code: 128, 0.5).

    Example:
        >>> enc = ContrastiveEncoder(3, arch="conv", image_size=(32, 32, 32))
        >>> enc(torch.rand(2, 1, 32, 32, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        embed_dim: int | None = None,
        *,
        arch: str | None = None,
        image_size: Sequence[int] | None = None,
        input_size: Sequence[int] | None = None,
        norm: str = "group",
        resnet_layers: Sequence[int] = (1, 1, 1, 1),
        resnet_channels: Sequence[int] = (32, 64, 128, 256),
        conv_channels: int = 16,
        conv_max_channels: int = 256,
        latent_channels: int = 8,
        hidden_dim: int = 128,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_choice(spatial_dims, "spatial_dims", (2, 3))
        arch = arch if arch is not None else "resnet"
        embed_dim = embed_dim if embed_dim is not None else (128 if spatial_dims == 2 else 32)
        check_choice(arch, "arch", ARCHS)
        check_choice(norm, "norm", NORMS)
        check_positive_int(embed_dim, "embed_dim", minimum=2)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.arch = arch
        self.image_size = tuple(int(s) for s in image_size) if image_size is not None else None
        if self.image_size is not None and len(self.image_size) != spatial_dims:
            raise InputError(
                f"image_size must have {spatial_dims} sides for spatial_dims={spatial_dims}, "
                f"got {self.image_size}."
            )
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        if self.input_size is not None and len(self.input_size) != spatial_dims:
            raise InputError(
                f"input_size must have {spatial_dims} sides for spatial_dims={spatial_dims}, "
                f"got {self.input_size}."
            )
        if self.input_size == self.image_size:
            self.input_size = None  # nothing to resample
        net_size = self.input_size or self.image_size
        if arch == "resnet":
            from monai.networks.nets import ResNet  # imported here: ~0.5 s, only when needed

            self.net = ResNet(
                block="basic",
                layers=list(resnet_layers),
                block_inplanes=list(resnet_channels),
                spatial_dims=spatial_dims,
                n_input_channels=in_channels,
                conv1_t_size=7,
                conv1_t_stride=2,
                num_classes=embed_dim,
                norm=_norm(norm),
            )
        else:
            if net_size is None:
                raise InputError(
                    "arch='conv' needs image_size (its dense layer depends on it); pass e.g. "
                    "image_size=(64, 64, 64)."
                )
            self.net = _build_conv_encoder(
                spatial_dims,
                in_channels,
                embed_dim,
                net_size,
                norm=norm,
                channels=conv_channels,
                max_channels=conv_max_channels,
                latent_channels=latent_channels,
                hidden_dim=hidden_dim,
                dropout=dropout,
            )

        # channels-last weights: oneDNN's convolutions then run channels-last, measured
        # 1.3-1.5x faster for training on 2 CPU cores (docs/benchmarks/detector-speed.md)
        # at the same result up to float rounding; saved weights stay contiguous.
        self.net.to(
            memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *image_size) -> (B, embed_dim)."""
        expected = self.spatial_dims + 2
        if (
            x.ndim != expected
            or x.shape[1] != self.in_channels
            or (self.image_size is not None and tuple(x.shape[2:]) != self.image_size)
        ):
            size = self.image_size if self.image_size is not None else ("*",) * self.spatial_dims
            raise InputError(
                f"ContrastiveEncoder expects input (B, {self.in_channels}, "
                f"{', '.join(map(str, size))}), got {tuple(x.shape)}."
            )
        if self.input_size is not None:
            x = resample(x, self.input_size)
        return self.net(x)


def resample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, *size): area averaging where every side shrinks (an exact
    box filter for integer factors, so no aliasing), bi/trilinear otherwise."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if all(s <= n for s, n in zip(size, x.shape[2:], strict=True)):
        return torch.nn.functional.interpolate(x, size=size, mode="area")
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False)


def _build_conv_encoder(
    spatial_dims: int,
    in_channels: int,
    embed_dim: int,
    image_size: tuple[int, ...],
    *,
    norm: str,
    channels: int,
    max_channels: int,
    latent_channels: int,
    hidden_dim: int,
    dropout: float,
) -> nn.Sequential:
    """MedDiff-style encoder: stem, (strided conv + residual unit) per halving, 1x1 conv to
    ``latent_channels`` at 4^d, flatten, dense -> ReLU -> dropout -> dense."""
    from monai.networks.blocks import Convolution, ResidualUnit

    downs = list(conv_downsamplings(image_size))
    n_stages = max(downs)
    nrm = _norm(norm)
    layers: list[nn.Module] = [
        Convolution(spatial_dims, in_channels, channels, kernel_size=3, act="relu", norm=nrm)
    ]
    c_in = channels
    for stage in range(n_stages):
        # An axis halves while it is larger than 4, so anisotropic sizes (32, 256, 256) work.
        strides = [2 if d > stage else 1 for d in downs]
        c_out = min(channels * 2 ** (stage + 1), max_channels)
        layers += [
            Convolution(
                spatial_dims, c_in, c_out, strides=strides, kernel_size=3, act="relu", norm=nrm
            ),
            ResidualUnit(
                spatial_dims, c_out, c_out, kernel_size=3, subunits=2, act="relu", norm=nrm
            ),
        ]
        c_in = c_out
    layers += [
        Convolution(spatial_dims, c_in, latent_channels, kernel_size=1, conv_only=True),
        nn.Flatten(),  # (B, latent_channels * 4**spatial_dims)
        nn.Linear(latent_channels * 4**spatial_dims, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, embed_dim),
    ]
    return nn.Sequential(*layers)


__all__ = ["ContrastiveEncoder", "resample"]
