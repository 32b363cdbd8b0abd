"""test_metrics.py: ACC, BWT, FWT, forgetting and macro F1 (metrics.py), by hand and by property."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from metrics import (acc_bwt_from_ends, average_accuracy, backward_transfer, forgetting, format_matrix, format_table,
                     forward_transfer, macro_f1, mean_std, summarize_runs)

# ---------------------------------------------------------------------------
# Properties of the continual-learning metrics in metrics.py.
#
#
# Hand-computed cases carry their arithmetic in a comment; hypothesis checks
# the properties that should hold for every accuracy matrix.
# ---------------------------------------------------------------------------

FAST = settings(max_examples=40, deadline=None)

# Anything a run loop might leave above the diagonal: NaN, inf, huge numbers.
garbage = st.one_of(st.just(float("nan")), st.just(float("inf")),
                    st.floats(allow_nan=True, allow_infinity=True))
fraction = st.floats(0.0, 1.0)


@st.composite
def accuracy_matrices(draw, min_tasks=1, max_tasks=6, column=None):
    """(R, clean): R has garbage above the diagonal, clean has zeros there.

    column(draw, length) -> list of fractions fills each column j downwards
    from the diagonal (rows j..T-1); default: independent fractions.
    """
    T = draw(st.integers(min_tasks, max_tasks))
    R = [[draw(garbage) for _ in range(T)] for _ in range(T)]
    clean = [[0.0] * T for _ in range(T)]
    for j in range(T):
        values = (column(draw, T - j) if column
                  else draw(st.lists(fraction, min_size=T - j, max_size=T - j)))
        for i, v in zip(range(j, T), values):
            R[i][j] = clean[i][j] = v
    return R, clean


def falling_column(draw, length):
    """A column that never rises: R[j][j] >= R[j+1][j] >= ... >= R[T-1][j]."""
    return sorted(draw(st.lists(fraction, min_size=length, max_size=length)),
                  reverse=True)


# ---------------------------------------------------------------------------
# Hand-computed matrices (T = 3)
# ---------------------------------------------------------------------------

# Accuracy on task 0 rises after task 1 (0.90 -> 0.95) and then falls; R[0][1]
# and R[1][2] are the accuracies on tasks 1 and 2 just before training them.
R3 = [[0.90, 0.30, np.nan],
      [0.95, 0.70, 0.25],
      [0.60, 0.50, 0.40]]
B3 = [np.nan, 0.20, 0.20]     # accuracy at initialisation; b[0] is unused


def test_accuracy_of_hand_matrix_is_mean_of_last_row():
    # (0.60 + 0.50 + 0.40) / 3 = 0.50
    assert average_accuracy(R3) == pytest.approx(0.50)


def test_backward_transfer_of_hand_matrix():
    # j=0: 0.60 - 0.90 = -0.30;  j=1: 0.50 - 0.70 = -0.20;  sum -0.50, / (T-1)=2
    assert backward_transfer(R3) == pytest.approx(-0.25)


def test_gem_code_divides_bwt_and_fwt_by_T_not_T_minus_1():
    # The same sums as above, over T = 3 instead of T-1 = 2 (GEM's code takes
    # the mean of a length-T vector whose last entry is 0):
    # BWT: -0.50 / 3 = -0.1667 (paper: -0.25);  FWT: 0.15 / 3 = 0.05 (paper: 0.075)
    assert backward_transfer(R3, divide_by="T") == pytest.approx(-0.5 / 3)
    assert forward_transfer(R3, B3, divide_by="T") == pytest.approx(0.05)
    assert backward_transfer(R3, divide_by="T-1") == pytest.approx(-0.25)


def test_forward_transfer_of_hand_matrix():
    # i=1: R[0][1] - b1 = 0.30 - 0.20 = 0.10;  i=2: R[1][2] - b2 = 0.25 - 0.20 = 0.05
    # (0.10 + 0.05) / 2 = 0.075
    assert forward_transfer(R3, B3) == pytest.approx(0.075)


def test_forgetting_of_hand_matrix_uses_the_best_earlier_accuracy():
    # j=0: max(R[0][0], R[1][0]) - R[2][0] = max(0.90, 0.95) - 0.60 = 0.35
    # j=1: max(R[1][1])          - R[2][1] = 0.70 - 0.50            = 0.20
    # (0.35 + 0.20) / 2 = 0.275, more than -BWT = 0.25 because task 0 first rose
    assert forgetting(R3) == pytest.approx(0.275)


def test_forward_transfer_needs_the_superdiagonal():
    R = [[0.9, np.nan], [0.8, 0.7]]     # task 1 never evaluated before training
    with pytest.raises(ValueError, match="superdiagonal"):
        forward_transfer(R, [0.0, 0.1])


def test_forward_transfer_checks_the_length_of_b():
    with pytest.raises(ValueError, match="length T = 3"):
        forward_transfer(R3, [0.2, 0.2])


# ---------------------------------------------------------------------------
# Properties over all matrices
# ---------------------------------------------------------------------------

@FAST
@given(accuracy_matrices())
def test_accuracy_is_mean_of_last_row_whatever_lies_above_diagonal(pair):
    R, _ = pair
    last = R[-1]
    assert average_accuracy(R) == pytest.approx(sum(last) / len(last), abs=1e-12)


@FAST
@given(accuracy_matrices())
def test_entries_above_diagonal_never_matter(pair):
    R, clean = pair
    for metric in (average_accuracy, backward_transfer, forgetting):
        assert metric(R) == metric(clean)


@FAST
@given(accuracy_matrices(min_tasks=2), st.data())
def test_forward_transfer_reads_only_the_first_superdiagonal_above(pair, data):
    R, clean = pair
    T = len(R)
    b = data.draw(st.lists(fraction, min_size=T, max_size=T))
    for i in range(1, T):       # fill R[i-1][i] identically in both matrices
        R[i - 1][i] = clean[i - 1][i] = data.draw(fraction)
    assert forward_transfer(R, b) == forward_transfer(clean, b)


@FAST
@given(st.integers(1, 6), st.data())
def test_bwt_and_forgetting_are_zero_when_every_column_is_constant(T, data):
    # Each task keeps the accuracy it had right after being learned.
    values = data.draw(st.lists(fraction, min_size=T, max_size=T))
    R = [[values[j] if j <= i else np.nan for j in range(T)] for i in range(T)]
    assert backward_transfer(R) == 0.0
    assert forgetting(R) == 0.0


@FAST
@given(accuracy_matrices(min_tasks=2, column=falling_column))
def test_when_accuracies_only_fall_forgetting_equals_minus_bwt(pair):
    R, _ = pair
    # The best accuracy of a task that only falls is the one right after
    # learning it, so both metrics measure the same drop R[j][j] - R[T-1][j].
    assert backward_transfer(R) <= 0.0
    assert forgetting(R) == pytest.approx(-backward_transfer(R), abs=1e-12)


@FAST
@given(accuracy_matrices(min_tasks=2, column=falling_column), st.data())
def test_a_strict_fall_makes_bwt_negative_and_forgetting_positive(pair, data):
    R, _ = pair
    T = len(R)
    j = data.draw(st.integers(0, T - 2))
    # Make task j's fall strict while its column still never rises:
    # R[j][j] >= ... >= R[T-2][j] >= 0.5 >= old R[T-1][j] / 2, and not all equal.
    for i in range(j, T - 1):
        R[i][j] = max(R[i][j], 0.5)
    R[T - 1][j] = R[T - 1][j] / 2
    assert backward_transfer(R) < 0.0
    assert forgetting(R) > 0.0


@FAST
@given(accuracy_matrices())
def test_forgetting_is_never_below_minus_bwt(pair):
    R, _ = pair
    # max over rows j..T-2 of R[.][j] >= R[j][j], task by task.
    assert forgetting(R) >= -backward_transfer(R) - 1e-12


# ---------------------------------------------------------------------------
# A single task
# ---------------------------------------------------------------------------

def test_single_task_has_no_transfer_and_no_forgetting():
    R = [[0.8]]
    assert average_accuracy(R) == pytest.approx(0.8)
    assert backward_transfer(R) == 0.0
    assert backward_transfer(R, divide_by="T") == 0.0
    assert forward_transfer(R, [0.1]) == 0.0
    assert forgetting(R) == 0.0


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("R, message", [
    ([[0.9, 0.1]], "square"),
    ([[[0.9]]], "square"),
    ([], "square"),
    (np.zeros((0, 0)), "empty"),
    ([[0.9], [0.8, 0.7]], "T x T"),
    ([[np.nan, 0.0], [0.8, 0.7]], "non-finite"),
    ([[0.9, 0.0], [np.inf, 0.7]], "non-finite"),
    ([[90.0, 0.0], [80.0, 70.0]], "outside \\[0, 1\\]"),
    ([[0.9, 0.0], [-0.1, 0.7]], "outside \\[0, 1\\]"),
])
def test_bad_matrices_are_rejected_with_a_reason(R, message):
    for metric in (average_accuracy, backward_transfer, forgetting, format_matrix):
        with pytest.raises(ValueError, match=message):
            metric(R)


@FAST
@given(accuracy_matrices(min_tasks=3), st.data())
def test_acc_and_bwt_read_only_the_diagonal_and_the_last_row(pair, data):
    # What lets a run evaluate 2T-1 entries instead of T(T+1)/2
    # (market.py --day-matrix ends): any entry strictly between them may change.
    R, clean = pair
    T = len(R)
    inner = [(i, j) for i in range(1, T - 1) for j in range(i)]      # below the diagonal, not the last row
    for i, j in data.draw(st.lists(st.sampled_from(inner), min_size=1, unique=True)):
        clean[i][j] = data.draw(fraction)
    for divide_by in ("T-1", "T"):
        assert backward_transfer(clean, divide_by) == backward_transfer(R, divide_by)
        assert acc_bwt_from_ends(np.diag(clean), clean[-1], divide_by) == (
            average_accuracy(R), backward_transfer(R, divide_by))


def test_acc_and_bwt_from_the_ends_by_hand():
    # diagonal 0.9 0.8 0.7, last row 0.6 0.7 0.7: ACC = 2.0 / 3,
    # BWT = ((0.6 - 0.9) + (0.7 - 0.8)) / 2 = -0.2 (T-1), -0.4 / 3 (T).
    assert acc_bwt_from_ends([0.9, 0.8, 0.7], [0.6, 0.7, 0.7]) == pytest.approx((2.0 / 3, -0.2))
    assert acc_bwt_from_ends([0.9, 0.8, 0.7], [0.6, 0.7, 0.7], "T")[1] == pytest.approx(-0.4 / 3)
    assert acc_bwt_from_ends([0.4], [0.4]) == (0.4, 0.0)
    for diagonal, final, message in [([0.9, 0.8], [0.6, 0.7, 0.7], "one length"),
                                     ([], [], "one length"),
                                     ([0.9, 0.8], [0.6, 0.7], "must be equal"),
                                     ([0.9, np.nan], [0.6, np.nan], "non-finite"),
                                     ([0.9, 0.7], [60.0, 0.7], "outside")]:
        with pytest.raises(ValueError, match=message):
            acc_bwt_from_ends(diagonal, final)


def test_unknown_divisor_is_rejected():
    with pytest.raises(ValueError, match="divide_by"):
        backward_transfer(R3, divide_by="n")


# ---------------------------------------------------------------------------
# Macro F1
# ---------------------------------------------------------------------------

labels = st.integers(2, 6).flatmap(lambda C: st.tuples(
    st.just(C), st.lists(st.integers(0, C - 1), min_size=1, max_size=30)))


@FAST
@given(labels)
def test_f1_is_exactly_one_when_predictions_equal_labels(case):
    C, y = case
    assert macro_f1(y, list(y), C) == 1.0


@FAST
@given(labels, st.data())
def test_f1_is_below_one_when_any_prediction_is_wrong(case, data):
    C, y = case
    y_pred = data.draw(st.lists(st.integers(0, C - 1),
                                min_size=len(y), max_size=len(y)))
    if y_pred == y:
        return
    assert macro_f1(y, y_pred, C) < 1.0


@FAST
@given(labels, st.data())
def test_f1_is_the_mean_harmonic_mean_of_precision_and_recall(case, data):
    # Independent reference: precision and recall per class, F1 their harmonic
    # mean (0 if either is 0 or undefined), classes never seen left out.
    C, y = case
    y_pred = data.draw(st.lists(st.integers(0, C - 1),
                                min_size=len(y), max_size=len(y)))
    scores = []
    for c in range(C):
        tp = sum(t == c and p == c for t, p in zip(y, y_pred))
        n_true, n_pred = y.count(c), y_pred.count(c)
        if n_true == 0 and n_pred == 0:
            continue
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        scores.append(2 * precision * recall / (precision + recall)
                      if precision + recall else 0.0)
    assert macro_f1(y, y_pred, C) == pytest.approx(sum(scores) / len(scores))


def test_f1_hand_computed_two_classes():
    # class 0: TP=1 FP=0 FN=1 -> 2/(2+0+1) = 2/3
    # class 1: TP=2 FP=1 FN=0 -> 4/(4+1+0) = 4/5
    # mean (2/3 + 4/5) / 2 = 11/15
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx(11 / 15)


def test_f1_leaves_out_a_class_nobody_saw_or_predicted():
    # class 0: TP=2 FP=1 FN=0 -> 4/5;  class 1: TP=0 FN=1 -> 0;  class 2: absent
    # mean over the two seen classes (4/5 + 0) / 2 = 0.4
    # (counting class 2 as 1 would give 0.6, as 0 would give 0.267)
    assert macro_f1([0, 0, 1], [0, 0, 0], 3) == pytest.approx(0.4)


def test_f1_of_a_class_only_predicted_is_zero():
    # class 0: TP=1 FP=0 FN=1 -> 2/3;  class 1: TP=0 FP=1 FN=0 -> 0;  mean 1/3
    assert macro_f1([0, 0], [0, 1], 2) == pytest.approx(1 / 3)


@pytest.mark.parametrize("y_true, y_pred, message", [
    ([0, 1], [0], "length"),
    ([], [], "at least one"),
    ([0, 2], [0, 1], "outside"),
    ([0.0, 1.0], [0, 1], "integer"),
])
def test_f1_rejects_bad_labels(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        macro_f1(y_true, y_pred, 2)


# ---------------------------------------------------------------------------
# Runs and tables
# ---------------------------------------------------------------------------

def test_mean_std_uses_population_std():
    # mean 0.6; deviations +-0.1 -> population std sqrt(0.02/2) = 0.1,
    # whereas the sample std would be sqrt(0.02/1) = 0.1414
    mean, std = mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(0.1)


def test_mean_std_rejects_no_runs():
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_summarize_runs_feeds_format_table_in_percent():
    runs = [{"acc": 0.80, "bwt": -0.004}, {"acc": 0.81, "bwt": -0.002}]
    row = summarize_runs(runs, "MARK")
    # acc: mean 0.805, std 0.005 -> "80.50 (0.50)"; bwt: mean -0.003 -> "-0.30"
    assert row["runs"] == 2
    table = format_table([row])
    assert table.splitlines() == ["| Method | Acc (std) % | BWT % |",
                                  "|---|---|---|",
                                  "| MARK | 80.50 (0.50) | -0.30 |"]


def test_format_table_prints_extra_columns_and_blanks_missing_ones():
    rows = [{"method": "MARK", "acc_mean": 0.8036, "acc_std": 0.00313,
             "bwt_mean": -0.0027, "Paper": "78.31 (0.3)"},
            {"method": "Baseline 1", "acc_mean": 0.3061, "acc_std": 0.00904,
             "bwt_mean": -0.3476}]
    lines = format_table(rows, extra_columns=["Paper"]).splitlines()
    assert lines[0] == "| Method | Acc (std) % | BWT % | Paper |"
    assert lines[2] == "| MARK | 80.36 (0.31) | -0.27 | 78.31 (0.3) |"
    assert lines[3] == "| Baseline 1 | 30.61 (0.90) | -34.76 |  |"


def test_format_table_names_a_missing_key():
    with pytest.raises(ValueError, match="acc_std"):
        format_table([{"method": "MARK", "acc_mean": 0.8, "bwt_mean": 0.0}])


def test_format_matrix_shows_lower_triangle_in_percent():
    lines = format_matrix(R3).splitlines()
    assert lines[0].split("|")[1].split() == ["task", "0", "task", "1", "task", "2"]
    assert lines[1].split("|")[1].split() == ["90.00"]     # 30.00 above is hidden
    assert lines[2].split("|")[1].split() == ["95.00", "70.00"]
    assert lines[3].split("|")[1].split() == ["60.00", "50.00", "40.00"]

