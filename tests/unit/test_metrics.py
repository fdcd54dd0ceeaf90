"""Classification metrics against hand-computed values."""
import pytest

from deepintuit_jax.evals import metrics


def test_metrics_hand_computed():
  labels = ["a", "a", "a", "b", "b", "c"]
  preds = ["a", "A ", "b", "b", None, "a"]
  fmt = [True, True, True, False, False, True]
  m = metrics.classification_metrics(preds, labels, classes=["a", "b", "c"], well_formatted=fmt)
  assert m["n"] == 6
  assert m["accuracy"] == pytest.approx(3 / 6)
  assert m["answer_rate"] == pytest.approx(5 / 6)
  assert m["format_rate"] == pytest.approx(4 / 6)
  assert m["recall/a"] == pytest.approx(2 / 3)
  assert m["recall/b"] == pytest.approx(1 / 2)
  assert m["recall/c"] == 0.0
  # a: tp 2 fp 1 fn 1 -> 4/6; b: tp 1 fp 1 fn 1 -> 2/4; c: 0.
  assert m["macro_f1"] == pytest.approx((4 / 6 + 2 / 4 + 0) / 3)


def test_metrics_errors_and_report():
  with pytest.raises(ValueError, match="2 predictions for 1 labels"):
    metrics.classification_metrics(["a", "b"], ["a"])
  md = metrics.report_markdown({"test_close": {"n": 2, "accuracy": 0.5}}, step=7)
  assert "step 7" in md and "| test_close | 2 | 0.500 |" in md
