"""The quick demo's wall time with its world, shards and run directory in an S3 bucket
against local disk.

    .venv/bin/python benchmarks/quick_demo_storage.py [--repeats 2] [--out runs/bench-storage]

The bucket is served by moto's S3 server on loopback (the server the tests use: a real
S3 HTTP API, spoken to by s3fs and botocore), so the figure is the cost of going
through fsspec and object semantics (whole-object uploads, listings, ETags), not of a
network. Runs alternate local, S3, local, S3, ... each a fresh `noisy-student demo
--quick` process. Prints one JSON object (seconds) with the reference step
(benchmarks/train_step_time.py) measured just before. Cost: about 4 quick demos.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from demo_seeds import measure_reference  # this folder is on sys.path when run as a script

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def _demo(out: str, env: dict) -> float:
    cmd = [sys.executable, "-m", "flows.cli", "demo", "--quick", "--out", out]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-storage")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-step measurement")
    args = parser.parse_args()
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request

    report: dict = {"repeats": args.repeats}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not args.no_reference:
        report["reference_step_s"] = measure_reference()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3_env = {
        **env,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    os.environ.update({k: v for k, v in s3_env.items() if k.startswith("AWS_")})
    fs = fsspec.filesystem("s3")
    local, remote = [], []
    try:
        for i in range(args.repeats):
            where = Path(args.out) / f"local-{i}"
            shutil.rmtree(where, ignore_errors=True)
            local.append(round(_demo(str(where), env), 1))
            bucket = f"bench-{os.getpid()}-{i}"
            fs.mkdir(bucket)
            remote.append(round(_demo(f"s3://{bucket}/demo", s3_env), 1))
            print(json.dumps({"run": i, "local_s": local[-1], "s3_s": remote[-1]}), file=sys.stderr, flush=True)
    finally:
        server.stop()
    report.update(local_s=local, s3_s=remote, s3_over_local=round(sum(remote) / sum(local), 3))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
