#!/usr/bin/env python3
"""Fill a CryoFastAR Slurm template and print the job script (standard library only: runs on a login node).

    python deploy/slurm/render.py single_gpu --config step.yaml > job.sbatch && sbatch job.sbatch
    python deploy/slurm/render.py multi_gpu --gpus-per-node 4 --partition gpu \\
        -- --particles Extract/job012/particles.star --o CryoFastAR/run1 > job.sbatch
    python deploy/slurm/render.py multi_node --nodes 2 --gpus-per-node 4 --config step.yaml > job.sbatch
    python deploy/slurm/render.py cryosparc_connector -- --project P3 --workspace W1 --particles J42.particles

Everything after ``--`` is passed to ``cryofastar run`` (or to ``cryofastar-cryosparc`` for the
connector template) unchanged, quoted for the shell. ``#SBATCH`` lines whose value is left empty
(``--partition`` and ``--account`` by default) are dropped, so Slurm's defaults apply.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATES = {p.stem: p for p in sorted(HERE.glob("*.sbatch"))}
PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def render(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{NAME}}``; drop ``#SBATCH`` lines whose value is empty. KeyError on a missing value."""
    lines = []
    for line in template.splitlines():
        names = PLACEHOLDER.findall(line)
        missing = [n for n in names if n not in values]
        if missing:
            raise KeyError(f"no value for {', '.join(missing)}")
        if line.startswith("#SBATCH") and names and any(values[n] == "" for n in names):
            continue
        lines.append(PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("template", choices=sorted(TEMPLATES), help="which job script")
    p.add_argument("--config", help="YAML step file for `cryofastar run --config` (instead of, or with, args after --)")
    p.add_argument("--job-name", default="cryofastar")
    p.add_argument("--partition", default="", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--account", default="", help="Slurm account (default: none)")
    p.add_argument("--time", default="04:00:00", help="time limit (default 04:00:00)")
    p.add_argument("--mem", default="64G", help="memory per node (default 64G)")
    p.add_argument("--nodes", type=int, default=2, help="nodes (multi_node only; default 2)")
    p.add_argument("--gpus-per-node", type=int, default=4, help="GPUs per node (multi_gpu, multi_node; default 4)")
    p.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores per GPU (default 8)")
    p.add_argument("--log-dir", default=".", help="folder for the Slurm log (default: the submission folder)")
    p.add_argument("--python", default="python",
                   help='the Python with cryofastar installed, or a container launcher such as '
                        '"apptainer exec --nv /path/cryofastar.sif python" (default: python)')
    p.add_argument("--setup", default=None, help="a file of shell lines to run first (module load, conda activate)")
    p.add_argument("-o", "--output", default=None, help="write here instead of standard output")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    run_args = (["--config", args.config] if args.config else []) + extra
    if not run_args:
        print("render.py: give --config STEP.yaml or the program's arguments after --", file=sys.stderr)
        return 2
    gpus = 1 if args.template in ("single_gpu", "cryosparc_connector") else args.gpus_per_node
    values = {
        "JOB_NAME": args.job_name, "PARTITION": args.partition, "ACCOUNT": args.account, "TIME": args.time,
        "MEM": args.mem, "NODES": str(args.nodes), "GPUS_PER_NODE": str(gpus),
        "CPUS_PER_TASK": str(args.cpus_per_gpu * gpus), "LOG_DIR": args.log_dir, "PYTHON": args.python,
        "SETUP": Path(args.setup).read_text().rstrip("\n") if args.setup else "",
        "RUN_ARGS": shlex.join(run_args),
    }
    text = render(TEMPLATES[args.template].read_text(), values)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
