"""Encoders and the data-driven image decoder (Appendix A).

One builder serves every modality: images get 2D convolutions, curves 1D convolutions, each
followed by ELU and BatchNorm, then a linear head to the latent mean and log-variance (eq 4).
Strides of 2 halve the resolution per layer, so cost stays small on CPUs; the decoder mirrors
the encoder with transposed convolutions (eq 12, deterministic mean; Appendix A's "stride 3"
does not preserve the image size, so we use stride-2 upsampling with the same channel plan).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pima_hpc.data.base import CURVE, IMAGE, ModalitySpec


def _conv_stack(kind: str, in_ch: int, channels: list[int]) -> nn.Sequential:
    conv = nn.Conv2d if kind == IMAGE else nn.Conv1d
    norm = nn.BatchNorm2d if kind == IMAGE else nn.BatchNorm1d
    layers, c = [], in_ch
    for out in channels:
        layers += [conv(c, out, kernel_size=3, stride=2, padding=1), nn.ELU(), norm(out)]
        c = out
    return nn.Sequential(*layers)


def _downsampled(size: int, n_layers: int) -> int:
    for _ in range(n_layers):
        size = (size - 1) // 2 + 1  # kernel 3, stride 2, padding 1
    return size


class ConvFeatures(nn.Module):
    """The convolutional trunk shared by every per-modality network: X_i -> a flat feature vector."""

    def __init__(self, spec: ModalitySpec, channels: list[int]):
        super().__init__()
        self.kind = spec.kind
        if spec.kind == IMAGE:
            in_ch, spatial = spec.shape[0], spec.shape[1:]
        else:
            in_ch, spatial = 1, spec.shape
        self.features = _conv_stack(spec.kind, in_ch, channels)
        self.size = channels[-1] * math.prod(_downsampled(s, len(channels)) for s in spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == CURVE:
            x = x.unsqueeze(1)
        return self.features(x).flatten(1)


class Encoder(ConvFeatures):
    """q(z | X_i) = N(mu_i, diag exp(logvar_i)) for one modality (eq 4)."""

    def __init__(self, spec: ModalitySpec, channels: list[int], latent_dim: int):
        super().__init__(spec, channels)
        self.head = nn.Linear(self.size, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(super().forward(x)).chunk(2, dim=-1)
        # Bounded log-variance keeps the PoE precisions finite early in training.
        return mu, logvar.clamp(-12.0, 8.0)


class ImageDecoder(nn.Module):
    """The data-driven decoder G_i(z) of eq 12: linear layer, then stride-2 transposed convs."""

    def __init__(self, spec: ModalitySpec, channels: list[int], latent_dim: int):
        super().__init__()
        c_out, h, w = spec.shape
        n_up = len(channels)
        self.start = (channels[0], _downsampled(h, n_up), _downsampled(w, n_up))
        self.out_shape = (c_out, h, w)
        self.fc = nn.Linear(latent_dim, math.prod(self.start))
        chans = list(channels) + [channels[-1]]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(a, b, kernel_size=3, stride=2, padding=1, output_padding=1), nn.ReLU()]
        self.upsample = nn.Sequential(*layers)
        # Appendix A: the last layer is a stride-1 convolution down to the image channels.
        self.to_image = nn.Conv2d(channels[-1], c_out, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(z)).view(-1, *self.start)
        x = self.upsample(h)[..., : self.out_shape[1], : self.out_shape[2]]  # odd sizes: crop
        return torch.sigmoid(self.to_image(x))  # data are normalised to [0, 1] (Appendix A)


CURVE_DECODER_HIDDEN = 64


class CurveDecoder(nn.Module):
    """A data-driven decoder of a curve, z -> its L values (the paper's black-box decoder for a curve).

    An MLP: curves are short (tens to hundreds of points) and smooth, so two hidden layers suffice."""

    def __init__(self, spec: ModalitySpec, latent_dim: int, hidden: int = CURVE_DECODER_HIDDEN):
        super().__init__()
        (length,) = spec.shape
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                                 nn.Linear(hidden, length))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ClusterClassifier(ConvFeatures):
    """log p~(c | X_i): the cross-modal cluster head (not in the paper; docs/method.md)."""

    def __init__(self, spec: ModalitySpec, channels: list[int], n_clusters: int):
        super().__init__(spec, channels)
        self.head = nn.Linear(self.size, n_clusters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(super().forward(x)), dim=-1)


def build_encoder(spec: ModalitySpec, image_channels: list[int], curve_channels: list[int],
                  latent_dim: int) -> Encoder:
    return Encoder(spec, image_channels if spec.kind == IMAGE else curve_channels, latent_dim)


def build_classifier(spec: ModalitySpec, image_channels: list[int], curve_channels: list[int],
                     n_clusters: int) -> ClusterClassifier:
    return ClusterClassifier(spec, image_channels if spec.kind == IMAGE else curve_channels, n_clusters)

