"""The package claims `requires-python >= 3.10` (pyproject.toml); CI runs a newer Python, so nothing else would
notice a 3.11+ API (asyncio.timeout once slipped in). vermin checks the source statically against the claim."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_source_runs_on_the_oldest_python_it_claims():
    pytest.importorskip("vermin")  # in the dev extra
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        minimum = re.search(r'requires-python\s*=\s*">=\s*(3\.\d+)"', f.read()).group(1)
    script = os.path.join(os.path.dirname(sys.executable), "vermin")  # its console script, beside this Python
    r = subprocess.run([script, "--no-tips", "--violations", "--eval-annotations", f"-t={minimum}-",
                        "fastvlm", "scripts", "benchmarks", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
