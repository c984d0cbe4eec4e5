#!/bin/bash
# RELION queue-submission template (Slurm) that works for External jobs such as CryoFastAR.
# Use it as "Standard submission script" (or set RELION_QSUB_TEMPLATE) with "Queue submit command" sbatch.
#
# RELION replaces the WHOLE line holding the command token (last line) by the bare command when the
# program's name lacks "relion_" (every External program), so nothing else may be put on that line (and
# the token must not appear anywhere else, not even in a comment): no srun, no conda run,
# no apptainer exec. Put environment set-up on the lines above it, or (recommended) make the External
# executable deploy/relion/cryofastar-relion-wrapper.sh, which sets up the compute node's environment.
# RELION adds no ">> run.out" in the queue path, so stdout/stderr are routed by the #SBATCH lines.
# External jobs have no MPI: the MPI-process count is always 1; "Number of threads" gives the CPUs.
#
# CryoFastAR uses one GPU. For a CPU-only partition, delete the --gres line. Use the "extra" tokens of
# RELION only if RELION_QSUB_EXTRA_COUNT is set where RELION starts: otherwise they stay in the script
# literally and sbatch rejects it. Comments here must not contain RELION's substitution tokens.
#SBATCH --job-name=XXXnameXXX
#SBATCH --partition=XXXqueueXXX
#SBATCH --ntasks=XXXmpinodesXXX
#SBATCH --cpus-per-task=XXXthreadsXXX
#SBATCH --gres=gpu:1
#SBATCH --output=XXXoutfileXXX
#SBATCH --error=XXXerrfileXXX
#SBATCH --open-mode=append

export OMP_NUM_THREADS=XXXthreadsXXX
# Site set-up may go here (module load ..., conda activate ...), or into the wrapper's settings.

XXXcommandXXX
