"""Agreement and speed of our trust metrics against Quantus's reference implementations.

    flock /work/quiet.lock python tests/benchmarks/bench_reference_metrics.py [--data DIR] [--n 24]
        [--methods gradcam,saliency] [--out FILE]

On ``--n`` test films of the shipped model (classes alternating) and each method's maps, every
pair of ``tests/reference_util.py`` (pointing game hit and mass, deletion AUC, ROAD with the
library's imputer, the library's ROAD metric, the randomisation check by MPRT and by the
library's similarity) is scored both ways. Prints one JSON object: per metric and method the
Spearman rank correlation over films (target >= 0.9), the largest per-film difference, and
milliseconds per film ours / library; plus the load average (times are only comparable when
the machine is quiet: run it under ``flock``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import reference_util as ref  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core import config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="data root (default: $CXR_DATA_DIR or ../shared/cxr)")
    ap.add_argument("--n", type=int, default=24, help="test films (default: %(default)s)")
    ap.add_argument("--methods", default="gradcam,saliency", help="explanation methods (default: %(default)s)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if ref.quantus is None:
        print("error: quantus is not installed (pip install -r requirements.txt)", file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else config.data_dir()
    if not data.is_dir():
        data = ROOT.parent / "shared" / "cxr"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    f = ref.films(args.n, data, methods)
    out = {"n_films": len(f["x"]), "methods": methods, "quantus": ref.quantus.__version__, "metrics": {},
           "loadavg_start": os.getloadavg()}
    steps = [ref.pointing_pairs, ref.deletion_pair, ref.road_pairs, ref.randomisation_pairs]
    for method in tqdm(methods, desc="methods", file=sys.stderr):
        for step in tqdm(steps, desc=method, leave=False, file=sys.stderr):
            got = step(f, method)
            pairs = {"deletion": got} if step is ref.deletion_pair else got
            for name, pair in pairs.items():
                out["metrics"].setdefault(name, {})[method] = ref.agreement(pair)
    out["loadavg_end"] = os.getloadavg()
    text = json.dumps(out, indent=1, default=float)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
