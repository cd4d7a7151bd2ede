"""Orchestration overhead of pseudo-labeling: many shards, a no-op model, Dask vs threads.

    python benchmarks/dask_noop_labeling.py [--shards 1000] [--workers 2] [--shards-per-task N] \
        [--runners bare thread dask]

Writes `--shards` tiny image shards (one 32x32 JPEG each) and a no-op teacher to a
temporary folder, starts a Prefect server there, then, each in a fresh process so
that each peak RSS is its own:

- bare:   `engine.labeling.label_shard` over every shard in a plain loop (no Prefect):
          the shard work itself (read, decode, write the sidecar tar and json);
- thread: `pseudo_label_flow` with the bounded thread pool (`--workers` threads);
- dask:   a LocalCluster of `--workers` single-threaded worker processes (built from
          `tasks.runners.local_cluster_kwargs`, timed as cluster start, then the task
          modules imported on the workers), then `pseudo_label_flow` given its
          scheduler address (`pseudo.dask_address`).

The flow labels the shards in tasks of `pseudo.shards_per_task` shards (by default its
own chunking: at least 100 tasks, 16 per worker). Prints one JSON object: per runner the
flow's wall time, the tasks, the Prefect overhead per shard and per task ((flow - bare)
over shards or tasks, in wall seconds), the time in the runner's `submit` calls, the
flow process's RSS at 10% of the run, at its end and at its peak (sampled every 0.5 s;
the Dask workers apart), and the same for the Prefect server's process tree.

The no-op model is a real family: `NoopFamily` below, registered under "noop" in
`engine.families.FAMILIES` in the benchmark's processes, and in each Dask worker by
Dask's preload of this file (`dask_setup`). Its teacher leaves every image empty.

Measured 2026-12-02 on a 2-core CPU, 10,000 shards, 2 workers, 100 tasks of 100 shards
(benchmarks/results/noop-labeling-10000.json): bare 21.3 s (2.1 ms a shard); threads
29.4 s (0.8 ms of overhead a shard, 81 ms a task); Dask 39.9 s (1.9 ms a shard, 11.7 s
of it in the 100 submits), LocalCluster start 6.4 s. RSS from 10% of the run to its end:
flow +1.4% (threads) and +3.0% (Dask), server +5.8% and +1.1%. Cost: about 4 minutes.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from configs import DataConfig, ModelConfig, PseudoLabelConfig, RunConfig, build_config, dump_config  # noqa: E402
from data.coco import CocoLayout  # noqa: E402
from engine.families import FAMILIES  # noqa: E402

# ----------------------------------------------------------------------------- the no-op family


class NoopFamily:
    """A family whose teacher labels nothing: only the labeling part of the contract."""

    name = "noop"
    metric = "none"
    sidecar_ext = "json"
    label_unit = "labels"
    data_formats = {"coco": CocoLayout()}

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return nn.Identity()

    def class_names(self, data: DataConfig) -> list[str]:
        return ["object"]

    def num_classes(self, data: DataConfig) -> int:
        return 1

    def label_images(
        self, model: nn.Module, images: list[torch.Tensor], image_size: int, rule: PseudoLabelConfig
    ) -> list[dict | None]:
        return [None] * len(images)

    def label_stats(self, label: dict, num_classes: int) -> dict:
        return {"labels": 0, "class_counts": [0] * num_classes}

    def encode(self, label: dict) -> bytes:
        return json.dumps(label).encode()

    def decode(self, data: bytes) -> dict:
        return json.loads(data)


def register_noop_family() -> None:
    if not isinstance(FAMILIES.get("noop"), NoopFamily):
        FAMILIES["noop"] = NoopFamily()


def dask_setup(worker) -> None:
    """Dask calls this in each worker that preloads this file."""
    register_noop_family()


# ----------------------------------------------------------------------------- the world


def write_world(root: Path, num_shards: int) -> str:
    """`num_shards` shards of one 32x32 JPEG each; returns their brace pattern."""
    from PIL import Image

    from data.shards import brace_pattern, shard_name, write_shard

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 140, 200)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    pool = root / "pool"
    for i in range(num_shards):
        write_shard(pool / shard_name("pool", i), [(f"img{i:06d}", {"jpg": jpeg})])
    return str(pool / brace_pattern("pool", num_shards))


def write_config(root: Path, pattern: str, workers: int, shards_per_task: int | None = None) -> RunConfig:
    from engine.rundir import RunDir, file_digest, write_manifest
    from engine.training import MODEL_FILE, save_model
    from flows.stages import teacher_inputs

    # The no-op family reads no labeled data; the COCO fields only satisfy the schema.
    data = {
        "format": "coco",
        "unlabeled_shards": pattern,
        "image_size": 128,
        **{k: str(root) for k in ("train_images", "train_annotations", "val_images", "val_annotations")},
    }
    cfg = build_config(
        {
            "family": "noop",
            "out_dir": str(root / "run"),
            "data": data,
            "pseudo": {"max_workers": workers, "batch_size": 1, "shards_per_task": shards_per_task},
        }
    )
    stage = RunDir(cfg.out_dir).stage(0, "teacher")
    path = save_model(stage / MODEL_FILE, "noop", cfg.model, nn.Identity())
    write_manifest(
        stage,
        teacher_inputs(cfg),
        {"files": [MODEL_FILE], "checkpoint": str(path), "digest": file_digest(path), "metrics": {}, "metric": "none"},
    )
    (root / "config.yaml").write_text(dump_config(cfg))
    return cfg


# ----------------------------------------------------------------------------- one runner per process


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mib(pids: list[int]) -> float:
    """Summed resident memory of `pids` now (MiB); processes gone count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * resource.getpagesize()
        except OSError:
            pass
    return round(total / 2**20, 1)


def tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class RssSampler:
    """RSS of a process tree every `every` seconds, in a thread: is memory flat over a run?"""

    def __init__(self, pid: int, every: float = 0.5, children: bool = True):
        import threading

        self.pid, self.every, self.samples, self.children = pid, every, [], children
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(self.now())

    def now(self) -> float:
        return rss_mib(tree(self.pid) if self.children else [self.pid])

    def __enter__(self) -> RssSampler:
        self.samples.append(self.now())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.now())

    def summary(self) -> dict:
        """RSS at a tenth of the run (after start-up), at its end, and the peak (MiB)."""
        s = self.samples
        early = s[max(1, len(s) // 10)] if len(s) > 2 else s[0]
        return {"at_10pct_mib": early, "end_mib": s[-1], "peak_mib": max(s), "end_over_10pct": round(s[-1] / early, 3)}


def _timed_flow(cfg: RunConfig, runner_cls: type) -> dict:
    """Run the flow; time its runner's `submit` calls apart from the rest."""
    from flows import stages

    submit_s = 0.0
    submit = runner_cls.submit

    def timed_submit(self, *args, **kwargs):
        nonlocal submit_s
        t = time.perf_counter()
        try:
            return submit(self, *args, **kwargs)
        finally:
            submit_s += time.perf_counter() - t

    runner_cls.submit = timed_submit
    try:
        with RssSampler(os.getpid(), children=False) as rss:  # Dask workers apart
            t0 = time.perf_counter()
            out = stages.pseudo_label_flow(cfg, 0)
            flow_s = time.perf_counter() - t0
    finally:
        runner_cls.submit = submit
    tasks = -(-len(out["pairs"]) // cfg.pseudo.chunk_size(len(out["pairs"])))
    return {
        "flow_s": round(flow_s, 2),
        "submit_s": round(submit_s, 2),
        "images": out["stats"]["images"],
        "tasks": tasks,
        "shards_per_task": cfg.pseudo.chunk_size(len(out["pairs"])),
        "flow_rss": rss.summary(),
    }


def _import(name: str) -> None:
    importlib.import_module(name)


def child(mode: str, root: Path, workers: int) -> dict:
    register_noop_family()
    from configs import load_config

    cfg = load_config(root / "config.yaml")
    shards = sorted((root / "pool").glob("pool-*.tar"))
    if mode == "bare":
        from engine import labeling, training

        family, model = training.shared_model(Path(cfg.out_dir) / "round-0/teacher/model.pt", cfg.device)
        out = root / "bare"
        t0 = time.perf_counter()
        for i, shard in enumerate(shards):
            labeling.label_shard(
                family,
                model,
                str(shard),
                *labeling.sidecar_paths(out, i),
                cfg.data.image_size,
                cfg.pseudo,
                1,
                key=f"bare-{i}",
            )
        return {"bare_s": round(time.perf_counter() - t0, 2), "peak_rss_mib": peak_rss_mib()}

    cfg = cfg.model_copy(update={"out_dir": str(root / f"run-{mode}")})
    shutil.copytree(root / "run", cfg.out_dir)  # the teacher and its manifest
    if mode == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        rule = cfg.pseudo.model_copy(update={"runner": "thread"})
        res = _timed_flow(cfg.model_copy(update={"pseudo": rule}), ThreadPoolTaskRunner)
        return {**res, "peak_rss_mib": peak_rss_mib()}

    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from tasks.runners import local_cluster_kwargs

    t0 = time.perf_counter()
    rule = cfg.pseudo.model_copy(update={"runner": "dask"})
    with LocalCluster(**local_cluster_kwargs(rule, cfg.device), preload=[str(Path(__file__).resolve())]) as cluster:
        started_s = time.perf_counter() - t0
        with Client(cluster) as client:
            client.run(_import, "tasks.units")  # what each worker imports for its first task
            warm_s = time.perf_counter() - t0
            rule = rule.model_copy(update={"dask_address": cluster.scheduler_address})
            res = _timed_flow(cfg.model_copy(update={"pseudo": rule}), DaskTaskRunner)
            workers_rss = client.run(peak_rss_mib)
    return {
        **res,
        "cluster_start_s": round(started_s, 2),
        "cluster_start_and_imports_s": round(warm_s, 2),
        "peak_rss_mib": peak_rss_mib(),
        "worker_peak_rss_mib": sorted(workers_rss.values()),
    }


# ----------------------------------------------------------------------------- the parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the Prefect server did not start") from None
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="threads / Dask worker processes")
    parser.add_argument(
        "--shards-per-task", type=int, default=None, help="pseudo.shards_per_task (default: the flow's own chunking)"
    )
    parser.add_argument("--runners", nargs="+", default=["bare", "thread", "dask"], choices=["bare", "thread", "dask"])
    parser.add_argument("--child", choices=["bare", "thread", "dask"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.workers)))
        return 0

    with tempfile.TemporaryDirectory(prefix="dask-noop-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_config(root, write_world(root, args.shards), args.workers, args.shards_per_task)
        world_s = time.perf_counter() - t0
        server, url = start_prefect_server(root / "prefect-home")
        env = {
            **os.environ,
            "PREFECT_API_URL": url,
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        results = {}
        try:
            for mode in args.runners:
                cmd = [sys.executable, __file__, "--child", mode, "--root", str(root), "--workers", str(args.workers)]
                with RssSampler(server.pid) as server_rss:
                    done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
                results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                if mode != "bare":
                    results[mode]["server_rss"] = server_rss.summary()
                print(json.dumps({mode: results[mode]}), file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(30)
    n = args.shards
    bare_s = results.get("bare", {}).get("bare_s")
    for mode in ("thread", "dask"):
        if mode in results and bare_s is not None:
            r = results[mode]
            r["overhead_per_shard_s"] = round((r["flow_s"] - bare_s) / n, 4)
            r["overhead_per_task_s"] = round((r["flow_s"] - bare_s) / r["tasks"], 4)
            r["wall_per_shard_s"] = round(r["flow_s"] / n, 4)
    print(
        json.dumps(
            {
                "benchmark": "dask_noop_labeling",
                "shards": n,
                "images_per_shard": 1,
                "workers": args.workers,
                "bare_s": bare_s,
                "bare_per_shard_s": round(bare_s / n, 4) if bare_s is not None else None,
                "runners": {m: r for m, r in results.items() if m != "bare"},
                "bare_peak_rss_mib": results.get("bare", {}).get("peak_rss_mib"),
                "world_write_s": round(world_s, 1),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
