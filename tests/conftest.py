"""Shared test helpers: where the real data and weights are, and how a missing ../shared is handled."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BCEMBED_SHARED", REPO.parent / "shared"))
DATA = Path(os.environ.get("BCEMBED_DATA", SHARED / "data"))
WEIGHTS = SHARED / "weights" / "mobilenet_v3_small_imagenet1k_v1_features.pth"


def require(path: Path, what: str) -> Path:
    "Return `path`, or skip the test (fail under BCEMBED_REQUIRE_SHARED=1) when it does not exist."
    if path.exists():
        return path
    message = f"{what} not found at {path}; set BCEMBED_SHARED to the folder holding data/ and weights/"
    if os.environ.get("BCEMBED_REQUIRE_SHARED") == "1":
        pytest.fail(message + " (BCEMBED_REQUIRE_SHARED=1 makes this a failure)")
    pytest.skip(message)


@pytest.fixture
def busi_dir() -> Path:
    return require(DATA / "busi", "BUSI images")


@pytest.fixture
def kaggle_dir() -> Path:
    return require(DATA / "kaggle-busi-aug", "Kaggle augmented BUSI images")


@pytest.fixture
def weights_file() -> Path:
    return require(WEIGHTS, "MobileNetV3-Small ImageNet weights")
