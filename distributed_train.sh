#!/usr/bin/env bash
# Launch train.py with torchrun on NUM_PROC processes (one per GPU) per node.
#
#   ./distributed_train.sh NUM_PROC [train.py args...]
#
# One node (NNODES unset or 1): a standalone rendezvous on localhost with a free port, so several
# jobs can share a machine.
#   ./distributed_train.sh 8 -c hparams/resnet50/sam-on-layerl2.yaml --data-dir /data/imagenet
#
# Several nodes, through the environment (static rendezvous; run the same line on every node,
# NODE_RANK = 0 .. NNODES-1, MASTER_ADDR = the address of node 0, MASTER_PORT default 29500):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 ./distributed_train.sh 8 -c ...
#
# Any other torchrun rendezvous: TORCHRUN_ARGS replaces the rendezvous arguments above
# (--nproc_per_node=NUM_PROC is still added), e.g. an elastic c10d rendezvous:
#   TORCHRUN_ARGS="--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --rdzv-id=job42" \
#       ./distributed_train.sh 8 -c ...
# or call torchrun directly: torchrun --nproc_per_node=8 [rendezvous args] train.py [args].
#
# PYTHON selects the interpreter (default: python on PATH, e.g. the active venv's).
# NUM_PROC: a positive integer, or torchrun's auto / gpu / cpu.
# -b is the per-GPU batch; global batch = NUM_PROC x NNODES x -b x --grad-accum-steps.
set -euo pipefail

usage() {
    echo "usage: $0 NUM_PROC [train.py args...]   (NUM_PROC: processes per node, e.g. 8)" >&2
    echo "  env: NNODES NODE_RANK MASTER_ADDR MASTER_PORT (several nodes), TORCHRUN_ARGS, PYTHON" >&2
}

if [ $# -lt 1 ]; then
    usage
    exit 2
fi
NUM_PROC=$1
shift
case "$NUM_PROC" in
    auto|gpu|cpu) ;;
    ''|*[!0-9]*|0)
        echo "$0: error: NUM_PROC must be a positive integer (or auto, gpu, cpu), got '$NUM_PROC'" >&2
        usage
        exit 2 ;;
esac

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}

if [ -n "${TORCHRUN_ARGS:-}" ]; then
    # shellcheck disable=SC2206  # word splitting intended: a list of torchrun arguments
    RDZV_ARGS=(${TORCHRUN_ARGS})
elif [ "$NNODES" = 1 ]; then
    RDZV_ARGS=(--standalone --nnodes=1)
else
    case "$NNODES" in
        ''|*[!0-9]*|0)
            echo "$0: error: NNODES must be a positive integer, got '$NNODES'" >&2
            exit 2 ;;
    esac
    if [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
        echo "$0: error: NNODES=$NNODES needs NODE_RANK (0..$((NNODES - 1))) and MASTER_ADDR (node 0's address)" \
             "in the environment (MASTER_PORT defaults to 29500), or TORCHRUN_ARGS with torchrun's rendezvous arguments" >&2
        exit 2
    fi
    RDZV_ARGS=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
               --master_port="${MASTER_PORT:-29500}")
fi

exec "$PYTHON" -m torch.distributed.run "${RDZV_ARGS[@]}" --nproc_per_node="$NUM_PROC" \
    "$SCRIPT_DIR/train.py" "$@"
