"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest
import torch

import data

# A model small enough that a few training steps take about a second on a CPU.
TINY_FLAGS = ["--width", "32", "--depth", "1", "--heads", "2", "--embed-dim", "16", "--image-size", "32",
              "--patch-size", "8", "--vocab-size", "200", "--max-len", "32", "--workers", "0"]


@pytest.fixture(scope="session")
def medpix_root() -> Path:
    """Return the MedPix 2.0 folder: $MEDPIX_ROOT if set, else the default copy beside the repository.

    Tests that use it are skipped when the folder is absent.
    """
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "medpix-2.0"
    root = Path(os.environ.get("MEDPIX_ROOT", default))
    if not (root / "Descriptions.json").is_file():
        pytest.skip(f"MedPix 2.0 not found at {root}; set MEDPIX_ROOT")
    return root


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A synthetic chest X-ray dataset of 96 train, 24 val and 24 test pairs, made once per session."""
    root = tmp_path_factory.mktemp("synthetic") / "cxr"
    data.make_synthetic_dataset(root, n_train=96, n_val=24, n_test=24, size=64, seed=0)
    return root


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread, so subprocesses and spawned ranks do not oversubscribe the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
