"""Classification metrics against hand-computed values."""
import numpy as np
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


# ----------------------------------------------------------------------------- confusion
def test_confusion_and_per_class_hand_worked():
  # Rows true a, b, c; columns a, b, c, unparsed/invalid (None and "dog" are invalid):
  #   a: [1, 1, 0, 1]    b: [0, 1, 0, 1]    c: [1, 1, 0, 0]   (c is never predicted)
  labels = ["a", "a", "a", "b", "b", "c", "c"]
  preds = ["a", "b", None, "b", "dog", "a", "b"]
  m = metrics.classification_metrics(preds, labels, classes=["a", "b", "c"])
  assert m["confusion"] == [[1, 1, 0, 1], [0, 1, 0, 1], [1, 1, 0, 0]]
  assert m["classes"] == ["a", "b", "c"]
  assert m["accuracy"] == pytest.approx(2 / 7)
  assert m["answer_rate"] == pytest.approx(6 / 7)  # "dog" is an answer, not a class
  assert m["valid_rate"] == pytest.approx(5 / 7)
  # precision = tp / column sum: a 1/2, b 1/3, c undefined (never predicted) -> absent.
  assert m["precision/a"] == pytest.approx(0.5)
  assert m["precision/b"] == pytest.approx(1 / 3)
  assert "precision/c" not in m
  # recall = tp / row sum: a 1/3, b 1/2, c 0/2.
  assert (m["recall/a"], m["recall/b"], m["recall/c"]) == pytest.approx((1 / 3, 0.5, 0.0))
  # F1 = 2tp / (2tp + fp + fn): a 2/(2+1+2) = 0.4; b 2/(2+2+1) = 0.4; c 0.
  assert (m["f1/a"], m["f1/b"], m["f1/c"]) == pytest.approx((0.4, 0.4, 0.0))
  assert m["macro_f1"] == pytest.approx(0.8 / 3)
  assert (m["support/a"], m["support/b"], m["support/c"]) == (3, 2, 2)
  assert m["chance"] == pytest.approx(1 / 3)
  assert m["majority_rate"] == pytest.approx(3 / 7)       # class a
  assert m["top_prediction_rate"] == pytest.approx(3 / 7)  # b predicted 3 times
  assert "ece" not in m and "reliability" not in m


def test_empty_split():
  m = metrics.classification_metrics([], [], classes=["a", "b"])
  assert m["n"] == 0 and m["confusion"] == [[0, 0, 0], [0, 0, 0]] and m["chance"] == 0.5
  assert "accuracy" not in m and "macro_f1" not in m
  m = metrics.classification_metrics([], [], classes=["a", "b"], scores=np.zeros((0, 2)))
  assert "ece" not in m


def test_all_unparsed():
  m = metrics.classification_metrics([None, None, "xyz"], ["a", "b", "b"], classes=["a", "b"],
                                     well_formatted=[False] * 3)
  assert m["confusion"] == [[0, 0, 1], [0, 0, 2]]
  assert m["accuracy"] == 0 and m["macro_f1"] == 0 and m["valid_rate"] == 0
  assert m["top_prediction_rate"] == 0 and m["format_rate"] == 0
  assert not any(k.startswith("precision/") for k in m)
  assert (m["recall/a"], m["recall/b"]) == (0.0, 0.0)


def test_label_outside_classes_is_an_error():
  with pytest.raises(ValueError, match="label 'z' of item #1 is not one of the classes"):
    metrics.classification_metrics(["a", "a"], ["a", "z"], classes=["a", "b"])


# ----------------------------------------------------------------------------- calibration
# (confidence = largest score, correct?, bin of (b/15, (b+1)/15]):
#   A 0.95 yes  bin 14 | B 0.95 no  bin 14 | F 1.00 yes bin 14 (1.0 is the top edge)
#   C 0.60 yes  bin 8 (0.6 = 9/15 exactly: an edge goes to the lower bin) | D 0.55 no bin 8
#   E 0.40 yes  bin 5 (0.4 = 6/15 exactly)
# bin 14: acc 2/3, conf (0.95 + 0.95 + 1) / 3 = 0.966667, |gap| 0.3,   weight 3/6 -> 0.15
# bin 8:  acc 1/2, conf (0.6 + 0.55) / 2 = 0.575,        |gap| 0.075, weight 2/6 -> 0.025
# bin 5:  acc 1,   conf 0.4,                              |gap| 0.6,   weight 1/6 -> 0.1
# ECE = 0.275. (Left-closed bins would give 0.15 + 0.4/6 + 0.55/6 + 0.1 = 0.408333.)
SCORED_LABELS = ["a", "b", "c", "a", "b", "c"]
SCORED = [[0.95, 0.03, 0.02], [0.95, 0.03, 0.02], [0.2, 0.2, 0.6], [0.3, 0.55, 0.15],
          [0.35, 0.4, 0.25], [0.0, 0.0, 1.0]]
SCORED_PREDS = ["a", "a", "c", "b", "b", "c"]


def test_ece_hand_worked():
  m = metrics.classification_metrics(SCORED_PREDS, SCORED_LABELS, classes=["a", "b", "c"],
                                     scores=SCORED)
  assert m["ece"] == pytest.approx(0.275)
  rel = m["reliability"]
  assert len(rel["edges"]) == 16 and rel["edges"][0] == 0 and rel["edges"][-1] == 1
  want_count = [0] * 15
  want_count[14], want_count[8], want_count[5] = 3, 2, 1
  assert rel["count"] == want_count
  assert rel["accuracy"][14] == pytest.approx(2 / 3)
  assert rel["confidence"][14] == pytest.approx(0.966667, abs=1e-6)
  assert rel["accuracy"][8] == 0.5 and rel["confidence"][8] == pytest.approx(0.575)
  assert rel["accuracy"][5] == 1.0 and rel["confidence"][5] == pytest.approx(0.4)
  assert rel["accuracy"][0] is None and rel["confidence"][13] is None
  assert m["accuracy"] == pytest.approx(4 / 6)


def test_ece_bins_and_direct():
  assert metrics.bin_index(np.array([0.0, 1e-9, 1 / 15, 0.0667, 0.4, 0.4000001, 1.0])).tolist() \
      == [0, 0, 0, 1, 5, 6, 14]
  # Two bins: (0, 0.5] holds 0.2 (wrong) and 0.5 (right); (0.5, 1] holds 0.9 (right):
  # ECE = 2/3 * |0.5 - 0.35| + 1/3 * |1 - 0.9| = 0.1 + 0.0333333 = 0.1333333.
  r = metrics.reliability([0.2, 0.5, 0.9], [False, True, True], num_bins=2)
  assert r["ece"] == pytest.approx(0.1333333, abs=1e-6)
  assert r["count"] == [2, 1]
  # Perfectly confident and always right: ECE 0.
  assert metrics.reliability([1.0, 1.0], [True, True])["ece"] == 0.0


def test_scores_are_checked():
  classes = ["a", "b", "c"]
  with pytest.raises(ValueError, match="shape"):
    metrics.classification_metrics(["a"], ["a"], classes=classes, scores=[[0.5, 0.5]])
  with pytest.raises(ValueError, match="item #1 are not a probability vector"):
    metrics.classification_metrics(["a", "a"], ["a", "b"], classes=classes,
                                   scores=[[1, 0, 0], [0.5, 0.4, 0.0]])
  with pytest.raises(ValueError, match="item #0: prediction 'b' is not the argmax"):
    metrics.classification_metrics(["b"], ["a"], classes=classes, scores=[[0.6, 0.3, 0.1]])
  with pytest.raises(ValueError, match="not the argmax"):
    metrics.classification_metrics([None], ["a"], classes=classes, scores=[[0.6, 0.3, 0.1]])
  # A tie: either tied label is a valid prediction.
  m = metrics.classification_metrics(["b"], ["b"], classes=classes, scores=[[0.4, 0.4, 0.2]])
  assert m["accuracy"] == 1.0 and m["ece"] == pytest.approx(0.6)


def test_scores_as_label_mappings():
  as_dicts = [dict(zip(["a", "b", "c"], row)) for row in SCORED]
  m = metrics.classification_metrics(SCORED_PREDS, SCORED_LABELS, classes=["a", "b", "c"],
                                     scores=as_dicts)
  assert m["ece"] == pytest.approx(0.275)
  with pytest.raises(ValueError, match="scores of item #0 name"):
    metrics.classification_metrics(["a"], ["a"], classes=["a", "b"], scores=[{"a": 1.0}])


def test_unlabelled_items_are_counted_not_scored():
  # Two labelled items (one right, one wrong) and one without a label: accuracy is 1/2 over
  # the labelled ones, and the unlabelled item is reported, not raised on or scored wrong.
  m = metrics.classification_metrics(["a", "b", "a"], ["a", "", "b"], classes=["a", "b"],
                                     well_formatted=[True, False, True])
  assert m["n"] == 2 and m["unlabelled"] == 1
  assert m["accuracy"] == 0.5
  assert m["format_rate"] == 1.0
