"""Shared fixtures. Real-asset tests skip where the assets are absent, unless
MINITRON_REQUIRE_ASSETS=1 (CI sets it), which turns a missing asset into a failure."""

import os

import pytest

from megatron_minitron import assets


def require_asset(fetch):
    """Returns ``fetch()``'s result from the local cache, or skips/fails when it is missing."""
    try:
        return fetch()
    except assets.AssetUnavailable as err:
        if os.environ.get("MINITRON_REQUIRE_ASSETS") == "1":
            pytest.fail(f"required asset missing: {err}")
        pytest.skip(f"asset not available: {err}")


@pytest.fixture(scope="session")
def smollm2():
    """(directory, gguf file name) of SmolLM2-135M-Instruct."""
    return require_asset(assets.smollm2)
