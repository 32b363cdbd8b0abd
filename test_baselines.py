"""test_baselines.py: each method's defining property (baselines.py), and the tables."""
import json
from functools import partial

import numpy as np
import pytest
import torch

import baselines
import experiment
import mark_min as mm
from metrics import backward_transfer
from test_mark import CPU, kb_changed, tiny_cfg, tiny_tasks, train_stream

# ---------------------------------------------------------------------------
# baselines.py: each method's defining property, on a tiny stream
# ---------------------------------------------------------------------------

def train_method(method, T=3, **cfg_over):
    """Train `method` on a tiny stream; return the model, the tasks, R and the
    KB's state after each task."""
    _, train_task, model_options = baselines.METHODS[method]
    return train_stream(train_task, T, partial(mm.build_model, **model_options), **cfg_over)


def test_baseline1_retrains_the_kb_on_every_task_has_no_masks_and_forgets(monkeypatch):
    calls = []
    monkeypatch.setattr(mm.MaskGenerator, "forward", lambda *a: calls.append(1))
    model, _, R, kbs = train_method("b1")
    assert not calls and not model.use_masks and not hasattr(model, "mask_generators")
    assert all(kb_changed(kbs[t - 1], kbs[t]) for t in (1, 2))
    assert np.diag(R).min() >= 0.8 and backward_transfer(R) < -0.15, R   # learns, then forgets


def train_counting_meta_updates(monkeypatch, method, **cfg_over):
    """train_method, plus the tasks step 4 ran on and a fresh model of the same init."""
    meta_calls = []
    original = mm.step4_meta_update
    monkeypatch.setattr(mm, "step4_meta_update",
                        lambda *a, **k: (meta_calls.append(a[1]), original(*a, **k)))
    torch.manual_seed(0)
    fresh = mm.build_model(tiny_cfg(**cfg_over), (1, 20, 20), [3, 3, 3], CPU, masks=False)
    return meta_calls, fresh, *train_method(method, **cfg_over)


@pytest.mark.parametrize("method", ["b2", "b2-report"])
def test_baseline2_runs_the_meta_update_and_trains_every_head(monkeypatch, method):
    """b2 trains the KB ordinarily on every task; b2-report (the report's code)
    on the first only, after which the KB moves only by meta-updates (none at
    all with a zero outer step). Both train every task's head."""
    meta_calls, fresh, model, _, R, kbs = train_counting_meta_updates(monkeypatch, method,
                                                                      meta_outer_lr=0.0)
    assert meta_calls == [0, 1, 2]
    for t in range(3):                    # same init (same seed), so a trained head differs
        assert not torch.equal(model.heads[t].weight, fresh.heads[t].weight)
    assert kb_changed(kbs[0], kbs[2]) == (method == "b2")
    if method == "b2-report":
        assert np.diag(R).min() >= 0.5 and backward_transfer(R) == 0.0, R     # chance: 1/3
        _, _, _, kbs = train_method(method, meta_outer_lr=0.5)
        assert kb_changed(kbs[0], kbs[2])


def test_baseline3_trains_masks_and_the_kb_on_every_task():
    model, _, _, kbs = train_method("b3")
    assert model.use_masks
    assert all(kb_changed(kbs[t - 1], kbs[t]) for t in (1, 2))
    torch.manual_seed(0)
    fresh = mm.build_model(tiny_cfg(), (1, 20, 20), [3, 3, 3], CPU)
    for t in range(3):
        assert not torch.equal(model.mask_generators[t].layers[0].weight,
                               fresh.mask_generators[t].layers[0].weight)


def test_baseline4_has_t_times_the_parameters_and_bwt_exactly_zero():
    model, _, R, _ = train_method("b4")
    one = mm.build_model(tiny_cfg(), (1, 20, 20), [3], CPU, masks=False)
    assert experiment.count_parameters(model) == 3 * experiment.count_parameters(one)
    # Each task learns (chance 1/3), and nothing a task uses is trained afterwards;
    # a shared KB would be overwritten by the later tasks (see Baseline 1).
    assert np.diag(R).min() >= 0.8 and backward_transfer(R) == 0.0, R


def test_the_frozen_kb_ablation_has_bwt_exactly_zero():
    _, _, R, kbs = train_method("ablation")
    assert np.diag(R).min() >= 0.8 and backward_transfer(R) == 0.0, R
    assert not kb_changed(kbs[0], kbs[2])


def test_mark_moves_the_kb_after_the_first_task_only_by_the_meta_update():
    _, _, _, kbs = train_method("mark", meta_outer_lr=0.0)   # eps = 0: no meta movement
    assert not kb_changed(kbs[0], kbs[2])
    _, _, _, kbs = train_method("mark", meta_outer_lr=0.5)
    assert kb_changed(kbs[0], kbs[2])


def test_table_builder_computes_mean_and_std_from_hand_made_results(tmp_path):
    def run(seed, acc, bwt):
        return {"seed": seed, "acc": acc, "bwt": bwt, "tasks_done": 2, "parameters": 1234,
                "acc_matrix": [[0.9, None], [0.8, 0.7]], "task_seconds": [30.0, 30.0],
                "identity": {"dataset": "cifar100"}}
    for method, runs in {"mark": [run(0, 0.80, -0.01), run(1, 0.90, 0.01)],
                         "b1": [run(0, 0.50, -0.30)]}.items():
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(json.dumps(
            {"schedule": "profile 'short'", "runs": runs}))
    rows = {r["method"]: r for r in baselines.build_table(tmp_path, "cifar100", log=lambda *_: None)}
    mark = rows["MARK"]
    assert mark["acc_mean"] == pytest.approx(0.85) and mark["acc_std"] == pytest.approx(0.05)
    assert mark["bwt_mean"] == pytest.approx(0.0) and mark["runs"] == "2"
    assert mark["wall time / run"] == "1.0 min" and mark["parameters"] == "1,234"
    assert "78.31" in mark["reference Acc (std) %"] and "80.36" in mark["reference Acc (std) %"]
    text = (tmp_path / "table.md").read_text()
    assert "| MARK | 85.00 (5.00) | 0.00 | 1,234 | 1.0 min | 2 |" in text
    assert "| Baseline 1 (sequential KB, no masks) | 50.00 (0.00) | -30.00 |" in text
    saved = {r["method"]: r for r in json.loads((tmp_path / "table.json").read_text())["rows"]}
    assert saved["MARK"]["acc_mean"] == pytest.approx(0.85)


def test_the_table_shows_each_task_of_mark_beside_the_ablation(tmp_path):
    def run(R):
        T = len(R)
        return {"seed": 0, "acc": float(np.mean(R[-1])), "bwt": 0.0, "tasks_done": T, "parameters": 1,
                "identity": {"dataset": "cifar100"}, "task_seconds": [1.0] * T,
                "acc_matrix": [[R[i][j] if j <= i else None for j in range(T)] for i in range(T)]}
    for method, R in {"mark": [[0.9, 0], [0.92, 0.8]], "ablation": [[0.9, 0], [0.9, 0.85]]}.items():
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(json.dumps({"schedule": "s", "runs": [run(R)]}))
    baselines.build_table(tmp_path, log=lambda *_: None)
    text = (tmp_path / "table.md").read_text()
    assert "| 1 | 90.00 | 92.00 | 90.00 | 90.00 | +2.00 |" in text
    assert "| 2 | 80.00 | 80.00 | 85.00 | 85.00 | -5.00 |" in text


def test_while_a_step_trains_every_frozen_module_is_in_eval_mode(monkeypatch):
    """Frozen modules must not update BN statistics or apply dropout: during
    step 3 only M_t and C_t are in training mode (the KB, trained in train
    mode by step 2 just before, must be back in eval mode)."""
    torch.manual_seed(0)
    cfg, task = tiny_cfg(), tiny_tasks(T=1)[0]
    model = mm.build_model(cfg, task.input_shape, [3], CPU)
    gen = torch.Generator().manual_seed(0)
    q = mm.step1_feature_extractor(model, 0, task, cfg, gen)
    mm.step2_pretrain_kb(model, 0, task, cfg, gen)
    seen = []
    original_fit = mm.fit

    def spying_fit(model_, cfg_, gen_, n, loss_of_batch, **kw):
        def spy(i):
            seen.append({name for name, m in model_.named_modules() if m.training})
            return loss_of_batch(i)
        return original_fit(model_, cfg_, gen_, n, spy, **kw)

    monkeypatch.setattr(mm, "fit", spying_fit)
    mm.step3_masks_and_head(model, 0, task, cfg, gen, q)
    trained = {n for n in seen[0] if n}
    assert trained and all(n.startswith(("mask_generators.0", "heads.0")) for n in trained), trained

