"""Statistics shared by the experiment scripts (experiments/online_vs_offline.py, claim.py)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_bootstrap_ci(diffs: Sequence[float], *, resamples: int = 10_000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
  """(mean, lo, hi) of per-seed paired differences: their mean and its percentile bootstrap
  interval at `level` (the seeds resampled with replacement `resamples` times; numpy's
  default_rng(seed), so the interval is the same on every call)."""
  diffs_S = np.asarray(diffs, np.float64)
  if diffs_S.ndim != 1 or not diffs_S.size:
    raise ValueError(f"paired_bootstrap_ci: diffs must be a non-empty 1-D sequence, got shape "
                     f"{diffs_S.shape}")
  if not np.all(np.isfinite(diffs_S)):
    raise ValueError(f"paired_bootstrap_ci: diffs must be finite, got {diffs_S.tolist()}")
  if not 0 < level < 1:
    raise ValueError(f"paired_bootstrap_ci: level must lie in (0, 1), got {level}")
  if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
    raise ValueError(f"paired_bootstrap_ci: resamples must be an int >= 1, got {resamples!r}")
  picks_RxS = np.random.default_rng(seed).integers(0, diffs_S.size, (resamples, diffs_S.size))
  means_R = diffs_S[picks_RxS].mean(axis=1)
  lo, hi = np.quantile(means_R, [(1 - level) / 2, (1 + level) / 2])
  return float(diffs_S.mean()), float(lo), float(hi)
