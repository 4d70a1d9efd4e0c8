"""How spread out hidden states are: the NITP paper's evidence against collapse.

Under plain next-token prediction the final hidden states can crowd into a few
directions (low effective rank, high average cosine: anisotropy); NITP is reported to keep
the rank higher and the cosine lower. These functions take ``[tokens, dim]`` matrices.
"""

import torch


class GeometryError(ValueError):
    pass


def effective_rank(hidden: torch.Tensor) -> torch.Tensor:
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
    singular = torch.linalg.svdvals(centred)
    p = singular / singular.sum()
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()
    return torch.exp(entropy)


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
