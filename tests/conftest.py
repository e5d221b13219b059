"""Shared fixtures: CIFAR-10 in its exact on-disk format, small enough to write in milliseconds."""

from __future__ import annotations

import gc
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

# cifar-10-batches-py as the official archive unpacks: five training batches, one test batch and
# the label names, each a protocol-2 pickle of a dict (written by Python 2, so its str keys load
# as str with encoding="latin1"); "data" is uint8 (N, 3072): the 1024 red, then green, then blue
# pixels of each 32x32 image, row by row.
TRAIN_PER_BATCH = 40
TEST_IMAGES = 40


def _write_batch(path: Path, images_nchw: np.ndarray, labels: np.ndarray, name: str) -> None:
    entry = {
        "batch_label": name,
        "labels": [int(x) for x in labels],
        "data": images_nchw.reshape(len(images_nchw), 3 * 32 * 32),
        "filenames": [f"img_{i:05d}.png" for i in range(len(images_nchw))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A ``data_dir`` holding a 200-train / 40-test CIFAR-10 in the real format, and its arrays."""
    root = tmp_path_factory.mktemp("cifar10")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(5 * TRAIN_PER_BATCH, 3, 32, 32), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=5 * TRAIN_PER_BATCH)
    test_images = rng.integers(0, 256, size=(TEST_IMAGES, 3, 32, 32), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=TEST_IMAGES)
    for i in range(5):
        part = slice(i * TRAIN_PER_BATCH, (i + 1) * TRAIN_PER_BATCH)
        _write_batch(
            folder / f"data_batch_{i + 1}", train_images[part], train_labels[part], f"training batch {i + 1} of 5"
        )
    _write_batch(folder / "test_batch", test_images, test_labels, "testing batch 1 of 1")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=2)
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    return root, arrays


@pytest.fixture
def cifar10_checksum_patched(monkeypatch):
    """torchvision checks CIFAR-10's files against the official MD5s; the fixture's files differ.

    Only that check is replaced (by "the file exists"); parsing and loading stay torchvision's.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def no_network(monkeypatch):
    """Every download attempt fails the way it does on a machine without network."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder: the CLI's relative data/ and runs/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI(args=…) warns when sys.argv also holds arguments (pytest's own)."""
    monkeypatch.setattr("sys.argv", ["lit-accel"])


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Some tests (ddp_fork runs, a CPU timing) set torch's thread count; without this the rest of
    the suite would run on one thread of the machine's cores."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# Multi-process tests inside pytest use Lightning's "ddp_fork" (2 CPU processes, gloo). With
# "ddp_spawn" a rank aborted in about half of the runs here (SIGABRT, "terminate called without an
# active exception", right after DDP set-up; torch 2.14.1, Lightning 2.6.6), and fork starts in a
# quarter of the time. Runs through the real CLI use "ddp" (subprocesses).


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_not_ignored() -> None:
    """A shell starts a background job (``cmd &``) with SIGINT ignored, and children inherit that:
    the Ctrl-C tests need Python's own handler, in this process and in the runs it starts."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker, and each process a test starts, computes on one thread: two
    workers then fill the two cores instead of four threads fighting for them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The objects collection created (torch, Lightning, the test modules) go to the collector's
    permanent generation, and the youngest generation is collected ten times less often: the
    collector's walks were a large share of the in-process tests' time. What the tests check does
    not depend on when garbage is collected (measure.fit collects explicitly)."""
    gc.freeze()
    gc.set_threshold(7_000, 10, 10)
