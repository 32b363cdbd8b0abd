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
from test_mark import CPU, assert_identical, kb_changed, run_tiny, tiny_cfg, tiny_tasks, train_stream

# An EWC strength at which the penalty clearly keeps the tiny stream's first
# tasks (test_ewc_forgets_less_than_baseline1_on_the_tiny_stream).
EWC_STRONG = 1000.0

# ---------------------------------------------------------------------------
# baselines.py: each method's defining property, on a tiny stream
# ---------------------------------------------------------------------------

def train_method(method, T=3, **cfg_over):
    """Train `method` on a tiny stream; return the model, the tasks, R and the
    KB's state after each task."""
    m = baselines.METHODS[method]
    return train_stream(m.train_task, T, m.builder(), config_class=m.config_class, **cfg_over)


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



# ---------------------------------------------------------------------------
# EWC (baselines.py): the penalty, its state, and a method's own settings
# ---------------------------------------------------------------------------

def kb_and_state(seed=0):
    torch.manual_seed(seed)
    kb = mm.KnowledgeBase((1, 20, 20), channels=(4, 4, 4), out_dim=8)
    return kb, baselines.EWCState(kb)


def test_ewc_penalty_is_zero_at_the_anchor_and_the_fisher_weighted_squared_distance_away():
    kb, state = kb_and_state()
    fisher = {name: torch.rand_like(p) for name, p in kb.named_parameters()}
    state.consolidate(kb, fisher)
    assert state.penalty(kb, 7.0).item() == 0.0                 # theta = theta*: exactly zero
    anchor = {name: p.detach().clone() for name, p in kb.named_parameters()}
    delta = {name: torch.randn_like(p) for name, p in kb.named_parameters()}
    penalties = []
    for scale in (1.0, 2.0):
        with torch.no_grad():
            for name, p in kb.named_parameters():
                p.copy_(anchor[name] + scale * delta[name])
        by_hand = 7.0 / 2 * sum(float((fisher[n] * (scale * delta[n]) ** 2).sum()) for n in fisher)
        penalties.append(state.penalty(kb, 7.0).item())
        assert penalties[-1] == pytest.approx(by_hand, rel=1e-5)
    assert penalties[1] == pytest.approx(4 * penalties[0], rel=1e-5)   # quadratic in the distance


def test_ewc_state_accumulates_the_fisher_and_anchors_at_the_latest_kb():
    kb, state = kb_and_state()
    first = {name: torch.rand_like(p) for name, p in kb.named_parameters()}
    state.consolidate(kb, first)
    with torch.no_grad():
        for p in kb.parameters():
            p.add_(1.0)                                          # the KB after a second task
    second = {name: torch.rand_like(p) for name, p in kb.named_parameters()}
    state.consolidate(kb, second)
    saved = state.state_dict()
    for name, p in kb.named_parameters():
        torch.testing.assert_close(saved[state.key("fisher", name)], first[name] + second[name])
        assert torch.equal(saved[state.key("anchor", name)], p)


def test_ewc_fisher_is_the_mean_squared_per_sample_gradient_of_the_true_labels_log_likelihood():
    torch.manual_seed(0)
    cfg, task = tiny_cfg(), tiny_tasks(T=1)[0]
    model = mm.build_model(cfg, task.input_shape, [3], CPU, masks=False)
    kb = model.kb(0)
    for samples, keep in ((None, torch.arange(48)), (5, torch.tensor([0, 12, 24, 35, 47]))):
        fisher = baselines.empirical_fisher(model, 0, task.train, samples, chunk=7)
        by_hand = {name: torch.zeros_like(p) for name, p in kb.named_parameters()}
        for i in keep:                                           # one sample at a time
            model.zero_grad()
            logits = model.heads(kb(task.train.x[i:i + 1]), 0)
            torch.log_softmax(logits, 1)[0, task.train.y[i]].backward()
            for name, p in kb.named_parameters():
                by_hand[name] += p.grad ** 2 / len(keep)
        for name in by_hand:
            torch.testing.assert_close(fisher[name], by_hand[name], rtol=1e-4, atol=1e-9)
        assert all(f.abs().sum() > 0 for f in fisher.values())


def test_ewc_with_lambda_zero_is_bit_identical_to_baseline1():
    _, _, R_b1, kbs_b1 = train_method("b1")
    _, _, R_ewc, kbs_ewc = train_method("ewc", ewc_lambda=0.0)
    assert np.array_equal(R_b1, R_ewc, equal_nan=True)
    for a, b in zip(kbs_b1, kbs_ewc):
        assert_identical(a, b)
    _, _, R_strong, _ = train_method("ewc", ewc_lambda=EWC_STRONG)     # control: the penalty acts
    assert not np.array_equal(R_b1, R_strong, equal_nan=True)


def test_ewc_forgets_less_than_baseline1_on_the_tiny_stream():
    _, _, R_b1, _ = train_method("b1")
    _, _, R_ewc, _ = train_method("ewc", ewc_lambda=EWC_STRONG)
    assert np.diag(R_ewc).min() >= 0.5, R_ewc             # still learns each task (chance 1/3)
    assert backward_transfer(R_ewc) > backward_transfer(R_b1) + 0.2, (R_b1, R_ewc)


def test_ewc_resume_restores_the_fisher_and_the_anchor(tmp_path, monkeypatch):
    """The resumed run equals the uninterrupted one, and its checkpoint holds
    the same EWC state. With a lambda this large, a state lost on resume (F = 0,
    no penalty on task 3) changes task 1's accuracy after task 3."""
    m = baselines.METHODS["ewc"]
    run = partial(run_tiny, monkeypatch=monkeypatch, method="ewc", build=m.builder(),
                  config_class=baselines.EWCConfig, ewc_lambda=EWC_STRONG)
    straight = run(tmp_path / "a", train_task=m.train_task)

    def interrupted(model, t, *args, **kw):
        if t == 2:
            raise KeyboardInterrupt
        return m.train_task(model, t, *args, **kw)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", train_task=interrupted)
    resumed = run(tmp_path / "b", train_task=m.train_task, resume=True)
    assert resumed["runs"][0]["acc_matrix"] == straight["runs"][0]["acc_matrix"]
    states = [torch.load(tmp_path / d / "checkpoint_ewc_seed0.pt", weights_only=True)["model"]
              for d in ("a", "b")]
    ewc_keys = [k for k in states[0] if k.startswith("method_state.")]
    assert len(ewc_keys) == 2 * len(list(mm.KnowledgeBase((1, 20, 20)).parameters()))
    assert_identical({k: states[0][k] for k in ewc_keys}, {k: states[1][k] for k in ewc_keys})
    assert all(states[0][k].abs().sum() > 0 for k in ewc_keys)


def test_a_methods_own_flags_reach_its_config_and_identity_and_no_other_method(tmp_path, capsys):
    cfg, given, _, _ = baselines.parse(["--method", "ewc", "--ewc-lambda", "5"])
    assert type(cfg) is baselines.EWCConfig and cfg.ewc_lambda == 5 and "ewc_lambda" in given
    assert experiment.run_identity(cfg, "ewc", 0)["ewc_lambda"] == 5
    cfg, _, _, _ = baselines.parse(["--method", "b1"])
    assert type(cfg) is mm.Config and "ewc_lambda" not in experiment.run_identity(cfg, "b1", 0)
    assert not hasattr(mm.Config(), "ewc_lambda")
    for argv in (["--method", "b1", "--ewc-lambda", "5"], ["--table", str(tmp_path), "--ewc-lambda", "5"],
                 ["--method", "ewc", "--ewc-lambda", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            baselines.parse(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--ewc-lambda" in err and ("--method ewc" in err or "-1" in err), err
    # --all: every method with its own class, the given settings to their owner only.
    cfg, given, _, settings = baselines.parse(["--all", "--out", str(tmp_path), "--ewc-lambda", "5"])
    seen = {}
    baselines.run_all(cfg, given, lambda c, method, over: seen.setdefault(method, (c, over)),
                      settings=settings)
    assert set(seen) == set(baselines.METHODS)
    assert type(seen["ewc"][0]) is baselines.EWCConfig and seen["ewc"][0].ewc_lambda == 5
    assert "ewc_lambda" in seen["ewc"][1] and "ewc_lambda" not in seen["b1"][1]
    assert all(type(c) is baselines.METHODS[m].config_class for m, (c, _) in seen.items())


def test_an_identity_saved_before_a_method_setting_existed_takes_its_default():
    cfg = baselines.EWCConfig()
    saved = experiment.run_identity(cfg, "ewc", 0)
    del saved["ewc_fisher_samples"]
    assert experiment.with_new_settings(saved, cfg) == experiment.run_identity(cfg, "ewc", 0)
