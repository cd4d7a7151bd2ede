"""host_allocator: tuned keeps freed host memory in the process (glibc's mallopt)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from configs import ConfigError, build_config

# Page faults of each of eight 64 MiB allocations, each written whole and freed.
PROBE = """
import json, resource, sys
import torch
from engine.loop import device_settings
device_settings("cpu", True, sys.argv[1])
faults = []
for _ in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps(faults))
"""


def _faults(setting: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_allocator_stops_refaulting_freed_memory():
    pages = (64 << 20) // 4096
    default, tuned = _faults("default"), _faults("tuned")
    # glibc's defaults hand a freed 64 MiB block back to the OS: every allocation faults it in again
    assert min(default[4:]) > pages // 2
    # tuned, freed blocks stay in the heap: once it has grown (a step or two: an aligned
    # request can miss the block just freed), allocations reuse its pages
    assert max(tuned[4:]) < pages // 20


def test_host_allocator_is_a_run_setting():
    data = {"train_images": "i", "train_annotations": "a.json", "val_images": "i", "val_annotations": "b.json"}
    assert build_config({"data": data}).host_allocator == "tuned"
    assert build_config({"data": data}, ["host_allocator=default"]).host_allocator == "default"
    with pytest.raises(ConfigError, match="host_allocator"):
        build_config({"data": data}, ["host_allocator=jemalloc"])
