"""experiments/stats.py against hand-computed bootstrap distributions and scipy's bootstrap."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments.stats import paired_bootstrap_ci


def test_two_seeds_give_the_hand_computed_interval():
  # Resampled means of [0, 1]: 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4. The 2.5 % and
  # 97.5 % points are 0 and 1; the 30 % and 70 % points (level 0.4) are both 0.5.
  assert paired_bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)
  assert paired_bootstrap_ci([0.0, 1.0], level=0.4) == (0.5, 0.5, 0.5)


def test_constant_differences_and_one_seed_have_a_zero_width_interval():
  assert paired_bootstrap_ci([0.25] * 5) == (0.25, 0.25, 0.25)
  assert paired_bootstrap_ci([-0.1]) == (-0.1, -0.1, -0.1)


def test_matches_scipys_percentile_bootstrap_and_is_reproducible():
  diffs = np.random.default_rng(3).normal(0.02, 0.05, size=5)
  mean, lo, hi = paired_bootstrap_ci(diffs)
  ref = scipy_stats.bootstrap((diffs,), np.mean, n_resamples=10_000, method="percentile",
                              confidence_level=0.95, rng=np.random.default_rng(1))
  assert mean == pytest.approx(diffs.mean())
  # Two Monte Carlo estimates of the same quantiles: within a few % of the spread.
  tol = 0.05 * diffs.std()
  assert lo == pytest.approx(ref.confidence_interval.low, abs=tol)
  assert hi == pytest.approx(ref.confidence_interval.high, abs=tol)
  assert paired_bootstrap_ci(diffs) == (mean, lo, hi)


@pytest.mark.parametrize("kwargs, message", [
    (dict(diffs=[]), "non-empty 1-D"), (dict(diffs=[[0.1]]), "non-empty 1-D"),
    (dict(diffs=[0.1, float("nan")]), "must be finite"),
    (dict(diffs=[0.1], level=1.0), r"level must lie in \(0, 1\)"),
    (dict(diffs=[0.1], resamples=0), "resamples must be an int >= 1")])
def test_bad_input_is_refused(kwargs, message):
  diffs = kwargs.pop("diffs")
  with pytest.raises(ValueError, match=message):
    paired_bootstrap_ci(diffs, **kwargs)
