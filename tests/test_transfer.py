"""Transfer metrics against a hand-computed accuracy matrix (backward transfer and the order:
test_bwt.py)."""

import numpy as np
import pytest

from mtjax.experiments import transfer

# Rows: after stage 0, 1, 2; columns: tasks 0, 1, 2.
R = np.array([[0.8, 0.3, 0.1],
              [0.6, 0.9, 0.2],
              [0.5, 0.7, 0.95]])
BASE = [0.1, 0.1, 0.1]


def test_metrics_by_hand():
  m = transfer.metrics(R, BASE)
  assert m["acc"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
  assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # -0.25
  assert m["fwt"] == pytest.approx(((0.3 - 0.1) + (0.2 - 0.1)) / 2)  # 0.15
  assert m["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)  # 0.25


def test_normalize_per_task():
  # (score - init) / (reference - init); with init 0 the score over the reference.
  n, excluded = transfer.normalize_scores(R, [0.0, 0.0, 0.0], [0.8, 0.9, 1.0])
  assert n[0, 0] == pytest.approx(1.0) and n[1, 1] == pytest.approx(1.0)
  assert n[2, 0] == pytest.approx(0.5 / 0.8)
  assert not excluded.any()
  n, excluded = transfer.normalize_scores(R, [0.1, 0.1, 0.1], [0.8, 0.9, 1.0])
  assert n[2, 0] == pytest.approx((0.5 - 0.1) / (0.8 - 0.1))
  # A reference at (or under) init is excluded (NaN), never divided by.
  n, excluded = transfer.normalize_scores(R, [0.0, 0.0, 0.0], [0.0, 1.0, 1.0])
  assert excluded.tolist() == [True, False, False] and np.isnan(n[:, 0]).all()
