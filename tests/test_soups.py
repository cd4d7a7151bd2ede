"""Model soups: uniform averages, greedy selection by held-out metric, clear mismatch errors."""

import pytest
import torch
from torch import nn

from engine.soups import greedy_soup, uniform_soup


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net[1].running_mean.normal_()
    net[1].num_batches_tracked.fill_(10 + seed)
    return net


def test_uniform_soup_averages_floats_and_copies_integers():
    states = [bn_net(s).state_dict() for s in range(3)]
    soup = uniform_soup(states)
    for k in ("0.weight", "0.bias", "1.running_mean", "1.running_var", "1.weight"):
        assert torch.allclose(soup[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-7), k
    assert soup["1.num_batches_tracked"].item() == 10  # the first ingredient's
    assert soup["1.num_batches_tracked"].dtype == torch.int64
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).load_state_dict(soup)  # loads as a model


def test_a_soup_of_one_is_the_ingredient():
    state = bn_net(0).state_dict()
    assert all(torch.equal(v, state[k]) for k, v in uniform_soup([state]).items())


def test_greedy_soup_adds_only_what_does_not_hurt_the_held_out_metric():
    # Ingredients are scalars; the held-out metric is -(w - 1)^2: the soup wants a mean near 1.
    ws = [1.3, 5.0, 0.8, 1.1]
    states = [{"w": torch.tensor([w])} for w in ws]

    def held_out(state):
        return -float((state["w"] - 1.0) ** 2)

    scores = [held_out(s) for s in states]
    soup, chosen, history = greedy_soup(states, scores, held_out)
    # best first (1.1), then 0.8 (mean 0.95: better, kept), 1.3 (mean 1.067: worse), 5.0 (worse)
    assert chosen == [3, 2]
    assert [h["ingredient"] for h in history] == [3, 2, 0, 1]
    assert [h["kept"] for h in history] == [True, True, False, False]
    assert soup["w"].item() == pytest.approx(0.95)
    assert held_out(soup) >= max(scores)  # never worse than the best ingredient on held-out data


def test_mismatched_ingredients_are_named():
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"ingredient 1: w is \(3,\)"):
        uniform_soup([a, {"w": torch.zeros(3), "b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="other parameters"):
        uniform_soup([a, {"w": torch.zeros(2)}])
    with pytest.raises(ValueError, match="2 ingredients but 1 scores"):
        greedy_soup([a, a], [1.0], lambda s: 0.0)
