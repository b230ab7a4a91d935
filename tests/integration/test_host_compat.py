"""The host the suite runs on meets the pack's minimum, by the same check the pack logs at load."""
import pytest

from comfyui_accel import compat

pytestmark = pytest.mark.integration


def test_this_host_meets_the_minimum(comfy):
    assert compat.host_problem() is None
