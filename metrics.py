"""metrics.py: how a continual learner is scored (numpy only, no torch).

    python -c "import metrics; print(metrics.format_matrix([[0.9, None], [0.8, 0.7]]))"

Everything here starts from the accuracy matrix R that the run loop fills in:

    R[i][j] = test accuracy on task j after training task i      (a fraction)

for a stream of T tasks, indices 0..T-1. Only the lower triangle (j <= i) is
a result the run produces; entries above the diagonal are unused (they may be
NaN, None or anything) and never influence ACC, BWT or forgetting. Internally
they are replaced by NaN, so a formula that touched them by mistake would
return NaN instead of a silently wrong number.

The metrics (GEM, Lopez-Paz & Ranzato 2017; forgetting: Chaudhry et al. 2018):

    ACC = (1/T) * sum_j R[T-1][j]
        average accuracy over all tasks once the last one is learned.

    BWT = (1/(T-1)) * sum_{j<T-1} (R[T-1][j] - R[j][j])
        backward transfer (Lopez-Paz & Ranzato, GEM, 2017): how much learning
        later tasks changed the accuracy of earlier ones. Negative = forgetting.
        GEM's *code* (metrics.py, confusion_matrix) takes bwt.mean() over a
        length-T vector whose last entry is 0, i.e. it divides by T, not T-1.
        `backward_transfer(R, divide_by="T")` reproduces that variant; the
        paper's definition is the default. The two differ by a factor (T-1)/T:
        -0.27 % in one convention is -0.2565 % in the other for T = 20.

    FWT = (1/(T-1)) * sum_{i>=1} (R[i-1][i] - b[i])
        forward transfer (GEM): accuracy on task i *before* training on it,
        relative to b[i], the accuracy of the model at initialisation on task
        i. R[i-1][i] lies just ABOVE the diagonal: FWT is the only metric that
        needs it, so a run that wants FWT must also evaluate every task once
        before training it (and every task at initialisation for b). GEM's
        code divides by T here too (fwt[0] = 0 is in the mean); same switch.

    forgetting = (1/(T-1)) * sum_{j<T-1} ( max_{i in j..T-2} R[i][j] - R[T-1][j] )
        average forgetting (Chaudhry et al., RWalk, 2018): the drop from the
        best accuracy a task ever had (before the last task) to its final one.
        Not clipped at 0: a negative value means final accuracies beat every
        earlier one. Always forgetting >= -BWT (the max is at least R[j][j]),
        with equality when no task's accuracy ever rises after it is learned.

    Single task (T = 1): ACC = R[0][0]; BWT, FWT and forgetting are 0.0 by
    convention: there is no earlier task to forget and no later task to
    transfer to, so "no transfer" is the honest value (the formulas would be
    0/0 with the T-1 normalisation).

    macro F1 = mean over classes c of F1_c, F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)
        A class with no true and no predicted sample (0/0) is left out of the
        mean, which is what scikit-learn's macro average does when `labels` is
        not given. So F1 = 1 exactly when every prediction equals its label.

Runs: results are reported as mean and std over runs with the *population*
std (numpy's default ddof=0), as the authors did. Accuracies are fractions
everywhere in this module; only the format_* functions print percentages.

Public interface:
    average_accuracy(R) -> float
    backward_transfer(R, divide_by="T-1") -> float
    acc_bwt_from_ends(diagonal, final, divide_by="T-1") -> (ACC, BWT)
    forward_transfer(R, b, divide_by="T-1") -> float
    forgetting(R) -> float
    macro_f1(y_true, y_pred, num_classes) -> float
    mean_std(values) -> (mean, std)
    summarize_runs(runs, method) -> row dict for format_table
    format_matrix(R) -> str
    format_table(rows, extra_columns=()) -> str (Markdown)
All input problems raise ValueError with a message saying what is wrong.
"""
from __future__ import annotations

import numpy as np


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _as_float_matrix(R) -> np.ndarray:
    """R as a square (T, T) float array; raises ValueError if it is not one."""
    try:
        # None above the diagonal becomes NaN here; a ragged list fails.
        M = np.array(R, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"accuracy matrix R must be a T x T array of numbers "
                         f"(pad unused entries above the diagonal): {err}") from None
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"accuracy matrix R must be square T x T, got shape {M.shape}")
    if M.shape[0] == 0:
        raise ValueError("accuracy matrix R is empty: no task was evaluated")
    return M


def _check_accuracies(values: np.ndarray, what: str) -> None:
    """Every entry of `values` must be a finite fraction in [0, 1]."""
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains a non-finite value (NaN or inf): "
                         f"every evaluated accuracy must be a number")
    if np.any((values < 0) | (values > 1)):
        bad = values[(values < 0) | (values > 1)][0]
        raise ValueError(f"{what} contains {bad!r}, outside [0, 1]: accuracies "
                         f"are fractions here (divide percentages by 100)")


def _lower_triangle(R) -> np.ndarray:
    """Validated copy of R with everything above the diagonal set to NaN.

    Only j <= i is checked (finite, in [0, 1]); the NaNs above make any formula
    that reads an unused entry return NaN rather than a plausible number.
    """
    M = _as_float_matrix(R)
    below = np.tril(np.ones_like(M, dtype=bool))      # (T, T), True where j <= i
    _check_accuracies(M[below], "accuracy matrix R (on or below the diagonal)")
    M[~below] = np.nan
    return M


def _divisor(T: int, divide_by: str) -> int:
    """T-1 (GEM paper, default) or T (GEM code); 1 for T=1 so 0/1 = 0.
    DEVIATION 9: the GEM paper's T-1, not its code's T."""
    if divide_by == "T-1":
        return max(T - 1, 1)
    if divide_by == "T":
        return T
    raise ValueError(f'divide_by must be "T-1" (GEM paper) or "T" (GEM code), '
                     f"got {divide_by!r}")


# ---------------------------------------------------------------------------
# The accuracy-matrix metrics
# ---------------------------------------------------------------------------

def average_accuracy(R) -> float:
    """ACC = (1/T) sum_j R[T-1][j]: mean accuracy after the last task.

    The last row is entirely on or below the diagonal, so it is always defined.
    """
    M = _lower_triangle(R)
    return float(np.mean(M[-1]))


def backward_transfer(R, divide_by: str = "T-1") -> float:
    """BWT = (1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j]), 0.0 for T = 1.

    divide_by="T-1" is GEM's paper (and this project's reported number);
    divide_by="T" is what GEM's code computes (mean over T entries, the last
    of which, R[T-1][T-1] - R[T-1][T-1], is always 0). See module docstring.
    """
    M = _lower_triangle(R)
    T = M.shape[0]
    final = M[-1, :-1]                  # (T-1,) R[T-1][j], j < T-1
    just_learned = np.diag(M)[:-1]      # (T-1,) R[j][j],   j < T-1
    return float(np.sum(final - just_learned) / _divisor(T, divide_by))


def acc_bwt_from_ends(diagonal, final, divide_by: str = "T-1") -> tuple[float, float]:
    """(ACC, BWT) from the only entries of R that they read: the diagonal
    R[j][j] (each task just after it was learned) and the last row R[T-1][j].

    A run needs 2T-1 evaluations for these instead of T(T+1)/2 for the whole
    lower triangle; MarketCL with hundreds of symbols a day evaluates only
    these (market.py --day-matrix ends). The entries between, which neither
    metric reads (test_metrics checks it), are filled with their column's
    diagonal value so that R is a valid matrix for the two functions above.
    """
    d, f = np.asarray(diagonal, dtype=float), np.asarray(final, dtype=float)
    if d.ndim != 1 or d.shape != f.shape or len(d) == 0:
        raise ValueError(f"the diagonal and the last row of R must be two vectors of one length T >= 1, "
                         f"got shapes {d.shape} and {f.shape}")
    if d[-1] != f[-1] and np.isfinite(d[-1]) and np.isfinite(f[-1]):
        raise ValueError(f"the diagonal's last entry ({d[-1]!r}) and the last row's ({f[-1]!r}) are both "
                         f"R[T-1][T-1]; they must be equal")
    R = np.tile(d, (len(d), 1))                  # (T, T) row i = the diagonal: R[i][j] = R[j][j]
    R[-1] = f
    np.fill_diagonal(R, d)
    return average_accuracy(R), backward_transfer(R, divide_by)


def forward_transfer(R, b, divide_by: str = "T-1") -> float:
    """FWT = (1/(T-1)) sum_{i>=1} (R[i-1][i] - b[i]), 0.0 for T = 1.

    b: length-T accuracies of the untrained model (at initialisation) on each
    task; b[0] is unused (task 0 has no earlier task, so no transfer to it).
    R[i-1][i] is the accuracy on task i just before training it: the first
    superdiagonal, which must therefore be filled (finite, in [0, 1]). Entries
    further above the diagonal are still ignored. divide_by as in
    backward_transfer (GEM's code also divides by T here).
    """
    M = _as_float_matrix(R)
    T = M.shape[0]
    _lower_triangle(M)                  # validates the rest of the matrix
    before = np.diag(M, k=1)            # (T-1,) R[i-1][i], i >= 1
    _check_accuracies(before, "accuracy matrix R (first superdiagonal, R[i-1][i], "
                              "needed for FWT: evaluate each task before training it)")
    b = np.asarray(b, dtype=float).reshape(-1)
    if b.shape[0] != T:
        raise ValueError(f"b must hold one initialisation accuracy per task "
                         f"(length T = {T}), got length {b.shape[0]}")
    _check_accuracies(b[1:], "initialisation accuracies b (b[1:])")
    return float(np.sum(before - b[1:]) / _divisor(T, divide_by))


def forgetting(R) -> float:
    """Average forgetting (Chaudhry et al. 2018), 0.0 for T = 1.

    For each j < T-1: f_j = max_{i in j..T-2} R[i][j] - R[T-1][j], the drop
    from the best accuracy task j had before the last task to its final one.
    Returns mean_j f_j (not clipped: negative if final accuracies improved).
    """
    M = _lower_triangle(R)
    T = M.shape[0]
    if T == 1:
        return 0.0
    # Rows j..T-2 of column j are exactly the entries on or below the diagonal
    # in rows 0..T-2, so a NaN-aware max over those rows sees nothing else.
    best_before_last = np.nanmax(M[:-1, :-1], axis=0)    # (T-1,)
    return float(np.mean(best_before_last - M[-1, :-1]))


# ---------------------------------------------------------------------------
# Macro F1 (the report logged it next to accuracy)
# ---------------------------------------------------------------------------

def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Mean over classes of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c).

    y_true, y_pred: integer labels in 0..num_classes-1, same length N >= 1
    (numpy arrays, lists or CPU tensors). Note 2TP + FP + FN = (#true c) +
    (#predicted c). Convention: a class that is neither a label nor a
    prediction (0/0) is excluded from the mean, like scikit-learn's macro
    average. Hence the result is 1.0 exactly when y_pred == y_true.
    """
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: "
                         f"{y_true.shape[0]} vs {y_pred.shape[0]}")
    if y_true.size == 0:
        raise ValueError("macro_f1 needs at least one sample, got none")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1}: "
                             f"min {y.min()}, max {y.max()}")
    tp = np.bincount(y_true[y_true == y_pred], minlength=num_classes)   # (C,)
    n_true = np.bincount(y_true, minlength=num_classes)                  # (C,) TP + FN
    n_pred = np.bincount(y_pred, minlength=num_classes)                  # (C,) TP + FP
    seen = (n_true + n_pred) > 0                                         # (C,)
    f1 = 2 * tp[seen] / (n_true[seen] + n_pred[seen])
    return float(np.mean(f1))


# ---------------------------------------------------------------------------
# Several runs -> one line of a results table
# ---------------------------------------------------------------------------

def mean_std(values) -> tuple[float, float]:
    """(mean, population std) of per-run values.

    Population std (ddof=0, numpy's default) as the authors used; the sample
    std (ddof=1) would be larger by sqrt(n/(n-1)), e.g. 1.22x for 3 runs.
    """
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size == 0:
        raise ValueError("mean_std needs at least one value, got none")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"mean_std got a non-finite value: {v.tolist()}")
    return float(np.mean(v)), float(np.std(v))


def summarize_runs(runs, method: str) -> dict:
    """Turn per-run results [{"acc": ..., "bwt": ...}, ...] into one table row.

    Returns {"method", "acc_mean", "acc_std", "bwt_mean", "bwt_std", "runs"},
    ready for format_table (which ignores keys it does not print).
    """
    if len(runs) == 0:
        raise ValueError(f"summarize_runs got no runs for method {method!r}")
    for k, run in enumerate(runs):
        missing = {"acc", "bwt"} - set(run)
        if missing:
            raise ValueError(f"run {k} of {method!r} lacks key(s) {sorted(missing)}")
    acc_mean, acc_std = mean_std([run["acc"] for run in runs])
    bwt_mean, bwt_std = mean_std([run["bwt"] for run in runs])
    return {"method": method, "acc_mean": acc_mean, "acc_std": acc_std,
            "bwt_mean": bwt_mean, "bwt_std": bwt_std, "runs": len(runs)}


# ---------------------------------------------------------------------------
# Printing (the only place where fractions become percentages)
# ---------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def format_matrix(R) -> str:
    """The lower triangle of R in percent, one line per "after task i".

        after task |  task 0  task 1
                 0 |   90.00
                 1 |   80.00   70.00

    Task indices are 0-based like R's; cells above the diagonal are blank.
    """
    M = _lower_triangle(R)
    T = M.shape[0]
    lines = ["after task |" + "".join(f"{'task ' + str(j):>8}" for j in range(T))]
    for i in range(T):
        cells = "".join(f"{_pct(M[i, j]):>8}" for j in range(i + 1))
        lines.append(f"{i:>10} |" + cells)
    return "\n".join(lines)


def format_table(rows, extra_columns=()) -> str:
    """Markdown results table in the report's style.

    rows: list of dicts with "method" (str), "acc_mean", "acc_std", "bwt_mean"
    (fractions; printed as percentages with two decimals), plus, for each name
    in `extra_columns`, a preformatted string (e.g. "1.2M", "35 min",
    "78.31 (0.3)"); a row without that key gets an empty cell.

        | Method | Acc (std) % | BWT % | Params |
        |---|---|---|---|
        | MARK | 80.36 (0.31) | -0.03 | 1.2M |
    """
    header = ["Method", "Acc (std) %", "BWT %", *extra_columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for k, row in enumerate(rows):
        missing = {"method", "acc_mean", "acc_std", "bwt_mean"} - set(row)
        if missing:
            raise ValueError(f"table row {k} lacks key(s) {sorted(missing)}")
        cells = [str(row["method"]),
                 f"{_pct(row['acc_mean'])} ({_pct(row['acc_std'])})",
                 _pct(row["bwt_mean"]),
                 *(str(row.get(name, "")) for name in extra_columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
