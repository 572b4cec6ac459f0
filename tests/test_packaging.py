"""Every file the package reads at run time is shipped by a regular (non-editable) install.

A regular install copies the .py modules and, of the rest, only what `[tool.setuptools.package-data]` lists:
a data file left out works from a checkout and fails, or silently slows down, once installed (the native
decode kernels' C source was missing until 2026-11-28, which turned them off in every pip install).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_data_globs() -> list[str]:
    # read without tomllib (Python 3.11+; the package supports 3.10): the one line under the section
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("[tool.setuptools.package-data]"):]
    return json.loads(re.search(r"^fastvlm\s*=\s*(\[.*?\])\s*$", section, re.M).group(1))


def _matches(rel: str, pattern: str) -> bool:
    if "**" in pattern:  # "assets/**/*": anything under assets/
        return rel.startswith(pattern.split("**", 1)[0])
    return os.path.dirname(rel) == os.path.dirname(pattern) and fnmatch.fnmatch(os.path.basename(rel),
                                                                               os.path.basename(pattern))


def test_every_data_file_of_the_package_is_in_package_data():
    globs = _package_data_globs()
    package = os.path.join(ROOT, "fastvlm")
    missing = []
    for dirpath, dirnames, filenames in os.walk(package):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith((".py", ".pyc", ".so")):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), package).replace(os.sep, "/")
            if not any(_matches(rel, g) for g in globs):
                missing.append(rel)
    assert not missing, f"not shipped by a pip install (add them to package-data in pyproject.toml): {missing}"
    assert any(_matches("kernels/cpu_gemv.c", g) for g in globs)


def test_the_bundled_model_is_reachable_from_the_python_api():
    import fastvlm

    path = fastvlm.bundled_model_path()
    assert "bundled_model_path" in fastvlm.__all__
    assert path and os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors"))
