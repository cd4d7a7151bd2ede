"""A run directory ready for the pseudo-label stage: the quick-demo world and a teacher.

The teacher is an untrained tiny detector whose class prior is raised from the usual
0.01 to about 0.12, so it leaves boxes on every image (an untrained prior scores under
the 0.05 floor of postprocessing, and a sidecar shard with no labels would make the
comparisons in these tests vacuous). Training a real teacher costs a minute or more on
this machine, and what is tested here is how shards are spread and resumed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs import RunConfig
from data.world import WorldSpec, write_world
from engine.families import get_family
from engine.rundir import RunDir, file_digest, write_manifest
from engine.training import MODEL_FILE, save_model
from flows import stages
from flows.demo import demo_config

CLASS_PRIOR_LOGIT = -2.0


def write_teacher(cfg: RunConfig, seed: int = 0) -> Path:
    """Save the teacher under <out_dir>/round-0/teacher with its manifest; returns model.pt."""
    family = get_family(cfg.family)
    torch.manual_seed(seed)
    model = family.build_model(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cls_logits.bias"):
                p.fill_(CLASS_PRIOR_LOGIT)
    stage = RunDir(cfg.out_dir).stage(0, "teacher")
    path = save_model(stage / MODEL_FILE, cfg.family, cfg.model, model)
    outputs = {
        "files": [MODEL_FILE],
        "checkpoint": str(path),
        "digest": file_digest(path),
        "metrics": {},
        "metric": family.metric,
    }
    write_manifest(stage, stages.teacher_inputs(cfg), outputs)
    return path


def labeling_config(
    root: Path, overrides: list[str] = (), n_unlabeled: int | None = None, per_shard: int | None = None
) -> RunConfig:
    """The quick-demo config under `root` (world written once), its teacher written.

    With `n_unlabeled`/`per_shard`, the unlabeled pool is a separate one of that size.
    """
    overrides = list(overrides)
    if n_unlabeled is not None:
        pool = write_world(
            root / "pool", WorldSpec(), seed=1, n_train=0, n_val=0, n_unlabeled=n_unlabeled, per_shard=per_shard or 16
        )
        overrides.append(f"data.unlabeled_shards={pool.unlabeled_pattern}")
    cfg, _ = demo_config(root, seed=0, quick=True, overrides=overrides)
    write_teacher(cfg)
    return cfg


def with_out_dir(cfg: RunConfig, out_dir: Path, **pseudo) -> RunConfig:
    """`cfg` writing to `out_dir` (its own teacher copy) with `pseudo` fields changed."""
    cfg = cfg.model_copy(update={"out_dir": str(out_dir), "pseudo": cfg.pseudo.model_copy(update=pseudo)})
    write_teacher(cfg)
    return cfg
