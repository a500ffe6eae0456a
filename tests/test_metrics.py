"""Hand-worked checks of the task metrics (SQuAD normalisation, EM/F1, exact match, MC, NLL)."""

import math

import pytest

from core import metrics


@pytest.mark.parametrize("raw, expected", [
    ("The Cat", "cat"),
    ("  an   apple,  a pear! ", "apple pear"),
    ("Theatre", "theatre"),                 # 'the' inside a word stays
    ("A.B.C.", "abc"),                      # punctuation removed, not replaced by spaces
    ("Roshaven.", "roshaven"),
    ("the the the", ""),
    ("New\tYork\n", "new york"),
    ("don't", "dont"),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert metrics.normalize_answer(raw) == expected


def test_exact_match_max_over_references():
    assert metrics.squad_exact_match("the Painter.", ["painter"]) == 1.0
    assert metrics.squad_exact_match("baker", ["painter", "a baker"]) == 1.0
    assert metrics.squad_exact_match("bakers", ["painter", "a baker"]) == 0.0


def test_empty_prediction():
    assert metrics.squad_exact_match("", ["1911"]) == 0.0
    assert metrics.squad_exact_match(None, ["1911"]) == 0.0
    assert metrics.squad_f1("", ["1911"]) == 0.0
    assert metrics.squad_f1("the", [""]) == 1.0  # both normalise to nothing
    with pytest.raises(ValueError):
        metrics.squad_exact_match("x", [])


def test_f1_hand_worked():
    # pred tokens: [new, york, city]; ref: [new, york] -> P=2/3, R=1, F1=0.8
    assert metrics.squad_f1("New York City", ["new york"]) == pytest.approx(0.8)
    # duplicates count once per occurrence: pred [a1, a1] vs ref [a1] -> P=1/2 R=1 -> 2/3
    assert metrics.squad_f1("x x", ["x"]) == pytest.approx(2 / 3)
    # max over references
    assert metrics.squad_f1("red car", ["blue", "red car"]) == 1.0
    assert metrics.squad_f1("green", ["blue"]) == 0.0


def test_squad_scores_in_percent():
    s = metrics.squad_scores(["Roshaven", "blue house", ""], [["Roshaven"], ["blue"], ["x"]])
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        metrics.squad_scores(["a"], [])


def test_arithmetic_exact_match_is_strict():
    assert metrics.exact_match(" 324 ", "324") == 1.0
    assert metrics.exact_match("3240", ["324"]) == 0.0
    assert metrics.exact_match("the 324", ["324"]) == 0.0  # no SQuAD normalisation here
    assert metrics.exact_match(None, ["0"]) == 0.0


def test_accuracy_and_choose_option():
    assert metrics.accuracy([0, 2, 1, 3], [0, 2, 2, 0]) == 0.5
    assert metrics.choose_option([-5.0, -2.0, -9.0]) == 1
    # per-token normalisation can change the choice: -6 over 3 tokens beats -4 over 1 token
    assert metrics.choose_option([-4.0, -6.0], [1, 3]) == 1
    assert metrics.choose_option([-4.0, -6.0]) == 0
    with pytest.raises(ValueError):
        metrics.accuracy([1], [1, 2])


def test_perplexity_is_exp_of_the_mean_nll():
    assert metrics.perplexity(math.log(4)) == pytest.approx(4.0)  # uniform over 4 tokens
