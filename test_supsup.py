"""test_supsup.py: MARK + SupSup (supsup.py): supermasks, task isolation, masks as bits."""
import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

import mark_min as mm
import supsup
from test_mark import SETTINGS, run_tiny, tiny_setup

# ---------------------------------------------------------------------------
# Supermasks: density, straight-through gradient, bits
# ---------------------------------------------------------------------------

@SETTINGS
@given(density=st.floats(0.05, 1.0), rows=st.integers(1, 20), cols=st.integers(1, 20),
       seed=st.integers(0, 2**16))
@example(density=0.06, rows=15, cols=15, seed=0)     # 0.06 * 225 = 13.5: rounding must match binarize
def test_topk_supermasks_have_exactly_the_requested_density(density, rows, cols, seed):
    torch.manual_seed(seed)
    layer = supsup.SupermaskLinear(cols, rows, num_tasks=2, how="topk", density=density)
    for t in range(2):
        assert layer.mask(t).sum().item() == round(density * (rows * cols))   # n = rows * cols weights, as binarize
        assert set(layer.mask(t).unique().tolist()) <= {0.0, 1.0}


def test_sign_supermasks_keep_exactly_the_non_negative_scores():
    layer = supsup.SupermaskLinear(4, 3, num_tasks=1, how="sign")
    with torch.no_grad():
        layer.scores[0].copy_(torch.arange(12.0).view(3, 4) - 5)
    assert torch.equal(layer.mask(0), (torch.arange(12.0).view(3, 4) >= 5).float())


@pytest.mark.parametrize("how", ["topk", "sign"])
def test_straight_through_gradient_reaches_the_scores_and_weights_stay_fixed(how):
    torch.manual_seed(0)
    layer = supsup.SupermaskLinear(6, 4, num_tasks=2, how=how)
    weight = layer.weight.clone()
    layer(torch.randn(5, 6), 1).pow(2).sum().backward()
    assert layer.scores[1].grad is not None and layer.scores[1].grad.abs().sum() > 0
    assert layer.scores[0].grad is None                 # another task: not even touched
    assert not layer.weight.requires_grad and torch.equal(layer.weight, weight)
    torch.testing.assert_close(layer.weight.abs(), torch.full((4, 6), (2 / 6) ** 0.5))


@pytest.mark.parametrize("how", ["topk", "sign"])
def test_supsup_training_task_t_leaves_every_other_tasks_scores_bit_identical(how):
    """With the optimizer the method uses (SGD, momentum, weight decay): no
    update, decay or momentum ever reaches another task's scores."""
    cfg, tasks, model, gen, timer = tiny_setup(T=3, build=supsup.build_model,
                                               config_class=supsup.SupSupConfig, supsup_binarize=how)
    layers = [m for m in model.modules() if isinstance(m, supsup.SupermaskLinear)]
    weights = [layer.weight.clone() for layer in layers]
    for t in range(3):
        others = {(i, s): layer.scores[s].detach().clone() for i, layer in enumerate(layers)
                  for s in range(3) if s != t}
        mine = [layer.scores[t].detach().clone() for layer in layers]
        mm.train_task_mark(model, t, tasks[t], cfg, gen, timer)
        for (i, s), before in others.items():
            assert torch.equal(layers[i].scores[s], before), f"task {s}'s scores moved while {t} trained"
        assert any(not torch.equal(layer.scores[t], m) for layer, m in zip(layers, mine))
    for layer, w in zip(layers, weights):
        assert torch.equal(layer.weight, w)


def test_supermasks_stored_as_bits_reproduce_the_forward_pass_exactly():
    torch.manual_seed(0)
    layer = supsup.SupermaskLinear(37, 11, num_tasks=3)       # 407 weights: not a multiple of 8
    x = torch.randn(4, 37)
    for t in range(3):
        packed = layer.pack_mask(t)
        assert packed.dtype == torch.uint8 and packed.numel() == (37 * 11 + 7) // 8
        assert torch.equal(layer(x, t, mask=layer.unpack_mask(packed)), layer(x, t))


@pytest.mark.parametrize("how", ["topk", "sign"])
def test_supsup_end_to_end_run_learns_every_task_and_keeps_it(tmp_path, monkeypatch, how):
    results = run_tiny(tmp_path, monkeypatch, method="supsup", build=supsup.build_model,
                       config_class=supsup.SupSupConfig, supsup_binarize=how)
    run = results["runs"][0]
    R = np.array(run["acc_matrix"], dtype=float)
    assert run["tasks_done"] == 3 and np.diag(R).min() >= 0.6, R      # chance: 1/3
    assert run["bwt"] > -0.05, R      # earlier tasks' supermasks are never trained again


def test_storage_table_counts_masks_as_bits():
    cfg = supsup.SupSupConfig()
    rows = {T: {name: storage(cfg, (3, 32, 32), 5, T) for name, storage in supsup.STORAGE.items()}
            for T in (1, 2)}
    per_task = {m: rows[2][m][1] - rows[1][m][1] for m in rows[1]}
    assert per_task["MARK"] == 4 * (158_528 + 57_792 + 645)
    assert per_task["Baseline 4"] == 4 * (339_520 + 645)
    # SupSup: F_t in float32 plus one bit per weight of the shared M and C (no biases)
    assert per_task["MARK + SupSup, shared F"] == (128 * 64 + 128 * 128 + 128 * 256) // 8 + (128 * 5) // 8
    assert per_task["MARK + SupSup"] == 4 * 158_528 + (128 * 64 + 128 * 128 + 128 * 256) // 8 + (128 * 5) // 8


def test_topk_straight_through_raises_the_score_magnitude_of_a_weight_the_loss_wants_on():
    """The top-k mask depends on |score|, so the straight-through gradient must
    carry sign(score): a negative score that the loss wants in the mask must
    become more negative. (Passing the mask's gradient unchanged, our first
    version, pushed it towards 0 and MARK + SupSup stayed near chance.)"""
    layer = supsup.SupermaskLinear(2, 1, num_tasks=1, how="topk", density=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.scores[0].copy_(torch.tensor([[-0.5, 0.1]]))
    (-layer(torch.ones(1, 2), 0).sum()).backward()      # the loss wants every weight on
    grad = layer.scores[0].grad[0]
    assert grad[0] > 0 and grad[1] < 0                   # SGD: -0.5 goes down, 0.1 goes up
