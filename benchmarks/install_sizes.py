"""How big and how slow each install is: a fresh venv per extra set (a benchmark).

    python benchmarks/install_sizes.py [--sets core tfds tf ...] [--out FILE.json]

For each set it makes a new virtual environment in a temporary directory, runs the README's
install line ``pip install -c constraints.txt -e ".[extras]"`` with pip's cache off (every
wheel is fetched again), and records the wall time, the venv's size on disk and the number of
packages, then deletes the venv. Prints a Markdown table and one JSON line per set. Network
speed and a local wheel mirror change the times; the sizes depend only on the pins.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: name -> the extras it installs ("" is the core alone)
SETS = {
    "core": "", "mnist": "mnist", "tfds": "tfds", "tf": "tf", "tpu": "tpu",
    "tests (README)": "test,tpu,tfds,tf", "torch": "torch",
}


def du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def measure(extras: str) -> dict:
    tmp = tempfile.mkdtemp(prefix="sap_jax_install_")
    venv = os.path.join(tmp, "venv")
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        target = f".[{extras}]" if extras else "."
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--no-cache-dir",
                        "-c", "constraints.txt", "-e", target], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        frozen = subprocess.run([os.path.join(venv, "bin", "pip"), "freeze"], check=True,
                                capture_output=True, text=True).stdout.split()
        return {"extras": extras, "seconds": round(seconds, 1), "mb": round(du(venv) / 2**20),
                "packages": len(frozen)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--out", help="also write the rows to this JSON file")
    args = ap.parse_args()
    rows = []
    print("| install | extras | size | packages | time |\n|---|---|---:|---:|---:|")
    for name in args.sets:
        row = {"set": name, **measure(SETS[name])}
        rows.append(row)
        print(f"| {name} | `{row['extras'] or '-'}` | {row['mb']:,} MB | {row['packages']} | "
              f"{row['seconds']:.0f} s |", flush=True)
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
