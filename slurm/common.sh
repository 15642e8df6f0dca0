# shellcheck shell=bash
# Shared part of slurm/mgrpo_*.sh (sourced, never run on its own; sourcing only defines functions).
#
# One allocation, two node roles, in the order of SLURM_JOB_NODELIST:
#   the first TRAIN_NODES nodes    training: one torchrun per node, GPUS_PER_NODE ranks each
#   the next ROLLOUT_NODES nodes   rollout: SERVERS_PER_NODE SGLang servers, SGLANG_TP GPUs each
# The trainer attaches to the servers over HTTP (--sglang.urls) and pushes weights to them over an
# NCCL group rooted at training rank 0 (--sglang.transport distributed).
#
# Order of a run: servers start -> every /health answers -> training runs -> servers stop.
# Near the time limit (#SBATCH --signal=B:USR1@600) the script creates $RUN_DIR/STOP; the trainer
# saves a checkpoint at the end of its step and exits 0; the job requeues itself and the next run
# resumes from that checkpoint (--training.resume true).
#
# Knobs (environment variables; the entry script gives the per-model defaults):
#   MODEL (HF directory: the servers load it, the trainer gets --model.load MODEL), CONFIG,
#   RUN_DIR, TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE, SERVERS_PER_NODE, SGLANG_TP, BASE_PORT,
#   RDZV_PORT, HEALTH_TIMEOUT_S, HEALTH_POLL_S, PYTHON, SGLANG_ARGS, DRY_RUN;
#   MGRPO_TRAIN_ARGS (an array an entry script may set): trainer overrides placed before the
#   command line's (those after --), which therefore win.
# Site hooks (nothing below is site-specific; set these in the environment or in SITE_ENV):
#   SITE_ENV           a file sourced first: module load ..., conda activate ..., exports
#   SRUN_ARGS          extra flags for every srun step, e.g. a container (pyxis):
#                      "--container-image=/images/mgrpo.sqsh --container-mounts=/data:/data"
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_HCA
#                      the network to use when the default route is not it (e.g. ib0); they
#                      pass through to every step untouched
#   TRAIN_MASTER_ADDR  the address other nodes reach training rank 0's node at (default: its
#                      hostname): the rendezvous endpoint and --sglang.dist_master_address
# See slurm/README.md.

# ------------------------------------------------------------------------------------------------
# Hostlists: "gpu[001-004,007],cpu5" -> gpu001 gpu002 gpu003 gpu004 gpu007 cpu5.

# Pure-bash expansion (no slurm needed), one name per line. Zero padding follows the range's
# start ("n[08-10]" -> n08 n09 n10), several bracket groups in a name are expanded in turn.
mgrpo_expand_hostlist() {
  local list=$1 item="" depth=0 c i
  _MGRPO_EXPANDED=()
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    case $c in
      '[') depth=$((depth + 1)) ;;
      ']') depth=$((depth - 1)) ;;
    esac
    if [[ $c == , && $depth == 0 ]]; then
      _mgrpo_expand_item "$item" || return 2
      item=""
    else
      item+=$c
    fi
  done
  _mgrpo_expand_item "$item" || return 2
  printf '%s\n' "${_MGRPO_EXPANDED[@]}"
}

_mgrpo_expand_item() {  # one comma-free name, appended to _MGRPO_EXPANDED
  local item=$1 prefix ranges suffix part lo hi n name
  if [[ $item != *'['* && $item != *']'* ]]; then
    [[ -n $item ]] || { echo "mgrpo: empty name in hostlist" >&2; return 2; }
    _MGRPO_EXPANDED+=("$item")
    return 0
  fi
  local group='^([^][]*)\[([0-9,-]+)\](.*)$'  # prefix [ranges] rest
  if [[ ! $item =~ $group ]]; then
    echo "mgrpo: cannot expand hostlist item '$item'" >&2
    return 2
  fi
  prefix=${BASH_REMATCH[1]} ranges=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
  local -a parts
  IFS=, read -r -a parts <<<"$ranges"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
      lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]}
    elif [[ $part =~ ^[0-9]+$ ]]; then
      lo=$part hi=$part
    else
      echo "mgrpo: cannot expand hostlist range '$part' in '$item'" >&2
      return 2
    fi
    for ((n = 10#$lo; n <= 10#$hi; n++)); do
      printf -v name '%s%0*d%s' "$prefix" "${#lo}" "$n" "$suffix"
      _mgrpo_expand_item "$name" || return 2
    done
  done
}

# The allocation's hostnames into MGRPO_HOSTS: scontrol where slurm is installed, else the above.
_mgrpo_hosts() {
  MGRPO_HOSTS=()
  if command -v scontrol >/dev/null 2>&1; then
    mapfile -t MGRPO_HOSTS < <(scontrol show hostnames "$1")
  else
    mgrpo_expand_hostlist "$1" >/dev/null || exit 2
    MGRPO_HOSTS=("${_MGRPO_EXPANDED[@]}")
  fi
  ((${#MGRPO_HOSTS[@]} > 0)) || _mgrpo_die 2 "cannot expand SLURM_JOB_NODELIST='$1'"
}

# ------------------------------------------------------------------------------------------------
# Printing and running commands. Every command is printed as "+ cmd" (shell-quoted, so it can be
# pasted); in a dry run that is all that happens.

_mgrpo_die() {  # CODE MESSAGE: one line on stderr, then exit
  echo "mgrpo: $2" >&2
  exit "$1"
}

_mgrpo_quote() {  # WORD -> REPLY, quoted for a shell only where it needs it
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    REPLY=$1
  else
    REPLY="'${1//\'/\'\\\'\'}'"
  fi
}

_mgrpo_line() {  # WORDS... -> REPLY: "+ w1 w2 ..."
  local line="+" w
  for w in "$@"; do
    _mgrpo_quote "$w"
    line+=" $REPLY"
  done
  REPLY=$line
}

_mgrpo_do() {  # print, and run unless dry
  _mgrpo_line "$@"
  printf '%s\n' "$REPLY"
  if ((!MGRPO_DRY_RUN)); then
    "$@"
  fi
}

_mgrpo_spawn() {  # LOG CMD...: print, and start in the background (PID in MGRPO_PID) unless dry
  local log=$1 line
  shift
  _mgrpo_line "$@"
  line=$REPLY
  _mgrpo_quote "$log"
  printf '%s >> %s 2>&1 &\n' "$line" "$REPLY"
  MGRPO_PID=""
  if ((!MGRPO_DRY_RUN)); then
    "$@" >>"$log" 2>&1 &
    MGRPO_PID=$!
  fi
}

# ------------------------------------------------------------------------------------------------
# The job.

mgrpo_main() {
  _mgrpo_args "$@"
  _mgrpo_roles
  _mgrpo_setup
  _mgrpo_start_servers
  _mgrpo_wait_healthy
  _mgrpo_train
}

_mgrpo_usage() {
  cat <<EOF
usage: ${0##*/} [--dry-run] [-- --section.key value ...]
  sbatch ${0##*/}            run (options after -- go to 'megatron_mgrpo.cli train')
  bash ${0##*/} --dry-run    print every command instead of running it (DRY_RUN=1 too);
                             without slurm, give a nodelist: SLURM_JOB_NODELIST='gpu[001-012]'
knobs: CONFIG RUN_DIR MODEL TRAIN_NODES ROLLOUT_NODES GPUS_PER_NODE SERVERS_PER_NODE SGLANG_TP
       BASE_PORT RDZV_PORT HEALTH_TIMEOUT_S HEALTH_POLL_S PYTHON SGLANG_ARGS SRUN_ARGS SITE_ENV
       TRAIN_MASTER_ADDR (see slurm/README.md)
EOF
}

_mgrpo_args() {
  MGRPO_DRY_RUN=0
  [[ ${DRY_RUN:-0} == 0 || -z ${DRY_RUN:-} ]] || MGRPO_DRY_RUN=1
  MGRPO_EXTRA_ARGS=()
  while (($#)); do
    case $1 in
      --dry-run) MGRPO_DRY_RUN=1 ;;
      -h | --help) _mgrpo_usage; exit 0 ;;
      --) shift; MGRPO_EXTRA_ARGS=("$@"); break ;;
      *) _mgrpo_die 2 "unknown argument '$1' (trainer overrides go after --)" ;;
    esac
    shift
  done
}

_mgrpo_int() {  # NAME MIN: the variable NAME must hold an integer >= MIN
  local v=${!1:-}
  if [[ ! $v =~ ^[0-9]+$ ]] || ((10#$v < $2)); then
    _mgrpo_die 2 "$1='$v': expected an integer >= $2"
  fi
}

# Node roles from SLURM_JOB_NODELIST: TRAIN_HOSTS, ROLLOUT_HOSTS, MGRPO_RANK0_HOST.
_mgrpo_roles() {
  : "${GPUS_PER_NODE:=8}" "${SERVERS_PER_NODE:=1}" "${SGLANG_TP:=$GPUS_PER_NODE}"
  : "${BASE_PORT:=30000}" "${RDZV_PORT:=29500}" "${HEALTH_TIMEOUT_S:=1800}" "${HEALTH_POLL_S:=10}"
  local name
  for name in TRAIN_NODES ROLLOUT_NODES GPUS_PER_NODE SERVERS_PER_NODE SGLANG_TP BASE_PORT \
      RDZV_PORT HEALTH_TIMEOUT_S HEALTH_POLL_S; do
    _mgrpo_int "$name" 1
  done
  local msg
  if ((SERVERS_PER_NODE * SGLANG_TP > GPUS_PER_NODE)); then
    msg="SERVERS_PER_NODE=$SERVERS_PER_NODE servers x SGLANG_TP=$SGLANG_TP GPUs"
    _mgrpo_die 2 "$msg do not fit in GPUS_PER_NODE=$GPUS_PER_NODE"
  fi
  if [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
    msg="SLURM_JOB_NODELIST is not set: submit with sbatch, run inside salloc, or give one"
    _mgrpo_die 2 "$msg for a dry run: SLURM_JOB_NODELIST='gpu[001-012]' bash $0 --dry-run"
  fi
  _mgrpo_hosts "$SLURM_JOB_NODELIST"
  local need=$((TRAIN_NODES + ROLLOUT_NODES)) have=${#MGRPO_HOSTS[@]}
  if ((have < need)); then
    msg="the allocation has $have nodes (SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST); this job needs"
    _mgrpo_die 2 "$msg TRAIN_NODES=$TRAIN_NODES + ROLLOUT_NODES=$ROLLOUT_NODES = $need"
  fi
  TRAIN_HOSTS=("${MGRPO_HOSTS[@]:0:TRAIN_NODES}")
  ROLLOUT_HOSTS=("${MGRPO_HOSTS[@]:TRAIN_NODES:ROLLOUT_NODES}")
  if ((have > need)); then
    echo "mgrpo: warning: $((have - need)) node(s) stay idle: ${MGRPO_HOSTS[*]:need}" >&2
  fi
  # torchrun's c10d rendezvous numbers the nodes by hostname sorted as strings, so training rank 0
  # (which roots the weight-push group) runs on the training node whose name sorts first: the
  # first one for zero-padded names, not for node9,node10.
  local LC_ALL=C host
  MGRPO_RANK0_HOST=${TRAIN_HOSTS[0]}
  for host in "${TRAIN_HOSTS[@]}"; do
    if [[ $host < $MGRPO_RANK0_HOST ]]; then MGRPO_RANK0_HOST=$host; fi
  done
}

# model.load of the config, read without Python ("" when null): MODEL's default.
_mgrpo_model_from_config() {
  awk '/^model:/ { m = 1; next }
       m && /^[^[:space:]#]/ { exit }
       m && /^[[:space:]]+load:/ {
         sub(/^[[:space:]]+load:[[:space:]]*/, ""); sub(/[[:space:]]+#.*$/, "")
         gsub(/^["'\'']|["'\'']$/, ""); if ($0 != "null" && $0 != "~") print; exit }' "$1"
}

_mgrpo_setup() {
  # Relative paths (CONFIG, RUN_DIR, MODEL) are taken from the repository root.
  MGRPO_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  _mgrpo_line cd "$MGRPO_REPO"
  printf '%s\n' "$REPLY"
  cd "$MGRPO_REPO" || exit 2  # in a dry run too: the checks below read CONFIG from there
  if [[ -n ${SITE_ENV:-} ]]; then
    _mgrpo_line source "$SITE_ENV"
    printf '%s\n' "$REPLY"
    if ((!MGRPO_DRY_RUN)); then
      # shellcheck disable=SC1090  # a site's own file
      source "$SITE_ENV"
    fi
  fi
  : "${PYTHON:=python}"
  # Problems a dry run reports and goes on past (it should show the whole job).
  local problem=""
  if [[ ! -f $CONFIG ]]; then
    problem+="${problem:+; }CONFIG=$CONFIG: no such file (relative paths are from $MGRPO_REPO)"
  fi
  if [[ -z ${MODEL:-} && -f $CONFIG ]]; then MODEL=$(_mgrpo_model_from_config "$CONFIG"); fi
  if [[ -z ${MODEL:-} ]]; then
    problem+="${problem:+; }MODEL is not set and $CONFIG has no model.load: set MODEL to the"
    problem+=" base model's HF directory"
    MODEL="<MODEL>"
  fi
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    problem+="${problem:+; }SLURM_JOB_ID is not set: run under sbatch or salloc"
  fi
  if [[ -n $problem ]]; then
    ((MGRPO_DRY_RUN)) || _mgrpo_die 2 "$problem"
    echo "mgrpo: warning: $problem (dry run goes on)" >&2
  fi
  MGRPO_JOB_ID=${SLURM_JOB_ID:-dryrun}
  MGRPO_STOP_FILE=$RUN_DIR/STOP
  MGRPO_LOGS=$RUN_DIR/logs
  read -r -a MGRPO_SRUN_ARGS <<<"${SRUN_ARGS:-}"
  read -r -a MGRPO_SGLANG_ARGS <<<"${SGLANG_ARGS:-}"

  # Environment of every step (srun passes the batch environment on).
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # INFO when debugging hangs or topology
  # A failed or timed-out collective aborts the process instead of hanging until the time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # Megatron with tensor parallelism: one hardware queue keeps the order in which the TP
  # communication kernels are issued, which its compute/communication overlap relies on.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Threads per process (torchrun would default to 1); 8 ranks x 8 threads fit a GPU node.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  export PYTHONUNBUFFERED=1  # logs show lines as they are written
  echo "# job $MGRPO_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}: $CONFIG -> $RUN_DIR"
  echo "# training: ${TRAIN_HOSTS[*]} ($GPUS_PER_NODE GPUs each; rank 0 on $MGRPO_RANK0_HOST)"
  echo "# rollout: ${ROLLOUT_HOSTS[*]} ($SERVERS_PER_NODE x $SGLANG_TP GPUs each): $MODEL"

  _mgrpo_do mkdir -p "$MGRPO_LOGS"
  _mgrpo_do rm -f "$MGRPO_STOP_FILE"  # a STOP left by the previous run of a requeued job
  MGRPO_SERVER_PIDS=()
  MGRPO_TRAIN_PID=""
  MGRPO_STOP_REQUESTED=0
  if ((!MGRPO_DRY_RUN)); then
    trap _mgrpo_cleanup EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
    trap _mgrpo_on_usr1 USR1
  fi
}

_mgrpo_start_servers() {
  MGRPO_URLS=()
  MGRPO_SERVER_LOGS=()
  local node i g port gpus log
  for node in "${ROLLOUT_HOSTS[@]}"; do
    for ((i = 0; i < SERVERS_PER_NODE; i++)); do
      port=$((BASE_PORT + i))
      gpus=$((i * SGLANG_TP))
      for ((g = i * SGLANG_TP + 1; g < (i + 1) * SGLANG_TP; g++)); do gpus+=",$g"; done
      log=$MGRPO_LOGS/sglang_${node}_${port}.log
      # CUDA_VISIBLE_DEVICES is set inside the step (env): srun would replace one set outside.
      _mgrpo_spawn "$log" srun --nodes=1 --ntasks=1 --nodelist="$node" --overlap \
        ${MGRPO_SRUN_ARGS[@]+"${MGRPO_SRUN_ARGS[@]}"} \
        env CUDA_VISIBLE_DEVICES="$gpus" \
        "$PYTHON" -m sglang.launch_server --model-path "$MODEL" --tp "$SGLANG_TP" \
        --host 0.0.0.0 --port "$port" --skip-tokenizer-init \
        ${MGRPO_SGLANG_ARGS[@]+"${MGRPO_SGLANG_ARGS[@]}"}
      MGRPO_SERVER_PIDS+=("$MGRPO_PID")
      MGRPO_URLS+=("http://$node:$port")
      MGRPO_SERVER_LOGS+=("$log")
    done
  done
}

_mgrpo_wait_healthy() {
  local k
  for k in "${!MGRPO_URLS[@]}"; do
    _mgrpo_line curl -sf -o /dev/null "${MGRPO_URLS[k]}/health"
    printf '%s\n' "$REPLY"
  done
  echo "# ^ every ${HEALTH_POLL_S}s until all answer, at most HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S}s"
  if ((MGRPO_DRY_RUN)); then return 0; fi
  local deadline=$((SECONDS + HEALTH_TIMEOUT_S)) pending failed
  while :; do
    pending=() failed=()
    for k in "${!MGRPO_URLS[@]}"; do
      if curl -sf -o /dev/null --max-time 5 "${MGRPO_URLS[k]}/health"; then continue; fi
      pending+=("$k")
      if ! kill -0 "${MGRPO_SERVER_PIDS[k]}" 2>/dev/null; then failed+=("$k"); fi
    done
    if ((${#pending[@]} == 0)); then
      echo "# all ${#MGRPO_URLS[@]} servers are up"
      return 0
    fi
    if ((${#failed[@]} > 0 || SECONDS >= deadline)); then
      for k in "${pending[@]}"; do
        if kill -0 "${MGRPO_SERVER_PIDS[k]}" 2>/dev/null; then
          echo "mgrpo: ${MGRPO_URLS[k]} did not come up within ${HEALTH_TIMEOUT_S}s;" \
            "log: ${MGRPO_SERVER_LOGS[k]}" >&2
        else
          echo "mgrpo: ${MGRPO_URLS[k]} exited before it came up; log: ${MGRPO_SERVER_LOGS[k]}" >&2
        fi
      done
      exit 1
    fi
    sleep "$HEALTH_POLL_S"
  done
}

_mgrpo_train() {
  local master=${TRAIN_MASTER_ADDR:-$MGRPO_RANK0_HOST} urls="" url nodelist
  for url in "${MGRPO_URLS[@]}"; do urls+="${urls:+,}\"$url\""; done
  nodelist=$(IFS=,; echo "${TRAIN_HOSTS[*]}")
  _mgrpo_spawn "$MGRPO_LOGS/train.log" \
    srun --nodes="$TRAIN_NODES" --ntasks-per-node=1 --nodelist="$nodelist" --kill-on-bad-exit=1 \
    ${MGRPO_SRUN_ARGS[@]+"${MGRPO_SRUN_ARGS[@]}"} \
    torchrun --nnodes="$TRAIN_NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$master:$RDZV_PORT" --rdzv-id="$MGRPO_JOB_ID" \
    -m megatron_mgrpo.cli train "$CONFIG" --model.load "$MODEL" \
    --rollout.backend sglang --sglang.urls "[$urls]" --sglang.transport distributed \
    --sglang.dist_master_address "$master" \
    --training.run_dir "$RUN_DIR" --training.resume true --training.stop_file "$MGRPO_STOP_FILE" \
    ${MGRPO_TRAIN_ARGS[@]+"${MGRPO_TRAIN_ARGS[@]}"} \
    ${MGRPO_EXTRA_ARGS[@]+"${MGRPO_EXTRA_ARGS[@]}"}
  MGRPO_TRAIN_PID=$MGRPO_PID
  if ((MGRPO_DRY_RUN)); then
    echo "# wait for training; on SIGUSR1 (10 minutes before the time limit):"
    _mgrpo_do touch "$MGRPO_STOP_FILE"
    echo "# and once training has saved and exited 0 (servers stopped by PID first):"
    _mgrpo_do scontrol requeue "$MGRPO_JOB_ID"
    echo "# on exit: kill PID; wait PID for each srun started above (by its PID, never by name)"
    return 0
  fi
  local rc
  while :; do
    rc=0
    wait "$MGRPO_TRAIN_PID" || rc=$?
    # wait returns >128 when a trapped signal (USR1) arrives; training goes on then.
    if ((rc > 128)) && kill -0 "$MGRPO_TRAIN_PID" 2>/dev/null; then continue; fi
    break
  done
  MGRPO_TRAIN_PID=""
  echo "# training exited with $rc"
  if ((rc == 0 && MGRPO_STOP_REQUESTED)); then
    _mgrpo_cleanup
    _mgrpo_do scontrol requeue "$MGRPO_JOB_ID"
  fi
  exit "$rc"
}

_mgrpo_on_usr1() {
  echo "# SIGUSR1: the time limit is near; the trainer saves and stops at the end of its step"
  MGRPO_STOP_REQUESTED=1
  _mgrpo_do touch "$MGRPO_STOP_FILE"
}

# Stop what this script started, by PID (srun passes the signal on to its tasks).
_mgrpo_cleanup() {
  local pid pids=(${MGRPO_SERVER_PIDS[@]+"${MGRPO_SERVER_PIDS[@]}"})
  if [[ -n ${MGRPO_TRAIN_PID:-} ]]; then pids=("$MGRPO_TRAIN_PID" ${pids[@]+"${pids[@]}"}); fi
  for pid in ${pids[@]+"${pids[@]}"}; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  MGRPO_TRAIN_PID=""
  MGRPO_SERVER_PIDS=()
}
