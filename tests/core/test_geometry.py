"""Geometry metrics against numpy references and known cases."""

import numpy as np
import pytest
import torch

from titan_objectives.metrics import (
    CovarianceMoments,
    GeometryError,
    effective_rank,
    effective_rank_sv,
    mean_pairwise_cosine,
    random_pair_cosine,
)


def entropy_rank(weights: np.ndarray) -> float:
    p = weights / weights.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def numpy_paper_rank(x: np.ndarray) -> float:
    """The NITP paper's: covariance eigenvalues of the mean-centred tokens."""
    eigenvalues = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    return entropy_rank(np.clip(eigenvalues, 0, None))


def numpy_sv_rank(x: np.ndarray) -> float:
    """Roy & Vetterli's: singular values of the mean-centred tokens."""
    return entropy_rank(np.linalg.svd(x - x.mean(axis=0, keepdims=True), compute_uv=False))


def numpy_mean_cosine(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    n = len(x)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def with_singular_values(singular: np.ndarray, tokens: int, seed: int = 0) -> np.ndarray:
    """Mean-centred ``[tokens, len(singular)]`` data whose singular values are exactly
    ``singular``: orthonormal columns orthogonal to the all-ones vector, scaled."""
    rng = np.random.default_rng(seed)
    dim = len(singular)
    basis = rng.normal(size=(tokens, dim))
    basis -= basis.mean(axis=0, keepdims=True)
    left, _ = np.linalg.qr(basis)
    right, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return (left * singular) @ right.T + rng.normal(size=dim)  # any offset: centring removes it


def test_both_ranks_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)) @ np.diag(np.linspace(0.1, 3, 20)) + 5.0
    assert effective_rank(torch.tensor(x)).item() == pytest.approx(numpy_paper_rank(x), rel=1e-5)
    assert effective_rank_sv(torch.tensor(x)).item() == pytest.approx(numpy_sv_rank(x), rel=1e-5)


def test_power_law_spectrum_gives_each_formulas_analytic_value():
    """Singular values 1/i (the issue's example, at a test-sized width): the two
    definitions weight them as s_i / sum s and s_i^2 / sum s^2."""
    dim, tokens = 96, 1024
    singular = 1.0 / np.arange(1, dim + 1)
    x = torch.tensor(with_singular_values(singular, tokens))
    paper, sv = effective_rank(x).item(), effective_rank_sv(x).item()
    assert paper == pytest.approx(entropy_rank(singular**2), rel=1e-6)
    assert sv == pytest.approx(entropy_rank(singular), rel=1e-4)
    assert paper < sv / 5  # the paper's concentrates on the top directions


def test_isotropic_gaussian_has_high_rank_and_no_cosine():
    torch.manual_seed(0)
    x = torch.randn(4000, 64)
    assert effective_rank(x).item() > 0.95 * 64
    assert effective_rank_sv(x).item() > 0.9 * 64
    assert abs(mean_pairwise_cosine(x).item()) < 0.01
    ids = torch.arange(4000) // 10
    cos = random_pair_cosine(x, ids, 20000, torch.Generator().manual_seed(0))
    assert abs(cos.item()) < 0.02


def test_rank_one_data():
    torch.manual_seed(0)
    direction = torch.randn(32)
    scales = torch.rand(500) + 0.5
    x = scales[:, None] * direction  # all along one direction, same sign
    assert effective_rank_sv(x).item() == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(x).item() == pytest.approx(1.0, abs=1e-3)
    assert mean_pairwise_cosine(x).item() == pytest.approx(1.0, abs=1e-5)
    noisy = x + 1e-4 * torch.randn(500, 32)  # rank 1 plus tiny noise
    assert effective_rank(noisy).item() == pytest.approx(1.0, abs=1e-3)
    assert effective_rank_sv(noisy).item() < 1.1
    signs = torch.where(torch.arange(500) % 2 == 0, 1.0, -1.0)
    flipped = (signs * scales)[:, None] * direction  # +-1 cosines, half and half
    assert effective_rank_sv(flipped).item() == pytest.approx(1.0, abs=1e-3)
    ids = torch.arange(500)
    cos = random_pair_cosine(flipped, ids, 5000, torch.Generator().manual_seed(1))
    assert abs(cos.item()) < 0.05  # +1 and -1 pairs equally likely


def test_rank_deficient_samples_give_numbers_not_nan():
    """Fewer tokens than dimensions: the covariance is singular (negative rounding-level
    eigenvalues), the paper's rank is still a number, at most tokens - 1."""
    torch.manual_seed(0)
    x = torch.randn(10, 64) * 1e3
    rank = effective_rank(x).item()
    assert np.isfinite(rank) and 1.0 <= rank <= 9.0 + 1e-6
    with pytest.raises(GeometryError, match="the tokens are all equal"):
        effective_rank(torch.ones(5, 4))


def test_moments_add_up_over_parts_and_skip_invalid_tokens():
    """Ranks and sequence shards each sum their own tokens: the sum of the parts' moments
    is the whole's, and tokens without a label are left out."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 8) @ torch.randn(8, 8)
    valid = torch.rand(2, 12) > 0.3
    whole = CovarianceMoments.of(hidden, valid)
    parts = [CovarianceMoments.of(hidden[:, i : i + 4], valid[:, i : i + 4]) for i in (0, 4, 8)]
    summed = CovarianceMoments.from_vector(sum(p.as_vector() for p in parts), 8)
    torch.testing.assert_close(summed.as_vector(), whole.as_vector())
    kept = hidden[valid].numpy().astype(np.float64)
    assert int(whole.count) == valid.sum()
    np.testing.assert_allclose(whole.covariance().numpy(), np.cov(kept, rowvar=False), rtol=1e-9)
    assert effective_rank(summed).item() == pytest.approx(numpy_paper_rank(kept), rel=1e-6)


def test_mean_cosine_closed_form_matches_all_pairs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)) + 0.7  # anisotropic: a shared offset
    assert mean_pairwise_cosine(torch.tensor(x)).item() == pytest.approx(
        numpy_mean_cosine(x), rel=1e-5
    )


def test_random_pairs_skip_same_sequence_pairs():
    # Two sequences: within each all vectors identical, across them orthogonal.
    x = torch.cat(
        [torch.tensor([[1.0, 0.0]]).repeat(50, 1), torch.tensor([[0.0, 1.0]]).repeat(50, 1)]
    )
    ids = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    cos = random_pair_cosine(x, ids, 1000, torch.Generator().manual_seed(0))
    assert cos.item() == pytest.approx(0.0, abs=1e-6)  # same-sequence pairs (cos 1) excluded


def test_too_few_tokens_is_an_error_not_a_number():
    with pytest.raises(GeometryError, match="needs at least as many tokens as dimensions; got 10"):
        effective_rank_sv(torch.randn(10, 64))
    with pytest.raises(GeometryError, match="at least 2 sequences"):
        random_pair_cosine(torch.randn(10, 4), torch.zeros(10).long(), 5, torch.Generator())
    with pytest.raises(GeometryError, match="a covariance needs at least 2 tokens, got 1"):
        effective_rank(torch.randn(1, 4))


def test_a_probe_skips_what_a_batch_cannot_measure(caplog):
    """One labelled token: no covariance, so effective_rank is not logged (a warning says
    why) and the other metrics still are; training goes on."""
    import logging

    from titan_objectives.hosts.common.geometry_probe import GeometryProbe
    from titan_objectives.sequence import UNSHARDED

    probe = GeometryProbe(
        [], max_tokens=64, pairs=16, mesh=None, dp_rank=0, dp_size=1, sequence=UNSHARDED
    )
    valid = torch.zeros(4, 16, dtype=torch.bool)
    valid[0, 0] = True
    probe.take_sample({"final": torch.randn(4, 16, 8)}, seed=1, valid=valid)
    with caplog.at_level(logging.WARNING):
        values = probe.measure(seed=1)
    assert "final/effective_rank" not in values and "final/effective_rank_sv" in values
    assert "geometry/final/effective_rank not measured: a covariance needs at least 2" in (
        caplog.text
    )
