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
from pathlib import Path

import torch

from configs import ModelConfig, RunConfig
from data import storage
from engine.loop import device_settings
from engine.rundir import atomic_write_json
from engine.training import MODEL_FILE, load_model, save_model

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


# ----------------------------------------------------------------------------- the stage's work

UNIFORM, GREEDY, REPORT = "uniform", "greedy", "soup.json"


def make_soups(
    cfg: RunConfig,
    ingredients: list[dict],
    stage_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict:
    """Score each ingredient on the held-out split (`soup.split`), build the uniform and
    greedy soups, save them as `<stage>/uniform/model.pt` and `<stage>/greedy/model.pt`,
    evaluate both on val, write `<stage>/soup.json`, and return its content.

    `ingredients`: [{"name", "overrides", "checkpoint", "val": the ingredient's val
    metrics}] (models of one family and architecture)."""
    device_settings(cfg.device, cfg.cudnn_benchmark, cfg.host_allocator)
    family, model = load_model(ingredients[0]["checkpoint"], cfg.device)
    metric = family.metric
    saved = [storage.torch_load(i["checkpoint"], map_location="cpu", weights_only=True) for i in ingredients]
    for ing, ckpt in zip(ingredients, saved):
        if ckpt["model_cfg"] != saved[0]["model_cfg"]:
            raise ValueError(f"soup ingredient {ing['name']} has another architecture than {ingredients[0]['name']}")
    states = [ckpt["state"] for ckpt in saved]
    model_cfg = ModelConfig.model_validate(saved[0]["model_cfg"])

    def scores(state: State, split: str) -> dict[str, float]:
        model.load_state_dict(state)
        return family.evaluate(model, cfg.data, cfg.eval_batch_size, cfg.data.num_workers, split=split)

    held_out = []
    for ing, state in zip(ingredients, states):
        held_out.append(scores(state, cfg.soup.split)[metric])
        log(f"soup: ingredient {ing['name']} scores {held_out[-1]:.2f} {metric} on {cfg.soup.split}")
    uniform = uniform_soup(states)
    greedy, chosen, history = greedy_soup(states, held_out, lambda s: scores(s, cfg.soup.split)[metric])
    log(f"soup: greedy soup of {[ingredients[i]['name'] for i in chosen]}")
    stage = storage.path(stage_dir)
    rows = [
        {"name": ing["name"], "overrides": list(ing["overrides"]), "held_out": h, "val": ing["val"][metric]}
        for ing, h in zip(ingredients, held_out)
    ]
    soups = {}
    for name, state, members in ((UNIFORM, uniform, list(range(len(states)))), (GREEDY, greedy, chosen)):
        val = scores(state, "val")  # leaves the soup's weights in the model
        save_model(
            storage.join(stage / name, MODEL_FILE),
            family.name,
            model_cfg,
            model,
            family.class_names(cfg.data),
            cfg.data.image_size,
        )
        soups[name] = {
            "ingredients": [ingredients[i]["name"] for i in members],
            "held_out": scores(state, cfg.soup.split)[metric] if name == UNIFORM else history_best(history),
            "val": val[metric],
            "val_metrics": val,
            "checkpoint": f"{name}/{MODEL_FILE}",  # relative to the soup's stage folder
        }
        log(f"soup: {name} soup {val[metric]:.2f} {metric} on val")
    report = {
        "metric": metric,
        "split": cfg.soup.split,
        "batchnorm": "averaged",
        "ingredients": rows,
        "greedy_history": [{**h, "ingredient": ingredients[h["ingredient"]]["name"]} for h in history],
        "soups": soups,
    }
    atomic_write_json(stage / REPORT, report)
    return report


def history_best(history: list[dict]) -> float:
    """The held-out metric of the greedy soup: that of its last kept candidate."""
    return max(h["held_out"] for h in history if h["kept"])
