"""Running a benchmark of bench/ the way a user does, for the tests of its results."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quick(name: str, folder: Path) -> tuple[dict, list[dict]]:
    """``python bench/<name>.py --quick --out <folder>/<name>.json``: the JSON file it
    wrote and the JSON lines it printed (bench/common.py's measurements)."""
    out = folder / f"{name}.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(out.read_text()), printed
