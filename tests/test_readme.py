"""The README's Python examples run exactly as written (in a driver process of their own), and answer right.

Both examples run in one driver (one Ray start): the "Use from Python" block as it stands, then the guide
block (``run_with_recovery``), whose top-level ``await`` s run inside one ``async def`` as they would in the
user's coroutine. Their embeddings of "Example input" are checked against the float64 numpy reference.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from sharding.models.minilm import reference_embed

README = Path(__file__).resolve().parent.parent / "README.md"
TOL = 1e-4            # float32 in the page against the float64 reference (test_pool's tolerance)


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _use_from_python_block() -> str:
    section = README.read_text().split("## Use from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _guide_block() -> str:
    (block,) = [b for b in _python_blocks() if "run_with_recovery(" in b]
    return block


def _driver(out_dir: Path) -> str:
    first, guide = _use_from_python_block(), _guide_block()
    assert "ray.get(pool.infer.remote(" in first
    # The guide block may use `await` only where a coroutine runs it; it is pasted unchanged into one.
    ast.parse("async def _f():\n" + textwrap.indent(guide, "    "))
    return "\n".join([
        first,
        "import asyncio as _asyncio, numpy as _np",
        f"_np.save({str(out_dir / 'first.npy')!r}, out['embedding'])",
        "async def _readme_guide():",
        textwrap.indent(guide, "    "),
        f"    _np.save({str(out_dir / 'guide.npy')!r}, result['result']['embedding'])",
        "    assert result['success'] is True, result",
        "    await pool.shutdown()",
        "_asyncio.run(_readme_guide())",
    ])


def test_readme_python_examples_run_as_written():
    temp = Path(tempfile.mkdtemp(prefix="wpreadme-", dir="/tmp"))
    # RAY_worker_niceness: what the README advises for a driver whose ray.init() starts Ray.
    env = dict(os.environ, RAY_TMPDIR=str(temp), RAY_worker_niceness="0")
    try:
        done = subprocess.run([sys.executable, "-c", _driver(temp)], capture_output=True, text=True,
                              timeout=600, env=env, cwd=temp)
        assert done.returncode == 0, done.stderr[-3000:]
        first = next(line for line in done.stdout.splitlines() if line.startswith("(384,)"))
        assert first.startswith("(384,) browser-") and first.endswith(("wasm", "webgpu")), first
        assert "Paris" in done.stdout, done.stdout
        # The guide block prints the recovery statistics of a pool that met no fault.
        stats = ast.literal_eval(done.stdout.strip().splitlines()[-1])
        assert stats["recovery_attempts"] == 0 and stats["recovery_failures"] == 0, stats
        assert 1 <= stats["active_browsers"] <= 2, stats
        expected = reference_embed(["Example input"])[0]
        for name in ("first", "guide"):
            got = np.load(temp / f"{name}.npy")
            np.testing.assert_allclose(got, expected, atol=TOL, err_msg=f"{name} example's embedding")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
