"""How spread out hidden states are: the NITP paper's evidence against collapse.

Under plain next-token prediction the final hidden states can crowd into a few
directions (low effective rank, high average cosine: anisotropy); NITP is reported to keep
the rank higher and the cosine lower. These functions take ``[tokens, dim]`` matrices.

Two effective ranks, both ``exp`` of the entropy of a normalized spectrum of the
mean-centred tokens:

- ``effective_rank`` is the NITP paper's (its Appendix D): the eigenvalues of the
  empirical covariance, ``p_i = lambda_i / sum lambda = s_i^2 / sum s^2``. It needs only
  the token count, the sum and ``X^T X`` (``CovarianceMoments``), which add up over ranks
  and shards, so it is computed over every valid token of a batch;
- ``effective_rank_sv`` is Roy & Vetterli's original: the singular values themselves,
  ``p_i = s_i / sum s``, which weight the small directions more (on a 1/i spectrum of
  width 768 it is ~30 times larger). It needs the tokens, so it is computed on a sample.
"""

from dataclasses import dataclass

import torch


class GeometryError(ValueError):
    pass


def _spectral_entropy_rank(weights: torch.Tensor) -> torch.Tensor:
    """``exp(-sum p log p)`` with ``p = weights / sum weights`` (weights >= 0)."""
    p = weights / weights.sum()
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()
    return torch.exp(entropy)


@dataclass
class CovarianceMoments:
    """Token count, sum and Gram matrix ``X^T X`` of some tokens, in fp64: enough for the
    covariance, and additive, so ranks and sequence shards each sum their own tokens and
    one all-reduce of ``as_vector()`` gives the moments of all of them."""

    count: torch.Tensor
    total: torch.Tensor
    gram: torch.Tensor

    @classmethod
    def of(cls, hidden: torch.Tensor, valid: torch.Tensor | None = None) -> "CovarianceMoments":
        """Moments of the tokens of ``hidden`` (``[..., dim]``) where ``valid`` is true.
        Invalid tokens are zeroed rather than dropped: no host sync, no gathered copy."""
        x = hidden.detach().reshape(-1, hidden.shape[-1]).double()
        if valid is None:
            count = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        else:
            keep = valid.reshape(-1, 1).to(x.device)
            x = x * keep
            count = keep.sum(dtype=torch.float64)
        return cls(count, x.sum(dim=0), x.T @ x)

    def as_vector(self) -> torch.Tensor:
        return torch.cat([self.count.view(1), self.total, self.gram.flatten()])

    @classmethod
    def from_vector(cls, vector: torch.Tensor, dim: int) -> "CovarianceMoments":
        return cls(vector[0], vector[1 : dim + 1], vector[dim + 1 :].view(dim, dim))

    def covariance(self) -> torch.Tensor:
        """The unbiased covariance ``(X^T X - n mu mu^T) / (n - 1)``."""
        n = self.count
        if n < 2:
            raise GeometryError(f"a covariance needs at least 2 tokens, got {int(n)}")
        mean = self.total / n
        return (self.gram - n * torch.outer(mean, mean)) / (n - 1)


def effective_rank(hidden: torch.Tensor | CovarianceMoments) -> torch.Tensor:
    """The NITP paper's effective rank: ``exp(-sum p_i log p_i)``, ``p_i = lambda_i /
    sum lambda``, over the eigenvalues of the empirical covariance of the mean-centred
    tokens (fp64; rounding-level negative eigenvalues count as 0). Takes the tokens
    ``[tokens, dim]`` or their ``CovarianceMoments``."""
    moments = hidden if isinstance(hidden, CovarianceMoments) else CovarianceMoments.of(hidden)
    eigenvalues = torch.linalg.eigvalsh(moments.covariance()).clamp_min(0.0)
    if eigenvalues.sum() <= 0:
        raise GeometryError("the tokens are all equal: the covariance has no spectrum")
    return _spectral_entropy_rank(eigenvalues).float()


def effective_rank_sv(hidden: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007): ``exp(-sum p_i log p_i)``, ``p_i = s_i / sum s``, over the
    singular values of the mean-centred ``[tokens, dim]`` matrix, in fp32.

    Needs at least as many tokens as dimensions: with fewer, the rank is capped by the
    sample, not by the representation, and the number would mislead."""
    tokens, dim = hidden.shape
    if tokens < dim:
        raise GeometryError(
            f"effective rank needs at least as many tokens as dimensions; got {tokens} "
            f"tokens of dimension {dim}"
        )
    centred = hidden.float() - hidden.float().mean(dim=0, keepdim=True)
    return _spectral_entropy_rank(torch.linalg.svdvals(centred))


def _unit(hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(hidden.float(), dim=-1)


def mean_pairwise_cosine(hidden: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs i != j, in closed form:
    ``(|sum_i u_i|^2 - n) / (n (n - 1))`` with ``u_i`` the unit vectors."""
    n = hidden.shape[0]
    if n < 2:
        raise GeometryError(f"mean pairwise cosine needs at least 2 tokens, got {n}")
    total = _unit(hidden).sum(dim=0)
    return (total.square().sum() - n) / (n * (n - 1))


def random_pair_cosine(
    hidden: torch.Tensor, sequence_ids: torch.Tensor, pairs: int, generator: torch.Generator
) -> torch.Tensor:
    """Average cosine of random token pairs from *different* sequences (Ethayarajh 2019):
    pairs within a sequence share context and would overstate anisotropy."""
    n = hidden.shape[0]
    if sequence_ids.unique().numel() < 2:
        raise GeometryError("random-pair cosine needs tokens from at least 2 sequences")
    first = torch.randint(0, n, (pairs,), generator=generator, device="cpu").to(hidden.device)
    second = torch.randint(0, n, (pairs,), generator=generator, device="cpu").to(hidden.device)
    different = sequence_ids[first] != sequence_ids[second]
    unit = _unit(hidden)
    cosines = (unit[first] * unit[second]).sum(-1)
    return torch.where(different, cosines, 0.0).sum() / different.sum().clamp_min(1)
