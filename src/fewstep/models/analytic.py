"""The exact analytic teacher: a Gaussian mixture, whose denoiser and data density are known in closed form.

Data ``x0 ~ sum_k w_k N(mu_k, C_k)``. Noised with ``x = x0 + s eps`` the marginal is
``sum_k w_k N(mu_k, C_k + s^2 I)`` and the posterior mean (the ideal denoiser) is

    E[x0 | x] = sum_k r_k(x) (mu_k + C_k (C_k + s^2 I)^{-1} (x - mu_k)),
    r_k(x)    = w_k N(x; mu_k, C_k + s^2 I) / sum_j w_j N(x; mu_j, C_j + s^2 I).

With ``C_k = U_k diag(lam_k) U_k^T`` every inverse and determinant is diagonal in the eigenbasis, so one
evaluation costs O(B K d^2) for any per-sample noise level. Class conditioning: each component may carry
a class label; a call with labels restricts the mixture to that class's components (label index
``num_classes`` means unconditional). Computation runs in float64 and is returned in the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.models.denoiser import Denoiser, as_sigma


class GaussianMixture(Denoiser):
    """Exact denoiser, density and sampler of a Gaussian mixture in any dimension.

    Args:
        weights: ``(K,)`` mixture weights (normalised here).
        means: ``(K, *data_shape)``.
        covariances: ``(K, d, d)`` full covariances, ``(K, d)`` diagonals or ``(K,)`` isotropic variances.
        component_labels: optional ``(K,)`` class of each component, for class-conditional use.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor,
                 component_labels: Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        k = means.shape[0]
        self.data_shape = tuple(means.shape[1:])
        d = math.prod(self.data_shape)
        means = means.reshape(k, d)
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        if covariances.ndim == 1:
            covariances = covariances[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif covariances.ndim == 2:
            covariances = torch.diag_embed(covariances)
        if covariances.shape != (k, d, d):
            raise ValueError(f"covariances must be (K, d, d) = {(k, d, d)}, got {tuple(covariances.shape)}")
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
        eigvals, eigvecs = torch.linalg.eigh(covariances)
        if (eigvals < -1e-12).any():
            raise ValueError("every covariance must be positive semi-definite")
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.register_buffer("means", means)
        self.register_buffer("eigvals", eigvals.clamp_min(0.0))
        self.register_buffer("eigvecs", eigvecs)
        if component_labels is not None:
            component_labels = torch.as_tensor(component_labels, dtype=torch.long)
            if component_labels.shape != (k,):
                raise ValueError(f"component_labels must have shape ({k},)")
            self.num_classes = int(component_labels.max()) + 1
            self.register_buffer("component_labels", component_labels)
        else:
            self.component_labels = None

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _log_weights_for(self, label: Tensor | None, batch: int) -> Tensor:
        """``(B, K)`` log weights, restricted to each sample's class when labels are given."""
        log_w = self.log_weights.expand(batch, -1)
        if label is None or self.component_labels is None:
            return log_w
        label = label.to(self.means.device).reshape(-1, 1)
        keep = (self.component_labels[None, :] == label) | (label == self.num_classes)
        return torch.where(keep, log_w, torch.full_like(log_w, -math.inf))

    def _project(self, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Coordinates ``y = U^T (x - mu)`` ``(B, K, d)`` and variances ``lam + s^2`` ``(B, K, d)``."""
        diff = x[:, None, :] - self.means[None]
        y = torch.einsum("bkd,kde->bke", diff, self.eigvecs)
        var = self.eigvals[None] + (s**2)[:, None, None]
        return y, var

    def _responsibilities(self, y: Tensor, var: Tensor, log_w: Tensor) -> Tensor:
        log_pdf = -0.5 * ((y**2 / var).sum(-1) + torch.log(var).sum(-1) + y.shape[-1] * math.log(2 * math.pi))
        return torch.softmax(log_w + log_pdf, dim=-1)

    def forward(self, x: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        """The exact denoiser; ``cond`` holds class labels (or None)."""
        s = as_sigma(s, x).to(torch.float64)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        y, var = self._project(flat, s)
        resp = self._responsibilities(y, var, self._log_weights_for(cond, x.shape[0]))
        shrunk = y * (self.eigvals[None] / var)
        post_mean = self.means[None] + torch.einsum("bke,kde->bkd", shrunk, self.eigvecs)
        x0 = (resp[..., None] * post_mean).sum(1)
        return x0.reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, s: float | Tensor = 0.0, label: Tensor | None = None) -> Tensor:
        """Exact log-density of the (noised, if ``s > 0``) data at ``x``; ``(B,)`` float64."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        s = as_sigma(s, flat)
        y, var = self._project(flat, s)
        if (var <= 0).any():
            raise ValueError("log_prob at s=0 needs strictly positive-definite covariances")
        log_pdf = -0.5 * ((y**2 / var).sum(-1) + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))
        return torch.logsumexp(self._log_weights_for(label, x.shape[0]) + log_pdf, dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None, label: Tensor | None = None,
               return_components: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` exact samples (float64), optionally with the component index of each."""
        log_w = self._log_weights_for(label, n)
        comp = torch.multinomial(torch.exp(log_w), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scale = self.eigvecs[comp] * torch.sqrt(self.eigvals[comp])[:, None, :]
        x = self.means[comp] + torch.einsum("bde,be->bd", scale, z)
        x = x.reshape(n, *self.data_shape)
        return (x, comp) if return_components else x

    def component_std(self) -> Tensor:
        """Per-component root-mean eigenvalue (the isotropic std for isotropic components), ``(K,)``."""
        return torch.sqrt(self.eigvals.mean(-1))

    def data_std(self) -> float:
        """Overall standard deviation of the data (root mean per-coordinate variance)."""
        w = torch.exp(self.log_weights)
        mean = (w[:, None] * self.means).sum(0)
        second = (w[:, None] * (self.means**2 + torch.diagonal(self._covariances(), dim1=-2, dim2=-1))).sum(0)
        return float(torch.sqrt((second - mean**2).mean()))

    def _covariances(self) -> Tensor:
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(-1, -2)


def ring_mixture(modes: int = 8, radius: float = 2.0, std: float = 0.1,
                 weights: Tensor | None = None) -> GaussianMixture:
    """``modes`` isotropic Gaussians evenly spaced on a circle: the standard 2-D analytic teacher."""
    angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    w = torch.ones(modes, dtype=torch.float64) if weights is None else weights
    return GaussianMixture(w, means, torch.full((modes,), std**2, dtype=torch.float64))


def grid_mixture(side: int = 5, spacing: float = 1.0, std: float = 0.05,
                 imbalanced: bool = False) -> GaussianMixture:
    """``side x side`` isotropic Gaussians on a centred grid; ``imbalanced`` makes weights span 1:20."""
    coords = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(coords, coords)
    k = means.shape[0]
    weights = torch.ones(k, dtype=torch.float64)
    if imbalanced:
        weights = torch.logspace(0, math.log10(20.0), k, dtype=torch.float64)
    return GaussianMixture(weights, means, torch.full((k,), std**2, dtype=torch.float64))
