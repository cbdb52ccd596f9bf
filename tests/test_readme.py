"""The README's examples run as written, in order, in a fresh folder: python blocks with this
interpreter, bash blocks with bash, where ``neurosens`` is ``python -m neurosens`` of this
interpreter. A block of ``make`` lines sets up the environment the test already runs in, so it is
skipped. The training budgets shrink to one epoch unless NEUROSENS_README_FAST=0.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
EPOCHS = re.compile(r"(--epochs |epochs=)\d+")


def readme_blocks():
    return BLOCK.findall((ROOT / "README.md").read_text())


def is_setup(lang, code):
    lines = [line for line in code.splitlines() if line.strip()]
    return lang == "bash" and all(line.startswith("make ") for line in lines)


def test_every_block_says_its_language():
    blocks = readme_blocks()
    assert len(blocks) >= 10
    assert {lang for lang, _ in blocks} <= {"python", "bash", "text"}
    assert not any("..." in code for lang, code in blocks if lang != "text"), "a block holds a literal ..."


@pytest.mark.slow
def test_readme_runs_in_order(tmp_path):
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    shim = bin_dir / "neurosens"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m neurosens "$@"\n')
    shim.chmod(0o755)
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": os.pathsep.join(path),
                        "MPLBACKEND": "Agg"}
    fast = os.environ.get("NEUROSENS_README_FAST", "1") != "0"
    ran = 0
    for i, (lang, code) in enumerate(readme_blocks()):
        if lang == "text" or is_setup(lang, code):
            continue
        if fast:
            code = EPOCHS.sub(lambda m: m.group(1) + "1", code)
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"README block {i} ({lang}) failed:\n{code}\n--- stderr ---\n{run.stderr[-4000:]}"
        ran += 1
    assert ran >= 10
    for made in ("runs/quickstart/model.pt", "pgd_at.json", "runs/sens-quickstart/report.json", "plots/sorted.png",
                 "runs/sns/model.pt", "runs/report/index.html"):
        assert (work / made).stat().st_size > 0, made
