"""Ctrl-C and SIGTERM for the commands that run flows (demo, run, stage). No Prefect here.

A terminal's Ctrl-C reaches every process of the foreground process group at once: the
temporary Prefect server, the fork server and training ranks, data loader workers,
Dask and pool workers. Each would stop its own way, the server first, and the run then
spends minutes retrying calls to the dead server. So the `noisy-student` command runs
the command in a child process, *the run*, in a process group of its own, and waits:

- On SIGINT, SIGTERM or SIGHUP it sends one SIGINT to the run's main process only. The
  run silences its output, kills its data loader workers and training ranks (so none
  prints a traceback) and stops as a script does on Ctrl-C (KeyboardInterrupt):
  Prefect marks its runs Crashed through the server, which is still up, and training
  stops. It then exits at once, without Prefect's exit handlers.
- Whatever is left of the run's group when it has exited, or `GRACE_S` seconds after
  the signal, or at a second signal, gets SIGKILL. Then one line is printed and the
  command exits with 128 + the signal's number.
- If the command itself is killed, the run dies with it (PR_SET_PDEATHSIG) and a small
  reaper process in the run's group takes the group down.

Finished stages (manifests) and checkpoints stay: rerunning the command resumes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import NoReturn

RUN_ENV = "NOISY_STUDENT_SUPERVISOR"  # set in the run's environment: the supervising pid
GRACE_S = 7.0  # from the signal to SIGKILL of what still runs (the target: exit within 10 s)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1

# The reaper, a child of the run in its group: when the run has gone (its parent
# changes), it kills the group, itself included. Python without site: it starts in ms.
_REAPER = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent = int(sys.argv[1])
while os.getppid() == parent:
    time.sleep(0.1)
os.killpg(0, signal.SIGKILL)
"""

_reaper: subprocess.Popen | None = None
_interrupted = False


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def supervise(argv: list[str]) -> int:
    """Run `noisy-student ARGV` as a run in its own process group; return its exit code,
    or 128 + N after signal N, having printed one line."""
    env = {**os.environ, RUN_ENV: str(os.getpid())}
    # The run starts with SIGINT blocked (a signal mask is inherited): a Ctrl-C while it
    # starts up stays pending until `enter_run` has installed its handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], env=env, process_group=0)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        raise
    got: list[int] = []

    def on_alarm(signum, frame) -> None:
        _killpg(run.pid)

    def on_signal(signum, frame) -> None:
        if got:  # a second Ctrl-C: no more waiting
            _killpg(run.pid)
            return
        got.append(signum)
        try:
            os.kill(run.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        signal.setitimer(signal.ITIMER_REAL, GRACE_S)

    signal.signal(signal.SIGALRM, on_alarm)
    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # Not reaped yet, so the run's pid (its group's id) cannot be reused before the kill below.
    os.waitid(os.P_PID, run.pid, os.WEXITED | os.WNOWAIT)
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: got.append(signum))
    _killpg(run.pid)  # whatever the run left behind
    rc = run.wait()
    if got or rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        name = signal.Signals(got[0] if got else rc - 128).name
        print(
            f"noisy-student: interrupted ({name}); finished stages and checkpoints are kept: "
            "rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        return 128 + (got[0] if got else rc - 128)
    if rc < 0:
        print(
            f"noisy-student: the run was killed ({signal.Signals(-rc).name}); rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        return 128 - rc
    return rc


def in_run() -> bool:
    """Whether this process is a run that `supervise` started (after `enter_run`)."""
    return _reaper is not None


def enter_run() -> None:
    """Called first in the run: die with the supervisor, leave a reaper for the group,
    and turn SIGINT into a silent KeyboardInterrupt."""
    global _reaper
    supervisor = int(os.environ.pop(RUN_ENV))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the reaper still covers the group
        pass
    if os.getppid() != supervisor:  # the supervisor is already gone
        os._exit(128 + signal.SIGKILL)
    _reaper = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _REAPER, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending Ctrl-C lands here
    except KeyboardInterrupt:
        exit_interrupted()


def _descendants(pids: list[int]) -> list[int]:
    """`pids` that still run and every process below them (psutil)."""
    import psutil

    found = []
    for pid in pids:
        try:
            found += [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            continue
    return found


def _stop_workers() -> None:
    """SIGKILL this process's multiprocessing children (data loader workers, training
    ranks) and everything below them.

    Done before the KeyboardInterrupt unwinds: a loader worker that is handing a tensor
    to this process over a socket (torch's file-descriptor sharing) would otherwise see
    the socket close and print a traceback to the terminal it shares. Killed first, it
    prints nothing. The temporary Prefect server is no multiprocessing child: it stays
    up for the crash reports."""
    import multiprocessing

    for pid in _descendants([p.pid for p in multiprocessing.active_children() if p.pid]):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _on_interrupt(signum, frame) -> None:
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    # The supervisor prints the one line; the crash reports of Prefect and of the
    # processes stopped with the run go nowhere.
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    _stop_workers()
    raise KeyboardInterrupt


def exit_interrupted() -> NoReturn:
    """Leave an interrupted run at once; the reaper and the supervisor kill the rest of
    its group (the temporary server among it)."""
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is not None:
        try:
            handlers.APILogWorker.drain_all(timeout=2)  # the crash logs reach the server
        except Exception:
            pass
    _stop_resource_tracker()
    os._exit(128 + signal.SIGINT)


def _stop_resource_tracker() -> None:
    """SIGKILL multiprocessing's resource tracker (a child that shares the terminal).

    Once this process and the killed workers are gone, the tracker would see its pipe
    close and warn about the loaders' semaphores ("leaked semaphore objects"), which are
    already unlinked: killed first, it says nothing. Its pid is only kept privately."""
    import multiprocessing.resource_tracker as tracker

    pid = getattr(getattr(tracker, "_resource_tracker", None), "_pid", None)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
