import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from soppu_hub.samples import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sample_adapters(tmp_path_factory, tiny_base) -> list[Path]:
    from soppu_hub.samples import write_sample_adapters

    return write_sample_adapters(tmp_path_factory.mktemp("adapters"), base_model=str(tiny_base))
