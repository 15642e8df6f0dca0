#!/bin/bash
# M-GRPO on Llama-3 70B: 8 training nodes (TP=8, PP=4, DP=2 on 8 x 8 H100-80GB) and 4 rollout nodes
# (one SGLang server per node, --tp 8). Requeues itself at the time limit and resumes.
#   sbatch slurm/mgrpo_70b.sh [-- --section.key value ...]
#   SLURM_JOB_NODELIST='gpu[001-012]' bash slurm/mgrpo_70b.sh --dry-run   # print, run nothing
# Site: add --partition/--account below (or give them to sbatch); see slurm/README.md.
#SBATCH --job-name=mgrpo-70b
#SBATCH --nodes=12
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=PARTITION
##SBATCH --account=ACCOUNT
set -euo pipefail

: "${CONFIG:=examples/llama3_70b.yaml}"
: "${RUN_DIR:=runs/llama3_70b_mgrpo}"
: "${TRAIN_NODES:=8}" "${ROLLOUT_NODES:=4}" "${GPUS_PER_NODE:=8}"
: "${SERVERS_PER_NODE:=1}" "${SGLANG_TP:=8}" "${HEALTH_TIMEOUT_S:=1800}"
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
