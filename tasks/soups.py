"""Model soups (Wortsman et al. 2022): weight averages of models fine-tuned from one init.

`uniform_soup` averages every ingredient. `greedy_soup` sorts the ingredients by their
held-out metric, best first, starts from the best and adds each next one only if the soup
with it scores at least as well on the held-out data (the paper's Algorithm 1: `>=`).

Floating-point tensors are averaged: weights, and BatchNorm's running mean and variance
too (averaged statistics, not recomputed ones: the ingredients share an init and stay
close, and recomputing would need a pass over training data per candidate). Integer
tensors (BatchNorm's `num_batches_tracked`) are copied from the first ingredient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

State = dict[str, torch.Tensor]


def check_compatible(states: Sequence[State]) -> None:
    """Every state dict has the first one's keys, shapes and dtypes (ValueError naming the first difference)."""
    if not states:
        raise ValueError("a soup needs at least one ingredient")
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        if s.keys() != first.keys():
            diff = sorted(set(s) ^ set(first))[:5]
            raise ValueError(f"ingredient {i} has other parameters than ingredient 0: {diff}")
        for k, v in s.items():
            if v.shape != first[k].shape or v.dtype != first[k].dtype:
                raise ValueError(
                    f"ingredient {i}: {k} is {tuple(v.shape)} {v.dtype}, ingredient 0 has "
                    f"{tuple(first[k].shape)} {first[k].dtype}"
                )


def uniform_soup(states: Sequence[State]) -> State:
    """The mean of the ingredients' floating-point tensors; integer tensors of the first."""
    check_compatible(states)
    out: State = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for s in states:
                acc += s[k].to(torch.float64)
            out[k] = (acc / len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def greedy_soup(
    states: Sequence[State], scores: Sequence[float], evaluate: Callable[[State], float]
) -> tuple[State, list[int], list[dict]]:
    """(soup, the chosen ingredients' indices, one record per candidate tried).

    `scores[i]`: ingredient i's held-out metric (higher is better); `evaluate(state)`:
    the held-out metric of a state dict."""
    if len(scores) != len(states):
        raise ValueError(f"{len(states)} ingredients but {len(scores)} scores")
    check_compatible(states)
    order = sorted(range(len(states)), key=lambda i: scores[i], reverse=True)
    chosen, best = [order[0]], float(scores[order[0]])
    history = [{"ingredient": order[0], "held_out": best, "kept": True}]
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in chosen + [i]])
        score = float(evaluate(candidate))
        kept = score >= best
        history.append({"ingredient": i, "held_out": score, "kept": kept})
        if kept:
            chosen.append(i)
            best = score
    return uniform_soup([states[j] for j in chosen]), chosen, history
