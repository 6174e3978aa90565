"""Unimodal inference (Section 2.4): per modality an encoder q~(z | X_i) trained by eq 18, optionally a
cluster head p~(c | X_i), and with a free expert amplitude an amplitude regression per (source, curve) pair,
so one cheap modality predicts the clusters and curves of the others (eqs 13-14 under p~(c | X_i))."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pima_hpc.data.base import CURVE, DatasetSpec
from pima_hpc.model.networks import build_classifier, build_encoder
from pima_hpc.model.pima import PIMA

if TYPE_CHECKING:
    from pima_hpc.config import ModelConfig


def amplitude_key(src: str, dst: str) -> str:
    return f"{src}_to_{dst}"



class CrossModalEncoders(nn.Module):
    """Unimodal inference (Section 2.4): per modality, q~(z | X_i) with the architecture of q(z | X_i),
    trained by eq 18, optionally a cluster head p~(c | X_i), and, with a free expert amplitude, an
    amplitude regression per (source modality, curve modality) pair (docs/method.md)."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, cluster_head: bool = False):
        super().__init__()
        self.encoders = nn.ModuleDict({m.name: build_encoder(m, cfg.image_channels, cfg.curve_channels,
                                                             cfg.latent_dim) for m in spec.modalities})
        self.classifiers = nn.ModuleDict({m.name: build_classifier(m, cfg.image_channels, cfg.curve_channels,
                                                                   cfg.n_clusters) for m in spec.modalities}
                                         if cluster_head else {})
        curves = [m.name for m in spec.modalities if m.kind == CURVE]
        # log a_c ~ [mu~_src, 1] W_c + N(0, s_c^2): set in closed form (pima_hpc.train.amplitude)
        self.amplitude_keys = ([amplitude_key(m.name, dst) for m in spec.modalities for dst in curves if m.name != dst]
                               if cfg.expert_amplitude == "free" else [])
        for key in self.amplitude_keys:
            self.register_buffer(f"amplitude_coef_{key}", torch.zeros(cfg.latent_dim + 1, cfg.n_clusters,
                                                                      dtype=torch.float64))
            self.register_buffer(f"amplitude_logvar_{key}", torch.zeros(cfg.n_clusters, dtype=torch.float64))

    def amplitude_features(self, src: str, x: torch.Tensor) -> torch.Tensor:
        """[mu~_src, 1]: the regressors of the amplitude model, (B, l + 1)."""
        mu, _ = self.encoders[src](x)
        return torch.cat([mu, torch.ones_like(mu[:, :1])], dim=1)

    def set_amplitude_model(self, src: str, dst: str, coef, logvar) -> None:
        getattr(self, f"amplitude_coef_{amplitude_key(src, dst)}").copy_(torch.as_tensor(coef))
        getattr(self, f"amplitude_logvar_{amplitude_key(src, dst)}").copy_(torch.as_tensor(logvar))

    def log_amplitude(self, src: str, dst: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, log-variance) of log a of curve ``dst`` given each cluster, from modality ``src``: (B, C) each."""
        key = amplitude_key(src, dst)
        if key not in self.amplitude_keys:
            return None
        coef = getattr(self, f"amplitude_coef_{key}")
        feats = self.amplitude_features(src, x)
        mean = (feats.to(coef.dtype) @ coef).to(feats.dtype)
        return mean, getattr(self, f"amplitude_logvar_{key}").to(feats.dtype).expand_as(mean)

    @torch.no_grad()
    def predict_curve(self, model: PIMA, src: str, dst: str, x: torch.Tensor, physical: bool = True):
        """Curve ``dst`` from modality ``src`` alone: MoE mean and variance (eqs 13-14) under p~(c | X_src)."""
        gamma = self.log_cluster_posterior(model, src, x).exp()
        return model.predict_curve(dst, gamma, physical, self.log_amplitude(src, dst, x))

    def forward(self, name: str, x: torch.Tensor):
        return self.encoders[name](x)

    def log_cluster_posterior(self, model: PIMA, name: str, x: torch.Tensor) -> torch.Tensor:
        """log p(c | X_i) from modality ``name`` alone: the cluster head where trained, else eq 15 at mu~_i."""
        if name in self.classifiers:
            return self.classifiers[name](x)
        mu, _ = self.encoders[name](x)
        return model.log_responsibilities(mu)
