"""test_market.py: MarketCL trained day by day (market.py): LSTMs, symbol isolation, labels."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import experiment
import mark_min as mm
import market
import market_data
from data import Sequences, Split
from market_data import load_market, write_synthetic_market
from test_mark import CPU

def test_describe_covers_the_lstm_family_with_four_label_heads(capsys):
    """MarketCL: the table is counted on the model a market run builds (LSTM
    KB 27 -> 64 -> 128 -> 256, heads of 4 labels x 4 classes), T from --num-tasks."""
    cfg, _, _ = market.parse(["--num-tasks", "3"])
    total = market.describe(cfg)
    out = capsys.readouterr().out
    model = market.build_model(cfg, (375, len(market_data.MARKET_FEATURE_NAMES)), [4] * 3, CPU)
    assert total == sum(p.numel() for p in model.parameters())
    assert "4 labels of 4 classes per task, 3 tasks" in out
    assert f"{256 * 16 + 16:,d}" in out                      # one head: 256 -> 4 x 4 logits


# ---------------------------------------------------------------------------
# Properties of MARK's sequence family and the MarketCL protocol (mark_min.py).
#
#
# No real data is read: every stream is written by write_synthetic_market into
# a temporary folder, and every model is tiny.
# ---------------------------------------------------------------------------

torch.set_num_threads(1)
MARKET_SETTINGS = settings(max_examples=15, deadline=None)


def market_cfg(**overrides):
    """Tiny LSTMs (8 units) and one epoch per step: seconds per run, same code paths."""
    base = dict(dataset="market-synthetic", profile="paper", seq_query=8, seq_channels=(8, 8, 8),
                epochs_fe=1, epochs_kb=1, epochs_masks=1, epochs_consolidate=1, meta_epochs=1,
                meta_k=1, meta_inner_steps=1)
    base.update(overrides)
    return market.resolve_config(market.MarketConfig(**base), overridden=set(base))


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """3 symbols x 3 days with samples (the first written day is history only)."""
    folder = tmp_path_factory.mktemp("market")
    write_synthetic_market(folder, seed=0, num_symbols=3, num_days=4)
    return load_market(folder, seed=0)


def snapshot_symbol(model, s):
    """Every parameter and buffer of symbol s's F_s, M_s and C_s, cloned."""
    modules = [model.extractors[s], model.mask_generators[s], model.heads[s]]
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def identical(a, b) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# The LSTMs read each sequence's true last step, never padding
# ---------------------------------------------------------------------------

@MARKET_SETTINGS
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_a_padded_batch_gives_each_sequence_the_output_of_running_it_alone(lengths, seed):
    torch.manual_seed(seed)
    kb, fe = market.SequenceKnowledgeBase(3, (4, 5, 6)).eval(), market.SequenceFeatureExtractor(3, 4).eval()
    L = max(lengths) + 3                                    # padding even after the longest
    x = torch.randn(len(lengths), L, 3)
    lengths = torch.tensor(lengths)
    x[torch.arange(L)[None, :] >= lengths[:, None]] = 0     # zero padding, as the loader writes it
    masks = [torch.rand(len(lengths), c) for c in (4, 5, 6)]
    batch = Sequences(x, lengths)
    with torch.no_grad():
        kb_batch, fe_batch = kb(batch, masks), fe(batch)
        for i, n in enumerate(lengths.tolist()):
            alone = Sequences(x[i:i + 1, :n], lengths[i:i + 1])          # unpadded
            torch.testing.assert_close(kb_batch[i], kb(alone, [m[i:i + 1] for m in masks])[0])
            torch.testing.assert_close(fe_batch[i], fe(alone)[0])


# ---------------------------------------------------------------------------
# Task isolation for the LSTM model
# ---------------------------------------------------------------------------

def test_training_a_symbol_leaves_every_other_symbols_modules_bit_identical(stream):
    cfg = market_cfg()
    S = len(stream.symbols)
    model = market.build_model(cfg, stream.splits[0][0].x.shape[1:], [4] * S, CPU)
    gen = torch.Generator().manual_seed(0)
    timer = experiment.StepTimer(torch.device("cpu"), lambda _: None)
    index = 0
    for d in range(2):                   # day 2 retrains every symbol with its own modules
        for s in range(S):
            others = {u: snapshot_symbol(model, u) for u in range(S) if u != s}
            own, weights = snapshot_symbol(model, s), model.class_weights.clone()
            model.set_class_weights(s, stream.splits[d][s].y)
            mm.train_task_mark(model, s, market.market_task(index, s, stream.splits[d][s]), cfg, gen, timer)
            index += 1
            for u, before in others.items():
                assert identical(before, snapshot_symbol(model, u)), f"day {d}: symbol {u} changed"
                assert torch.equal(weights[u], model.class_weights[u])
            assert not identical(own, snapshot_symbol(model, s)), "the trained symbol did not learn"


def test_only_the_first_symbol_day_pre_trains_the_kb(stream):
    """With the meta-update off (the ablation), the KB is trained on the first
    symbol-day and then never again, not even when symbol 0 comes back."""
    cfg = market_cfg()
    model = market.build_model(cfg, stream.splits[0][0].x.shape[1:], [4] * 3, CPU)
    gen, timer = torch.Generator().manual_seed(0), experiment.StepTimer(torch.device("cpu"), lambda _: None)
    kb_at_init = {k: v.clone() for k, v in model.kbs[0].state_dict().items()}
    index = 0
    for d in range(2):
        for s in range(3):
            mm.train_task_mark(model, s, market.market_task(index, s, stream.splits[d][s]), cfg, gen, timer,
                               meta=False)
            if index == 0:
                assert not identical([kb_at_init], [model.kbs[0].state_dict()]), "step 2 did not run"
                kb_after_first = {k: v.clone() for k, v in model.kbs[0].state_dict().items()}
            assert identical([kb_after_first], [model.kbs[0].state_dict()]), f"day {d}, symbol {s}"
            index += 1


# ---------------------------------------------------------------------------
# The class-weighted loss of the four heads
# ---------------------------------------------------------------------------

def test_class_weighted_loss_equals_a_hand_computation():
    """2 label heads of 3 classes, 4 samples. Head 0 holds class 0 three times and
    class 1 once (class 2 absent); head 1 holds classes 0, 1, 2, 2."""
    model = market.build_model(market_cfg(seq_channels=(2, 2, 2), seq_query=2), (5, 2), [3], CPU, labels=2)
    y = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 2]])
    model.set_class_weights(0, y)
    # w_c = n / (k n_c) with n = 4, k = 3; an absent class gets 1.
    expected_weights = [[4 / 9, 4 / 3, 1.0], [4 / 3, 4 / 3, 2 / 3]]
    torch.testing.assert_close(model.class_weights[0], torch.tensor(expected_weights))
    out = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))     # (B, labels * k)
    logp = F.log_softmax(out.view(4, 2, 3).double(), dim=2).numpy()         # (B, labels, k)
    per_head = []
    for j in range(2):
        w = np.array([expected_weights[j][c] for c in y[:, j]])           # weight of each target
        nll = -np.array([logp[i, j, c] for i, c in enumerate(y[:, j])])
        per_head.append((w * nll).sum() / w.sum())                        # PyTorch's weighted mean
    assert model.loss(out, y, 0).item() == pytest.approx(np.mean(per_head), rel=1e-5)


def test_a_class_absent_from_the_labels_never_enters_the_loss():
    model = market.build_model(market_cfg(seq_channels=(2, 2, 2), seq_query=2), (5, 2), [3], CPU, labels=2)
    y = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 2]])                    # head 0 lacks class 2
    model.set_class_weights(0, y)
    out = torch.randn(4, 6)
    loss = model.loss(out, y, 0)
    model.class_weights[0, 0, 2] = 1000.0                                  # any weight for it
    assert model.loss(out, y, 0).item() == pytest.approx(loss.item(), rel=1e-6)


# ---------------------------------------------------------------------------
# The day-by-day protocol, end to end through the command lines
# ---------------------------------------------------------------------------

TINY_FLAGS = ["--dataset", "market-synthetic", "--num-tasks", "3", "--num-days", "3",
              "--profile", "paper", "--seq-query", "8", "--seq-channels", "8", "8", "8",
              "--epochs-fe", "1", "--epochs-kb", "1", "--epochs-masks", "1",
              "--epochs-consolidate", "1", "--meta-k", "1", "--meta-inner-steps", "1",
              "--meta-epochs", "1"]


def check_market_results(saved, method):
    assert saved["method"] == method and saved["summary"]["runs"] == 1
    run = saved["runs"][0]
    assert run["days_done"] == run["training_days"] == 2          # 3 days: train 2, test each on the next
    for key in ("acc_per_label", "bwt_per_label", "macro_f1_per_label"):
        assert len(run[key]) == 4
    assert run["acc"] == pytest.approx(np.mean(run["acc_per_label"]))
    assert saved["summary"]["acc_mean"] == pytest.approx(run["acc"])
    assert np.allclose(np.sum(run["class_balance"], axis=1), 1.0)
    for day in run["days"]:
        assert day["tested"] == run["symbols"] and len(day["acc_matrices"]) == 4
        for R in day["acc_matrices"]:                               # lower triangle filled
            assert all(len(row) == 3 for row in R)
            assert all((R[i][j] is None) == (j > i) for i in range(3) for j in range(3))
        assert day["seconds"] > 0
    return run


def test_market_synthetic_run_writes_per_label_results_and_baseline4_does_not_forget(tmp_path):
    # 10 KB epochs: enough that a KB shared by the symbols (Baseline 1, the
    # control) changes earlier symbols' predictions, so BWT == 0 is not vacuous.
    # MARK too: a table compares methods on one schedule.
    assert market.main(TINY_FLAGS + ["--epochs-kb", "10", "--data-dir", str(tmp_path),
                                 "--out", str(tmp_path / "mark")]) == 0
    mark = check_market_results(json.loads((tmp_path / "mark" / "results.json").read_text()), "mark")
    assert (tmp_path / "market-synthetic-seed0" / "SYN00.csv").exists()    # through the real loader

    runs = {}
    for method in ("b4", "b1"):
        assert market.main(TINY_FLAGS + ["--epochs-kb", "10", "--method", method, "--data-dir",
                                         str(tmp_path), "--out", str(tmp_path / method)]) == 0
        runs[method] = check_market_results(
            json.loads((tmp_path / method / "results.json").read_text()), method)
    b4 = runs["b4"]
    assert b4["bwt_per_label"] == [0.0] * 4 and b4["bwt"] == 0.0       # exactly: one network per symbol
    assert any(bwt != 0.0 for bwt in runs["b1"]["bwt_per_label"])       # a shared KB does not keep them
    assert b4["parameters"] > mark["parameters"]
    market.build_table(tmp_path, "market-synthetic", log=lambda _: None)    # the report's Table 3
    table = (tmp_path / "table.md").read_text()
    assert "| MARK |" in table and "| Baseline 4 (independent network per task) |" in table
    assert "class balance" in table


def test_a_skipped_symbol_day_is_not_trained_and_has_no_row_or_column(stream, monkeypatch):
    days = [list(row) for row in stream.splits]
    days[0][1] = None                       # symbol 1 has no samples on day 0
    days[2][2] = None                       # symbol 2 has none on the last day: untestable on day 1
    holey = dataclasses.replace(stream, splits=days)
    trained = []

    def spy(model, t, task, *args):
        trained.append(t)
        return mm.train_task_mark(model, t, task, *args)

    run = market.run_market_seed(market_cfg(), "mark", 0, holey, spy, market.build_model, CPU,
                                 lambda _: None)
    assert trained == [0, 2, 0, 1, 2]
    S = stream.symbols
    assert run["days"][0]["tested"] == [S[0], S[2]] and run["days"][1]["tested"] == [S[0], S[1]]
    assert all(np.array(R).shape == (2, 2) for day in run["days"] for R in day["acc_matrices"])


def test_day_matrix_ends_tests_only_the_diagonal_and_last_row_and_gives_the_same_scores(tmp_path):
    # Baseline 1's shared KB changes earlier symbols' predictions (BWT != 0),
    # so equal BWTs compare numbers that depend on the last row being re-tested.
    runs = {}
    for matrix in ("full", "ends"):
        assert market.main(TINY_FLAGS + ["--epochs-kb", "10", "--method", "b1", "--day-matrix", matrix,
                                         "--data-dir", str(tmp_path), "--out", str(tmp_path / matrix)]) == 0
        runs[matrix] = json.loads((tmp_path / matrix / "results.json").read_text())["runs"][0]
    full, ends = runs["full"], runs["ends"]
    assert any(bwt != 0.0 for day in full["days"] for bwt in day["bwt_per_label"])
    for a, b in zip(full["days"], ends["days"]):
        for key in ("acc_per_label", "bwt_per_label", "macro_f1_per_label"):
            assert a[key] == b[key]
        for R_full, R_ends in zip(a["acc_matrices"], b["acc_matrices"]):
            T = len(R_full)
            for i in range(T):
                for j in range(i + 1):
                    assert R_ends[i][j] == (R_full[i][j] if j == i or i == T - 1 else None)


def test_num_symbols_writes_that_many_symbols_to_a_folder_of_their_own(tmp_path):
    cfg, _, _ = market.parse(["--num-symbols", "9", "--num-days", "2", "--data-dir", str(tmp_path)])
    assert len(market.load_market_stream(cfg, 0, CPU).symbols) == 9
    assert len(list((tmp_path / "market-synthetic-seed0-9symbols").glob("*.csv"))) == 9
    six, _, _ = market.parse(["--num-days", "2", "--data-dir", str(tmp_path)])
    assert len(market.load_market_stream(six, 0, CPU).symbols) == 6      # the default folder is not mixed in
    assert len(list((tmp_path / "market-synthetic-seed0").glob("*.csv"))) == 6
    assert experiment.run_identity(cfg, "mark", 0) != experiment.run_identity(six, "mark", 0)


def test_mark_with_supsup_runs_on_market_data(tmp_path):
    assert market.main(TINY_FLAGS + ["--num-tasks", "2", "--supsup", "--data-dir", str(tmp_path),
                                 "--out", str(tmp_path / "sup")]) == 0
    run = json.loads((tmp_path / "sup" / "results.json").read_text())["runs"][0]
    assert len(run["acc_per_label"]) == 4 and run["days_done"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--source", "x"], "--source is read by --dataset market only"),
    (["--num-days", "1"], "--num-days must be >= 2"),
    (["--dataset", "glyphs"], "invalid choice"),
    (["--dataset", "market"], "--dataset market needs --source"),
    (["--dataset", "market", "--source", "x", "--num-symbols", "9"], "--num-symbols is for --dataset market-synthetic"),
    (["--num-symbols", "0"], "--num-symbols"),
    (["--day-matrix", "half"], "invalid choice")])
def test_market_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        market.parse(argv)
    assert message in capsys.readouterr().err


def test_mark_min_leaves_market_flags_to_market_py(capsys):
    with pytest.raises(SystemExit):
        mm.parse(["--num-days", "3"])
    assert "unrecognized arguments: --num-days" in capsys.readouterr().err



def test_trivial_predictors_learn_from_the_past_only():
    """majority: every label's most frequent class in the training data so
    far; previous_day: each symbol's most frequent class of the day it just
    trained on. Tomorrow's labels (all class 3 here) are never read."""
    from types import SimpleNamespace
    split = lambda rows: Split(torch.zeros(len(rows), 1), torch.tensor(rows))
    today = [split([[0, 1], [0, 2], [1, 2]]), split([[2, 1], [2, 1], [0, 0]])]    # 2 symbols, 2 labels
    tomorrow = [split([[3, 3]] * 4), split([[3, 3]] * 2)]
    stream = SimpleNamespace(splits=[today, tomorrow])
    seen = np.array([[5, 0, 3, 0], [0, 0, 1, 9]])                                    # (labels, classes)
    preds = market.trivial_predictions(stream, 0, [0, 1], seen)
    assert preds["majority"].tolist() == [[0, 3]] * 6
    assert preds["previous_day"].tolist() == [[0, 2]] * 4 + [[2, 1]] * 2
    scored = market.scores(np.array([[0, 2]] * 4 + [[0, 0]] * 2), preds["previous_day"], [4, 2])
    assert scored["acc_per_label"] == [0.5, 0.5]            # symbol 0: 1, 1; symbol 1: 0, 0


def test_the_market_paper_profile_is_the_reports():
    cfg, given, _ = market.parse(["--profile", "paper"])
    assert (cfg.lr, cfg.lr_consolidate, cfg.batch_size) == (0.001, 0.005, 4)
    assert (cfg.epochs_fe, cfg.epochs_kb, cfg.epochs_masks, cfg.epochs_consolidate) == (30, 30, 30, 25)
    assert "paper protocol" in mm.describe_schedule(cfg, given)
    quick, given, _ = market.parse([])
    assert quick.profile == "quick" and "SHORT" in mm.describe_schedule(quick, given)
    assert (quick.lr, quick.batch_size) == (0.001, 4)
