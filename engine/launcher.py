"""Starting training ranks with torch.distributed.elastic (docs/design.md, Distributed training). No Prefect here.

`launch(fn, args, processes, device, backend, log, on_step, nodes, rdzv_endpoint)` runs
`fn(*args, device=, log=, on_step=)` once per rank and returns the result of this
node's first rank.

- processes=1, nodes=1: `fn` runs in this process. No process group exists and every
  helper of engine/distributed.py is the identity: the training code is the same
  functions for 1 and N ranks.
- Otherwise this process is the node's elastic agent (`elastic_launch`, in a helper
  thread): `processes` ranks start here, rank r on `cuda:(i+r)` for device `cuda:i`
  (nccl) or on the CPU (gloo), and the nodes meet at a c10d rendezvous. Its store is
  a TCPStore this process serves (on 127.0.0.1 at a port the OS picks, or at
  `rdzv_endpoint` for several nodes), so it outlives the agent and carries the job to
  the other nodes and the ranks' failure reports back. On every other node,
  `serve_node` (the `noisy-student agent` command) runs an agent that joins the
  rendezvous, takes the function and its arguments from the store, and starts its own
  ranks; it serves one stage after another.
- This node's first rank sends its `log` lines and `on_step` calls back here over a
  queue; they run in the calling thread (so a Prefect logger works) and on_step runs
  synchronously (that rank waits for it). The other ranks do not log; their logs would
  repeat it, since what `fit` logs is averaged over ranks. If `log` or `on_step` raises,
  this node's ranks are stopped at once (training ends right after that step) and the
  exception propagates.
- A failure is reported through the launcher's machinery: elastic's agent notices a
  failed or dead rank, stops the others, and raises `ChildFailedError`. Each rank
  that raises also files its traceback in the store, numbered by the store's atomic
  counter, so the rank that failed first is named (its peers fail soon after, when the
  connection to it closes) even when it ran on another node: `WorkerError` names it, or
  its `RankError` (an error whose message says all, such as a diverged loss) is raised
  as it is. A rank killed by a signal (the out-of-memory killer) files nothing; when
  every filed failure is a lost connection, the ranks that filed none are named.

Ranks start from multiprocessing's fork server (elastic's `start_method`) with torch
and the training module imported once, so a later stage's ranks start in under half
a second (`benchmarks/launch_startup.py`), where torchrun's fresh interpreters
re-import torch, timm and the model code for each stage (about 10 s for 2 ranks here).
The fork server also keeps ranks clear of the calling process's threads (Prefect's
event loop) and CUDA state. The rank function takes the pydantic config as it is and
hands its result back as an object. There are no elastic restarts (`max_restarts=0`):
a failed stage is rerun as a task and `fit` resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from data import storage
from engine.distributed import TIMEOUT, RankError, WorkerError, resolve_backend

HOST = "127.0.0.1"
START_METHOD = "forkserver"
RUN_ID = "noisy-student"  # one rendezvous per store; the store is new for every stage
JOIN_TIMEOUT_S = 600  # how long a stage waits for the other nodes to join
STOP_TIMEOUT_S = 60  # how long a stopped launch waits for elastic's agent (it SIGKILLs after 30 s)
_JOB = "noisy-student/job"
_FAILURES = "noisy-student/failures"
_POLL_S = 0.1


def _noop_log(msg: str) -> None:
    pass


class _RunsInAThread(logging.Filter):
    """Drops elastic's warning that an agent in a helper thread installs no signal
    handlers: `launch` stops its ranks itself when the calling thread is interrupted."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running on a child thread" not in record.getMessage()


logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_RunsInAThread())


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """("host", port) of "HOST:PORT"; a ValueError naming the value otherwise."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"rdzv_endpoint must be HOST:PORT, got {endpoint!r}")
    return host.strip("[]"), int(port)


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + local_rank)
    return device


def _launch_config(
    nodes: int, processes: int, endpoint: str, log_dir: str, local_addr: str | None, read_timeout_s: int = 60
) -> LaunchConfig:
    """read_timeout_s: how long an agent tries to reach the store (and waits on one read of it)."""
    return LaunchConfig(
        min_nodes=nodes,
        max_nodes=nodes,
        nproc_per_node=processes,
        run_id=RUN_ID,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        # The store is served by the launching process, never by an agent.
        rdzv_configs={"is_host": False, "join_timeout": JOIN_TIMEOUT_S, "read_timeout": read_timeout_s},
        max_restarts=0,
        monitor_interval=_POLL_S,
        start_method=START_METHOD,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        local_addr=local_addr,
    )


# --------------------------------------------------------------------------- inside a rank


class _Channel:
    """The queues over which this node's first rank reaches the launcher (picklable at spawn)."""

    def __init__(self, ctx, want_steps: bool):
        self.events, self.replies, self.want_steps = ctx.Queue(), ctx.Queue(), want_steps
        # A put starts a feeder thread, and multiprocessing joins feeder threads when the
        # process exits. A rank stopped in the middle of a put leaves the queue's shared
        # write lock taken, so a feeder of the launching process would wait on it for ever
        # and hold the process at exit, long after the launch ended. What the launcher puts
        # ("done", the step replies) matters only while the launch runs: its feeders are
        # not joined. Ranks unpickle their own copies, which keep the default.
        self.events.cancel_join_thread()
        self.replies.cancel_join_thread()

    def hooks(self):
        def log(msg: str) -> None:
            self.events.put(("log", msg))

        def on_step(step: int, logs: dict[str, float]) -> None:
            self.events.put(("step", step, logs))
            self.replies.get(timeout=TIMEOUT.total_seconds())  # the hook ran in the launcher

        return log, (on_step if self.want_steps else None)


def _file_failure(store: dist.Store, exc: BaseException) -> None:
    """File this rank's failure in the store, numbered in the order the ranks failed."""
    report = {"rank": int(os.environ.get("RANK", -1)), "trace": traceback.format_exc()}
    if isinstance(exc, RankError):
        try:
            report["error"] = pickle.dumps(exc)
        except Exception:  # noqa: S110 - the traceback is reported instead
            pass
    try:
        order = store.add(_FAILURES, 1)
        store.set(f"{_FAILURES}/{order}", pickle.dumps(report))
    except Exception:  # noqa: S110 - the store is gone (the launcher ended); elastic still reports the rank
        pass


def _rank_body(fn, args, device, backend, threads, store, channel) -> Any:
    local = int(os.environ["LOCAL_RANK"])
    device = _rank_device(torch.device(device), local)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(threads)
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if backend == "nccl" else None)
        reporting = channel is not None and local == 0
        log, on_step = channel.hooks() if reporting else (_noop_log, None)
        result = fn(*args, device=device, log=log, on_step=on_step)
        return result if reporting else None
    except Exception as exc:
        _file_failure(store, exc)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _local_rank(fn, args, device, backend, threads, host, port, channel, env) -> Any:
    """A rank on the launching node. `env`: the launcher's storage settings (the fork
    server's environment may predate them)."""
    os.environ.update(env)
    channel.events.put(("started", os.getpid()))
    store = dist.TCPStore(host, port, is_master=False, timeout=TIMEOUT)
    return _rank_body(fn, args, device, backend, threads, store, channel)


def _joined_rank(host, port, threads) -> None:
    """A rank on another node: the job comes from the launcher's store."""
    store = dist.TCPStore(host, port, is_master=False, timeout=TIMEOUT)
    fn, args, device, backend = pickle.loads(store.get(_JOB))
    _rank_body(fn, args, device, backend, threads, store, None)


# --------------------------------------------------------------------------- launching


def _filed_failures(store: dist.Store) -> list[dict]:
    """The failures the ranks filed, in the order they failed."""
    try:
        count = store.add(_FAILURES, 0)
        keys = [f"{_FAILURES}/{i}" for i in range(1, count + 1)]
        return [pickle.loads(store.get(k)) for k in keys if store.check([k])]
    except Exception:
        return []


# How a collective fails on a rank whose peer has gone (gloo, then NCCL).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def _last_line(trace: str) -> str:
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def _worker_error(store: dist.Store, err: ChildFailedError, world: int) -> Exception:
    """The exception that reports a failed launch: the first failure a rank filed that
    is not a peer's closed connection. A rank killed by a signal (the out-of-memory
    killer's SIGKILL) files nothing while its peers fail on the connection to it: if
    every filed failure is such, the ranks that filed nothing are named. Without any
    filed failure, elastic's first failure."""
    filed = _filed_failures(store)
    first = next((f for f in filed if not any(s in f["trace"] for s in _PEER_GONE)), None)
    silent = sorted(set(range(world)) - {f["rank"] for f in filed})
    if first is None and filed and silent:
        ranks = ", ".join(map(str, silent))
        return WorkerError(
            silent[0],
            f"process died without an error (rank(s) {ranks} filed none, and the others lost their connection "
            "to it): killed by a signal, such as the out-of-memory killer's SIGKILL",
        )
    first = first or (filed[0] if filed else None)
    if first is not None:
        if "error" in first:
            try:
                return pickle.loads(first["error"])
            except Exception:  # noqa: S110 - it does not unpickle here: report the traceback
                pass
        return WorkerError(first["rank"], _last_line(first["trace"]), first["trace"].strip())
    rank, failure = err.get_first_failure()
    if failure.exitcode < 0:
        return WorkerError(rank, f"process died (signal {failure.signal_name()})")
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return WorkerError(rank, f"process exited with code {failure.exitcode}" + (f": {message}" if message else ""))


def _stop_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def launch(
    fn: Callable[..., Any],
    args: tuple,
    processes: int,
    device: str | torch.device,
    backend: str = "auto",
    log: Callable[[str], None] = print,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    nodes: int = 1,
    rdzv_endpoint: str = "",
) -> Any:
    """Run `fn(*args, device=, log=, on_step=)` on `processes` ranks of each of `nodes`
    nodes; return the result of this node's first rank (rank 0 on one node).

    fn must be a module-level function and args picklable unless one process runs.
    Raises WorkerError (naming the rank) if a rank fails (its RankError itself if it
    raised one), or whatever `log`/`on_step` raised.
    """
    device = torch.device(device)
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if processes == 1 and nodes == 1:
        return fn(*args, device=device, log=log, on_step=on_step)
    if nodes > 1 and not rdzv_endpoint:
        raise ValueError(f"nodes={nodes} needs rdzv_endpoint (HOST:PORT of this node, reachable from the others)")
    backend = resolve_backend(backend, device)
    if device.type == "cuda":
        need = (device.index or 0) + processes
        if torch.cuda.device_count() < need:
            raise ValueError(
                f"processes={processes} on device={str(device)!r} needs {need} GPUs, "
                f"this machine has {torch.cuda.device_count()}"
            )
    host, port = parse_endpoint(rdzv_endpoint) if rdzv_endpoint else (HOST, 0)
    served = _Served(host, port)
    try:
        return _serve_launch(served, fn, args, processes, device, backend, log, on_step, nodes)
    finally:
        served.close()


class _Served:
    """The rendezvous store this process serves for one launch. A TCPStore has no close:
    its server stops with the object. So the store is reached only through this holder,
    never bound to a local variable, and `close` drops the one reference; a traceback
    that keeps the launcher's frames alive does not keep the port taken."""

    def __init__(self, host: str, port: int):
        try:
            self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        except Exception as exc:
            raise ValueError(f"cannot serve the rendezvous at {host}:{port} ({exc})") from exc
        self.host, self.port = host, self.store.port

    def close(self) -> None:
        self.store = None


def _serve_launch(served: _Served, fn, args, processes, device, backend, log, on_step, nodes) -> Any:
    host = served.host
    endpoint = f"{host}:{served.port}"
    if nodes > 1:
        served.store.set(_JOB, pickle.dumps((fn, args, str(device), backend)))
    ctx = multiprocessing.get_context(START_METHOD)
    # Effective only if this process has not started its fork server yet.
    ctx.set_forkserver_preload(["torch", fn.__module__])
    channel = _Channel(ctx, on_step is not None)
    threads = max(1, torch.get_num_threads() // processes)
    devices = "cpu" if device.type == "cpu" else f"{_rank_device(device, 0)}..{_rank_device(device, processes - 1)}"
    where = f"{nodes} nodes x {processes}" if nodes > 1 else f"{processes}"
    log(f"training on {where} processes ({backend}, {devices})" + (f", rendezvous at {endpoint}" if nodes > 1 else ""))
    log_dir = tempfile.mkdtemp(prefix="noisy-student-ranks-")
    config = _launch_config(nodes, processes, endpoint, log_dir, host)
    outcome: dict[str, Any] = {}

    def agent() -> None:
        try:
            outcome["values"] = elastic_launch(config, _local_rank)(
                fn, args, str(device), backend, threads, host, served.port, channel, storage.settings()
            )
        except BaseException as exc:  # handed to the calling thread
            outcome["error"] = exc
        finally:
            channel.events.put(("done",))

    thread = threading.Thread(target=agent, name="noisy-student-agent", daemon=True)
    pids: list[int] = []
    try:
        thread.start()
        while True:
            try:
                msg = channel.events.get(timeout=_POLL_S)
            except queue.Empty:
                if thread.is_alive():
                    continue
                break  # the agent ended; its "done" was lost with a queue a rank left broken
            match msg:
                case ("done",):
                    break
                case ("started", pid):
                    pids.append(pid)
                case ("log", text):
                    log(text)
                case ("step", step, logs):
                    on_step(step, logs)
                    channel.replies.put("go")
    except BaseException:
        _stop_pids(pids)  # elastic's agent sees its ranks end and returns
        thread.join(STOP_TIMEOUT_S)  # a daemon thread: an agent that hangs is left behind, not waited for
        raise
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    if not outcome:
        raise RuntimeError(f"the training agent ended without a result or an error (rendezvous {endpoint})")
    if "error" not in outcome:
        values = outcome["values"]
        return values[min(values)]
    err = outcome["error"]
    if isinstance(err, ChildFailedError):
        raise _worker_error(served.store, err, nodes * processes) from None
    if isinstance(err, RendezvousError):
        raise RuntimeError(
            f"the rendezvous at {endpoint} failed ({type(err).__name__}: {err}); with nodes={nodes}, "
            f"start `noisy-student agent --rdzv-endpoint {endpoint} --nodes {nodes} --processes {processes}` "
            "on every other node"
        ) from err
    raise err


def serve_node(
    rdzv_endpoint: str,
    nodes: int,
    processes: int,
    local_addr: str | None = None,
    stages: int | None = None,
    idle_s: float = 3600.0,
    log: Callable[[str], None] = print,
) -> int:
    """The agent of a node that is not the launching one: join each stage's rendezvous
    at `rdzv_endpoint` and run `processes` ranks of it, until `stages` stages have ended
    (None: no limit) or none has come for `idle_s` seconds. Returns the stages that failed.
    """
    host, port = parse_endpoint(rdzv_endpoint)
    if nodes < 2:
        raise ValueError(f"an agent serves stages of nodes >= 2 (this node and the launching one), got nodes={nodes}")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    threads = max(1, torch.get_num_threads() // processes)
    # The stages' rank functions live in the training module: imported once, by the fork server.
    multiprocessing.get_context(START_METHOD).set_forkserver_preload(["torch", "engine.training"])
    reach_s = int(max(1, min(60, idle_s)))
    ended = failed = 0
    waiting_since = time.monotonic()
    log(f"agent: {processes} processes, waiting for stages at {rdzv_endpoint}")
    while stages is None or ended < stages:
        log_dir = tempfile.mkdtemp(prefix="noisy-student-agent-")
        try:
            config = _launch_config(nodes, processes, rdzv_endpoint, log_dir, local_addr, reach_s)
            elastic_launch(config, _joined_rank)(host, port, threads)
            ended += 1
            log(f"agent: stage {ended} finished")
        except ChildFailedError as err:
            ended += 1
            failed += 1
            rank, failure = err.get_first_failure()
            log(f"agent: stage {ended} failed on rank {rank}: {failure.message}")
        except (RendezvousError, RendezvousClosedError) as err:
            # No launcher serves the store yet, or this stage's rendezvous has closed.
            if time.monotonic() - waiting_since > idle_s:
                log(f"agent: no stage came for {idle_s:.0f} s ({type(err).__name__}); stopping")
                break
            time.sleep(1.0)
            continue
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)
        waiting_since = time.monotonic()
    return failed
