#!/bin/bash
# M-GRPO on Llama-3 8B: 2 training nodes (TP=2, PP=1, DP=8) and 1 rollout node (8 SGLang servers,
# --tp 1, one GPU each). Requeues itself at the time limit and resumes.
#   sbatch slurm/mgrpo_8b.sh [-- --section.key value ...]
#   SLURM_JOB_NODELIST='gpu[001-003]' bash slurm/mgrpo_8b.sh --dry-run   # print, run nothing
# Site: add --partition/--account below (or give them to sbatch); see slurm/README.md.
#SBATCH --job-name=mgrpo-8b
#SBATCH --nodes=3
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=PARTITION
##SBATCH --account=ACCOUNT
set -euo pipefail

: "${CONFIG:=examples/llama3_8b.yaml}"
: "${RUN_DIR:=runs/llama3_8b_mgrpo}"
: "${TRAIN_NODES:=2}" "${ROLLOUT_NODES:=1}" "${GPUS_PER_NODE:=8}"
: "${SERVERS_PER_NODE:=8}" "${SGLANG_TP:=1}" "${HEALTH_TIMEOUT_S:=900}"
# MODEL: the base model's HF directory, loaded by the servers and given to the trainer as
# --model.load (default: the config's model.load, which the examples leave null).

# sbatch runs a copy of this file from its spool directory: common.sh is then found from the
# directory the job was submitted from (the repository root, or slurm/ in it).
for d in "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-.}/slurm" "${SLURM_SUBMIT_DIR:-.}"; do
  [[ -f $d/common.sh ]] && break
done
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$d/common.sh"
mgrpo_main "$@"
