"""Advantage estimators against hand computations."""

import math

import pytest
import torch

from drpo.advantages import group_advantages


def test_mean_centering_by_hand():
    # group 1: [1, 0, 0, 1] mean 0.5; group 2: [1, 1, 1, 0] mean 0.75
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    expected = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
    assert group_advantages(r, 4, "mean").tolist() == pytest.approx(expected)


def test_grpo_divides_by_unbiased_std_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # mean 0.25; unbiased var = (0.75^2 + 3*0.25^2) / 3 = 0.25 -> std 0.5
    adv = group_advantages(r, 4, "grpo", eps=0.0)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])


def test_rloo_is_reward_minus_mean_of_others():
    r = torch.tensor([3.0, 1.0, 2.0])
    # 3 - (1+2)/2 = 1.5 ; 1 - (3+2)/2 = -1.5 ; 2 - (3+1)/2 = 0
    assert group_advantages(r, 3, "rloo").tolist() == pytest.approx([1.5, -1.5, 0.0])


def test_constant_groups_get_zero_advantage_for_every_estimator():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    for est in ("mean", "grpo", "rloo"):
        assert group_advantages(r, 2, est).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_grpo_eps_bounds_tiny_std():
    r = torch.tensor([0.0, 1e-7])
    adv = group_advantages(r, 2, "grpo", eps=1e-6)
    std = math.sqrt(2 * (0.5e-7) ** 2)  # unbiased, n-1 = 1
    assert adv[1].item() == pytest.approx(0.5e-7 / (std + 1e-6), rel=1e-4)


@pytest.mark.parametrize(
    "rewards, g, est, match",
    [
        (torch.ones(6), 4, "mean", "cannot be split into groups of 4"),
        (torch.ones(4), 2, "median", "unknown advantage estimator 'median'"),
        (torch.ones(2, 2), 2, "mean", "1-D tensor"),
        (torch.tensor([1.0, float("nan")]), 2, "mean", "non-finite"),
        (torch.ones(3), 1, "rloo", "needs group_size >= 2"),
        (torch.ones(0), 2, "mean", "cannot be split"),
        (torch.ones(4), 0, "mean", "positive int"),
    ],
)
def test_bad_input(rewards, g, est, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, g, est)
