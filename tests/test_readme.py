"""The README's Python example runs exactly as written (in its own driver process)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_example() -> str:
    section = README.read_text().split("## Use from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_as_written():
    code = _python_example()
    assert "ray.get(pool.infer.remote(" in code
    temp = tempfile.mkdtemp(prefix="wpreadme-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=temp)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                              cwd=temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    first = next(line for line in done.stdout.splitlines() if line.startswith("(384,)"))
    assert first.startswith("(384,) browser-") and first.endswith(("wasm", "webgpu")), first
    assert "Paris" in done.stdout, done.stdout
