"""README's first Quick-start command, run as written at a reduced size (flags appended
last win in argparse), twice: so the newcomer's path cannot silently rot, and a rerun
picks up finished work instead of failing."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALLER = {
    "preprocess.py": ["--demo-cases", "8", "--demo-shape", "48", "48", "48"],
    "pretrain.py": ["--steps", "2", "--workers", "0", "--quiet"],
    "finetune.py": ["--steps", "2", "--n-train", "3", "--val-cases", "1", "--workers", "0", "--quiet"],
    "evaluate.py": ["--quiet"],
}


def demo_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    first = block.replace("\\\n", " ").splitlines()[0]
    return [shlex.split(c) for c in first.split("&&")]


@pytest.mark.slow
def test_readme_demo_command_runs(tmp_path):
    cmds = demo_commands()
    scripts = [c[1] for c in cmds if c[0] == "python" and c[1].endswith(".py")]
    assert scripts == ["preprocess.py", "pretrain.py", "finetune.py", "evaluate.py"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    for attempt in range(2):
        for c in cmds:
            if c[:3] == ["python", "-m", "pip"]:
                continue
            argv = [sys.executable, str(ROOT / c[1])] + c[2:] + SMALLER[c[1]]
            r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{' '.join(c)} (run {attempt + 1}):\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    assert "dice" in r.stdout  # the table
    assert (tmp_path / "runs" / "demo" / "finetune" / "eval" / "metrics.json").exists()
