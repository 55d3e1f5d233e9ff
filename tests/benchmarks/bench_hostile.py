"""Peak memory of refusing two hostile inputs (issue 22, items 1 and 2), one subprocess per case.

    python tests/benchmarks/bench_hostile.py [--repo DIR] [--bomb-mib 1024] [--cap-mib 4096]

- ``deflate_bomb``: :func:`core.images.decode` of a Deflated Explicit VR Little Endian DICOM whose
  body holds a private OB element of ``--bomb-mib`` MiB of zeros (built streaming with zlib: the
  file is ~1 KB per MiB of zeros);
- ``dev_zero``: a run file's ``path`` of ``/dev/zero`` opened as the dashboard opens one
  (``core.safepath.read_film``; on code without it, ``images.read_bytes(datasets.abspath(...))``,
  what ``dashboard.state.dataset_bytes`` did).

``--repo`` is the checkout whose ``core`` is measured (default: this one; for the code before the
fix: ``git worktree add /tmp/base aad618f`` and ``--repo /tmp/base``). Each case runs in a fresh
Python with its address space capped at ``--cap-mib`` (so the old code fails with MemoryError
instead of taking the machine); the child reports its outcome and ``ru_maxrss``. Prints one JSON
object: per case the outcome (the refusal's reason, or the error), the peak RSS in MiB and the
peak RSS of the same child after its imports alone (the baseline), and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[4]) * 2**20,) * 2)
import pydicom, pydicom.pixels  # imported up front: the baseline counts them
from core import datasets, images
try:
    from core import safepath
except ImportError:
    safepath = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
case, arg = sys.argv[2], sys.argv[3]
start = time.perf_counter()
try:
    if case == "deflate_bomb":
        images.decode(open(arg, "rb").read(), name="bomb.dcm")
    elif safepath is not None:
        safepath.read_film(arg, "/dev/zero")
    else:
        images.read_bytes(datasets.abspath(arg, "/dev/zero"), name="/dev/zero")
    outcome = "accepted"
except images.ImageError as exc:
    outcome = "refused: " + exc.reason
except MemoryError:
    outcome = "MemoryError (hit the address-space cap)"
print(json.dumps({"outcome": outcome, "seconds": round(time.perf_counter() - start, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "baseline_rss_mib": round(base)}))
"""


def build_bomb(path: Path, mib: int) -> int:
    """Write the deflate bomb (tests/test_hostile.deflated_dicom) to ``path``; its size in bytes."""
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    from test_hostile import deflated_dicom

    data = deflated_dicom(mib * 2**20)
    path.write_bytes(data)
    return len(data)


def run_case(repo: Path, case: str, arg: str, cap_mib: int) -> dict:
    """One case in a fresh interpreter; its JSON line, or what went wrong."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(repo), case, arg, str(cap_mib)],
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"outcome": f"child exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(REPO), help="checkout whose core/ is measured")
    ap.add_argument("--bomb-mib", type=int, default=1024, help="MiB of zeros inside the deflated body")
    ap.add_argument("--cap-mib", type=int, default=4096, help="address-space cap of each child")
    a = ap.parse_args()
    repo = Path(a.repo).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        bomb = Path(tmp) / "bomb.dcm"
        size = build_bomb(bomb, a.bomb_mib)
        (Path(tmp) / "data").mkdir()
        out = {
            "repo": str(repo),
            "commit": subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(),
            "cap_mib": a.cap_mib,
            "deflate_bomb": {"file_kib": round(size / 1024), "inflated_mib": a.bomb_mib,
                             **run_case(repo, "deflate_bomb", str(bomb), a.cap_mib)},
            "dev_zero": run_case(repo, "dev_zero", str(Path(tmp) / "data"), a.cap_mib),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
