#!/bin/bash
# Smoke test of the two-role layout on Qwen3-4B-Base: 1 training node and 1 rollout node (8 SGLang
# servers, --tp 1), 5 steps, a fresh run directory per job (no requeue).
#   sbatch slurm/mgrpo_smoke.sh [-- --section.key value ...]
#   SLURM_JOB_NODELIST='gpu[001-002]' bash slurm/mgrpo_smoke.sh --dry-run   # print, run nothing
# Site: add --partition/--account below (or give them to sbatch); see slurm/README.md.
#SBATCH --job-name=mgrpo-smoke
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=00:30:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=PARTITION
##SBATCH --account=ACCOUNT
set -euo pipefail

: "${CONFIG:=examples/qwen3_4b_base.yaml}"
: "${RUN_DIR:=runs/qwen3_4b_smoke_${SLURM_JOB_ID:-dryrun}}"
: "${TRAIN_NODES:=1}" "${ROLLOUT_NODES:=1}" "${GPUS_PER_NODE:=8}"
: "${SERVERS_PER_NODE:=8}" "${SGLANG_TP:=1}" "${HEALTH_TIMEOUT_S:=900}"
MGRPO_TRAIN_ARGS=(--training.steps 5)  # before the command line's: those after -- win
# MODEL: the base model's HF directory, loaded by the servers and given to the trainer as
# --model.load (default: the config's model.load, which the example leaves null).

for d in "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-.}/slurm" "${SLURM_SUBMIT_DIR:-.}"; do
  [[ -f $d/common.sh ]] && break
done
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$d/common.sh"
mgrpo_main "$@"
