#!/usr/bin/env bash
# Helpers the cluster recipes' launch scripts source (bash examples/<recipe>/launch.sh, directly or under Slurm).

# node_rank NNODES: this node's rank: $NODE_RANK, else Slurm's $SLURM_NODEID (srun sets it per node), else 0 for a
# one-node job. Several nodes with neither set is an error: every node would claim rank 0.
node_rank() {
  local nnodes=$1
  if [ -n "${NODE_RANK:-}" ]; then echo "$NODE_RANK"
  elif [ -n "${SLURM_NODEID:-}" ]; then echo "$SLURM_NODEID"
  elif [ "$nnodes" -eq 1 ]; then echo 0
  else
    echo "error: $nnodes nodes, but neither NODE_RANK nor SLURM_NODEID is set on this one" \
      "(set NODE_RANK=0..$((nnodes - 1)))" >&2
    return 1
  fi
}

# convert_once HF_DIR SAVE_DIR NODE_RANK: the HF model as a megatron-gopd checkpoint, converted once on a shared
# filesystem. Node 0 converts (a checkpoint is complete once its megatron_gopd.json exists, which the converter
# writes last; a partial one from an interrupted run is redone); the other nodes wait for that file.
convert_once() {
  local hf_dir=$1 save_dir=$2 rank=$3 waited=0
  if [ "$rank" -eq 0 ]; then
    if [ ! -f "$save_dir/megatron_gopd.json" ]; then
      rm -rf "$save_dir"
      python tools/convert_hf_to_megatron.py --hf-dir "$hf_dir" --save-dir "$save_dir" --dtype bf16
    fi
    return
  fi
  until [ -f "$save_dir/megatron_gopd.json" ]; do
    if [ "$waited" -ge "${CONVERT_WAIT_S:-7200}" ]; then
      echo "error: node $rank waited ${waited}s for node 0 to convert $hf_dir into $save_dir" >&2
      return 1
    fi
    sleep "${CONVERT_POLL_S:-10}"
    waited=$((waited + ${CONVERT_POLL_S:-10}))
  done
}

# master_addr: $MASTER_ADDR, else the first node of the Slurm allocation, else this host (one node).
master_addr() {
  if [ -n "${MASTER_ADDR:-}" ]; then echo "$MASTER_ADDR"
  elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
  else echo 127.0.0.1
  fi
}
