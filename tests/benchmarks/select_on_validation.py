"""Compare candidate runs on the VALIDATION split only: AUC, within-source AUC and the DeGrave
lung probes (AUC with the lungs blanked / with only the lungs), so that the choice of what to
ship never looks at the test split.

    python tests/benchmarks/select_on_validation.py --data ../shared/cxr RUN [RUN ...]

Prints one JSON object: {run: {"n", "auc", "within_source", "lungs_blanked", "lungs_only"}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from core import audit, config, images, lungs, runs  # noqa: E402
from core import model as cxr_model  # noqa: E402


def validation_probes(run: Path, root: Path) -> dict:
    clf = runs.load_model(run)
    size = cxr_model.input_size(clf)
    preds = runs.read_predictions(run)
    val = preds[preds["split"] == "val"].reset_index(drop=True)
    x, kept, errors = images.load_many([root / p for p in val["path"]], size)
    val = val.iloc[kept].reset_index(drop=True)
    masks = np.stack([lungs.mask(im) for im in x])
    y = (val["label"] == "covid").to_numpy(int)
    res = audit.probes(clf, x, masks, y, groups=val["patient_id"].to_numpy(), sources=val["source"].to_numpy())
    res.pop("_p", None)
    ws = res.get("within_source", {})
    pick = {k: {m: round(v[m]["value"], 3) for m in ("original", "lungs_blanked", "lungs_only")} for k, v in ws.items()}
    return {
        "n": res["n"],
        "auc": {k: round(v["value"], 3) for k, v in res["auc"].items()},
        "auc_ci": {k: [round(v["ci_low"], 3), round(v["ci_high"], 3)] for k, v in res["auc"].items()},
        "within_source": pick,
        "bad_files": len(errors),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data")
    args = ap.parse_args()
    root = config.data_dir(args.data)
    print(json.dumps({str(r): validation_probes(Path(r), root) for r in args.runs}, indent=1))


if __name__ == "__main__":
    main()
