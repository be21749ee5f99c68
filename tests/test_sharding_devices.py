"""Every aggregator over 8 devices: the single-device update, no gradient gathered.

The suite's process has 4 devices, fixed when JAX starts, so the check runs
in its own process (tests/sharding_check.py, which documents what it checks).
"""

import os
import pathlib
import subprocess
import sys

from method_cases import CASES

SCRIPT = pathlib.Path(__file__).resolve().parent / "sharding_check.py"
ROOT = SCRIPT.parent.parent


def test_sharded_updates_match_and_move_only_statistics():
  env = dict(os.environ)  # JAX_COMPILATION_CACHE_DIR as conftest set it
  env["XLA_FLAGS"] = " ".join(
      [f for f in env.get("XLA_FLAGS", "").split()
       if "xla_force_host_platform_device_count" not in f]
      + ["--xla_force_host_platform_device_count=8"])
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  result = subprocess.run([sys.executable, "-W", "error", str(SCRIPT)],
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  report = result.stdout + result.stderr
  assert result.returncode == 0, report
  lines = result.stdout.splitlines()
  assert lines[0].startswith("ok   HLO scan flags a gathered gradient"), report
  # Four checks (two layouts, two modes) per aggregator, all passed.
  expected = 4 * sum(case.kind == "aggregator" for case in CASES)
  checks = [l for l in lines[1:-1] if l.startswith(("ok", "FAIL"))]
  assert len(checks) == expected, report
  assert all(l.startswith("ok") for l in checks), report
  assert lines[-1] == f"{expected} of {expected} checks passed", report
