"""The known-answer world's closed forms: isotropic Gaussian mixtures in ``R^d`` under the spec's flow convention.

A reference ``p_ref = sum_k w_k N(mu_k, s_k^2 I)`` has, at every noise level of the forward process
``x_sigma = (1 - sigma) x0 + sigma eps``, a closed-form marginal (component ``k`` becomes
``N((1 - sigma) mu_k, v_k I)``, ``v_k = (1 - sigma)^2 s_k^2 + sigma^2``), hence the EXACT velocity
``E[eps - x0 | x_sigma]`` and score: a teacher with no fitting error. Rewards with a closed-form tilt
``p* = p_ref exp(R / beta) / Z``:

- linear ``R = a . x``: component ``k`` moves to ``mu_k + s_k^2 a / beta`` (same width), its weight is multiplied by
  ``exp(a . mu_k / beta + s_k^2 |a|^2 / (2 beta^2))`` (renormalised); unbounded, so a method that overshoots runs
  off the support;
- quadratic ``R = -c |x - m|^2``: component ``k``'s precision grows by ``2 c / beta``
  (``s'^2 = s^2 / (1 + 2 c s^2 / beta)``, ``mu' = (mu + 2 c s^2 m / beta) / (1 + 2 c s^2 / beta)``), weight times
  ``(s' / s)^d exp(-c |mu - m|^2 / (beta + 2 c s^2))``; bounded above.

Everything here is plain torch, engine-free, float64 by default (the closed forms are the ground truth the tests and
the comparison measure against). ``sliced_wasserstein`` is the distance metric of the comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mixture:
    """``sum_k weights[k] N(means[k], stds[k]^2 I)`` in ``R^d`` (weights sum to 1)."""

    weights: torch.Tensor  # [K]
    means: torch.Tensor    # [K, d]
    stds: torch.Tensor     # [K]

    @classmethod
    def of(cls, weights, means, stds) -> "Mixture":
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        s = torch.as_tensor(stds, dtype=torch.float64).expand(w.shape[0]).clone()
        if mu.ndim != 2 or mu.shape[0] != w.shape[0] or (w <= 0).any() or (s <= 0).any():
            raise ValueError(f"Mixture needs K positive weights, [K, d] means and K positive stds, got shapes "
                             f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(s.shape)}")
        return cls(w / w.sum(), mu, s)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    # ------------------------------------------------------------------------------------------- sampling, density
    def sample(self, n: int, generator: torch.Generator | None = None, *, return_components: bool = False):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.stds[k, None] * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (x, k) if return_components else x

    def marginal(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample and component at noise level ``sigma [N]``: the means ``(1 - sigma) mu_k`` [N, K, d] and the
        variances ``(1 - sigma)^2 s_k^2 + sigma^2`` [N, K]."""
        a = (1 - sigma)[:, None]
        return a[..., None] * self.means[None], a.square() * self.stds.square()[None] + sigma.square()[:, None]

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``log p_sigma(x)`` of the diffused mixture (``sigma = 0``: the mixture itself), ``x [N, d]`` -> ``[N]``."""
        return torch.logsumexp(self._log_joint(x, sigma), dim=1)

    def _log_joint(self, x: torch.Tensor, sigma) -> torch.Tensor:
        x = x.to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        m, var = self.marginal(sig)
        sq = (x[:, None, :] - m).square().sum(-1)
        return self.weights.log()[None] - 0.5 * (sq / var + self.dim * torch.log(2 * math.pi * var))

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``p(k | x_sigma = x)`` [N, K]."""
        return torch.softmax(self._log_joint(x, sigma), dim=1)

    # ------------------------------------------------------------------------------------------- the exact teacher
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The exact flow velocity ``E[eps - x0 | x_sigma = x]`` [N, d] (float64). Per component ``k``:
        ``E[eps | x, k] = sigma (x - (1 - sigma) mu_k) / v_k``, ``E[x0 | x, k] = mu_k + (1 - sigma) s_k^2
        (x - (1 - sigma) mu_k) / v_k``, weighted by the posterior responsibilities."""
        x = x.to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        m, var = self.marginal(sig)
        gamma = self.responsibilities(x, sig)
        resid = (x[:, None, :] - m) / var[..., None]                                 # [N, K, d]
        eps = sig[:, None, None] * resid
        x0 = self.means[None] + ((1 - sig)[:, None] * self.stds.square()[None])[..., None] * resid
        return (gamma[..., None] * (eps - x0)).sum(1)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``grad_x log p_sigma(x)`` [N, d] (the spec's ``-eps_hat / sigma`` for the exact velocity)."""
        x = x.to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        m, var = self.marginal(sig)
        gamma = self.responsibilities(x, sig)
        return -(gamma[..., None] * (x[:, None, :] - m) / var[..., None]).sum(1)

    # ------------------------------------------------------------------------------------------- closed-form tilts
    def tilt_linear(self, a, beta: float) -> "Mixture":
        """``p exp(a . x / beta) / Z`` (exact: a mixture with shifted means and reweighted components)."""
        a = torch.as_tensor(a, dtype=torch.float64)
        s2 = self.stds.square()
        logw = self.weights.log() + (self.means @ a) / beta + s2 * a.square().sum() / (2 * beta ** 2)
        return Mixture(torch.softmax(logw, 0), self.means + s2[:, None] * a[None] / beta, self.stds.clone())

    def tilt_quadratic(self, c: float, m, beta: float) -> "Mixture":
        """``p exp(-c |x - m|^2 / beta) / Z`` (exact: each component narrows towards ``m``)."""
        m = torch.as_tensor(m, dtype=torch.float64)
        s2 = self.stds.square()
        g = 1 + 2 * c * s2 / beta
        new_s2 = s2 / g
        new_mu = (self.means + (2 * c * s2 / beta)[:, None] * m[None]) / g[:, None]
        logw = (self.weights.log() + 0.5 * self.dim * torch.log(new_s2 / s2)
                - c * (self.means - m[None]).square().sum(1) / (beta + 2 * c * s2))
        return Mixture(torch.softmax(logw, 0), new_mu, new_s2.sqrt())

    def expected_linear(self, a) -> float:
        """``E[a . x]`` (exact)."""
        return float(self.mean() @ torch.as_tensor(a, dtype=torch.float64))

    def expected_quadratic(self, c: float, m) -> float:
        """``E[-c |x - m|^2]`` (exact)."""
        m = torch.as_tensor(m, dtype=torch.float64)
        per = (self.means - m[None]).square().sum(1) + self.dim * self.stds.square()
        return float(-c * (self.weights @ per))

    def kl_to(self, other: "Mixture", n: int = 200_000, seed: int = 0) -> float:
        """``KL(self || other)`` by Monte Carlo over exact samples with exact log-densities (mixtures have no closed
        form); the standard error at ``n = 2e5`` is ~1e-3 for the worlds here."""
        x = self.sample(n, torch.Generator().manual_seed(seed))
        return float((self.log_prob(x) - other.log_prob(x)).mean())


def nearest_component(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Index of the nearest mean for every row of ``x`` [N, d] (the component occupancy of a sample set)."""
    return torch.cdist(x.to(torch.float64), means.to(torch.float64)).argmin(1)


def occupancy(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Fraction of ``x``'s rows nearest each mean [K]."""
    k = nearest_component(x, means)
    return torch.bincount(k, minlength=means.shape[0]).to(torch.float64) / max(1, x.shape[0])


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets ``[N, d]``: the root mean over ``projections``
    random unit directions (fixed by ``seed``, so two calls compare alike) of the 1-D W2^2 of sorted projections."""
    if x.shape != y.shape:
        n = min(x.shape[0], y.shape[0])
        x, y = x[:n], y[:n]
    d = x.shape[1]
    dirs = torch.randn(d, projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = torch.sort(x.to(torch.float64) @ dirs, dim=0).values
    py = torch.sort(y.to(torch.float64) @ dirs, dim=0).values
    return float((px - py).square().mean().sqrt())
