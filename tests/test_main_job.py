"""The README's main job (workflows/run.py, what `bash workflows/run.sh` runs), end to end in its own process."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, _host_root
import comfy_harness as H


@pytest.mark.comfy
def test_main_job_writes_the_grid_and_times_a_full_size_step(tmp_path):
    """Small settings (one image per class, a 64² full-size SD1.5 step) so it fits the suite; the defaults differ
    only in sizes. The speed check must name every method with a speed-up, labelled as a full-size SD1.5 step."""
    root = _host_root()
    env = dict(os.environ)
    env.pop("COMFYUI_PATH", None)
    if os.path.abspath(root) != os.path.abspath(H.pinned_host_root()):
        env["COMFYUI_PATH"] = root
    done = subprocess.run([sys.executable, os.path.join(REPO, "workflows", "run.py"), "--out", str(tmp_path),
                           "--show", "1", "--speed-size", "64"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert (tmp_path / "demo_grid.png").is_file()
    assert "speed on a full-size SD1.5 UNet (random weights, 64²" in output
    speedups = dict(re.findall(r"^\s+(no merging|built-in TomePatchModel r=0\.5|this pack r=0\.5)\s+[\d.]+ s per step"
                               r"\s+([\d.]+)x vs no merging", output, flags=re.M))
    assert set(speedups) == {"no merging", "built-in TomePatchModel r=0.5", "this pack r=0.5"}, output[-3000:]
    assert float(speedups["no merging"]) == 1.0
    assert all(float(value) > 0 for value in speedups.values())
