import json

import pytest
from PIL import Image

from data.shards import expand_urls, iter_shard
from flows.cli import main


def test_shards_build_converts_an_image_folder(tmp_path, capsys):
    src = tmp_path / "train"
    for cls in ("n01", "n02"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(src / cls / f"img{i}.JPEG")
    (src / "n02" / "broken.jpg").write_bytes(b"not an image")
    assert main(["shards", "build", str(src), str(tmp_path / "out"), "--per-shard", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 6 and report["corrupt"] == 1
    shards = expand_urls(str(tmp_path / "out" / report["pattern"]))
    assert len(shards) == 2
    keys = [k for s in shards for k, _ in iter_shard(s)]
    assert len(keys) == 6 and all("." not in k for k in keys)


def test_bad_override_exits_with_a_message(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--set", "teacher.stepz=3"]) == 2
    assert "teacher.stepz" in capsys.readouterr().err


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        main(["stage", "labelling", "demo"])


def test_a_family_without_a_demo_is_named_with_those_that_have_one(tmp_path, capsys):
    assert main(["demo", "--quick", "--family", "classification", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no demo for family 'classification'" in err and "detection, segmentation" in err
    assert not (tmp_path / "world").exists()  # refused before the world is written


def test_importing_the_flows_turns_off_prefect_telemetry_but_keeps_a_users_setting():
    """A benchmark or a user's script imports `flows`, not the command: the server's
    defaults must hold there too, and a value the user set must win."""
    import os
    import subprocess
    import sys

    probe = (
        "import flows, os; e = os.environ; "
        "print(e['PREFECT_SERVER_ANALYTICS_ENABLED'], e['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS'])"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_")}
    out = subprocess.run([sys.executable, "-c", probe], env=base, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["false", "120"]
    mine = {**base, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    out = subprocess.run([sys.executable, "-c", probe], env=mine, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["false", "300"]
