"""Shared fixtures. Prefect gets a fresh home per test session and no analytics."""

import atexit
import os
import shutil
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="noisy-student-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback: moto's server mode, spoken to over HTTP by s3fs and
    botocore as a cloud bucket would be (signatures, multipart uploads, ETags, listings).
    The AWS_* variables point every client of this process, and of the processes it
    starts, at it. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request):
    """A fresh, empty bucket on the loopback S3 server: its `s3://name` URL."""
    import re

    import fsspec

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{os.getpid()}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small embedded world: 8 train, 8 val, 6 holdout, 16 unlabeled images in 2 shards."""
    from data.world import WorldSpec, write_world

    return write_world(
        tmp_path_factory.mktemp("world"),
        WorldSpec(),
        seed=3,
        n_train=8,
        n_val=8,
        n_unlabeled=16,
        per_shard=8,
        n_holdout=6,
    )


def world_data(world, **kw):
    """DataConfig of a written world's COCO layout at 128 px, no loader workers; `kw` replaces fields."""
    from configs import DataConfig

    where = dict(
        train_images=str(world.images_dir),
        train_annotations=str(world.train_annotations),
        val_images=str(world.images_dir),
        val_annotations=str(world.val_annotations),
        unlabeled_shards=world.unlabeled_pattern,
        image_size=128,
        num_workers=0,
    )
    return DataConfig(**{**where, **kw})


def tiny_model_config(**kw):
    from configs import ModelConfig

    base = dict(backbone="test_efficientnet", neck="fpn", neck_channels=32, head_norm="group", num_classes=3)
    return ModelConfig(**{**base, **kw})
