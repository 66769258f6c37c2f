"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


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
