#!/usr/bin/env bash
# Ray GPU run with a SIGKILL and a resume (issue 6), on one GPU through the device tool.
# Carry [".whl"] (bash ../shared/tools/gpu_wheels.sh builds it). Writes logs to $OUT.
#   bash bench/ray_gpu_resume.sh [KILL_AFTER_STEP]
# A ~215M BST:SH:S4 (12 layers, d=1024, BST layers [0,7,9]) at L=2048, W=512, batch 4, the stdlib
# corpus, JaxTrainer with one GPU worker, checkpoints every 50 steps, 300 steps. The first run is
# SIGKILLed (its whole process tree, the embedded Ray head included) once step KILL_AFTER_STEP is
# logged; the same command then runs again and resumes from the newest complete checkpoint.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH || exit 1
export PYTHONUNBUFFERED=1 BST_DIST_CACHE=/tmp/bst_cache
KILL_AFTER=${1:-120}
RUN=/tmp/ray_gpu_run
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SETS=(--set name=ray_gpu_bst_sh_s4 --set model.d_model=1024 --set model.num_layers=12 --set model.num_heads=8
      --set model.head_dim=128 --set model.mlp_dim=4096 --set model.block_len=512 --set model.seq_len=2048
      --set model.dtype=bfloat16 --set "model.bst_layers=[0,7,9]" --set model.attention_impl=cudnn
      --set data.corpus=stdlib --set train.steps=300 --set train.global_batch_size=4 --set train.log_every=10
      --set "train.run_dir=$RUN" --set checkpoint.every=50 --set checkpoint.keep_last=2
      --set ray.use_gpu=true --set ray.num_workers=1)
CMD=(python3 -m bst_dist train jobs/local_tiny.yaml "${SETS[@]}")
echo "command: ${CMD[*]}" | tee "$OUT/ray_commands.txt"
t0=$(date +%s)
setsid "${CMD[@]}" > "$OUT/ray_run1.log" 2>&1 &
PID=$!
while kill -0 $PID 2>/dev/null; do
  sleep 2
  last=$(python3 -c "
import json,sys
try:
    lines=open('$RUN/metrics.jsonl').read().splitlines()
    print(json.loads(lines[-1]).get('step',0) if lines else 0)
except Exception: print(0)")
  if [ "$last" -ge "$KILL_AFTER" ]; then
    # the whole tree: the driver's process group and the groups of its descendants (the Ray head
    # runs in its own group), by id
    groups=$(python3 - $PID <<'PY'
import subprocess, sys
root = int(sys.argv[1])
rows = [tuple(map(int, l.split())) for l in
        subprocess.run(["ps", "-eo", "pid=,ppid=,pgid="], capture_output=True, text=True).stdout.splitlines()]
kids, groups = {}, set()
for p, pp, g in rows:
    kids.setdefault(pp, []).append((p, g))
    if p == root:
        groups.add(g)
stack, seen = [root], {root}
while stack:
    for p, g in kids.get(stack.pop(), []):
        if p not in seen:
            seen.add(p); stack.append(p); groups.add(g)
print(" ".join(map(str, sorted(groups))))
PY
)
    echo "SIGKILL at logged step $last, $(( $(date +%s) - t0 )) s; groups: $groups" | tee -a "$OUT/ray_commands.txt"
    for g in $groups; do kill -9 -- -$g 2>/dev/null; done
    break
  fi
done
wait $PID 2>/dev/null
echo "run 1 exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/ray_commands.txt"
sleep 5; nvidia-smi --query-gpu=memory.used --format=csv,noheader | tee -a "$OUT/ray_commands.txt"
ls "$RUN/checkpoints" 2>&1 | tee -a "$OUT/ray_commands.txt"
t1=$(date +%s)
"${CMD[@]}" > "$OUT/ray_run2.log" 2>&1
echo "run 2 exit $? after $(( $(date +%s) - t1 )) s" | tee -a "$OUT/ray_commands.txt"
grep -h "resumed from" "$OUT"/ray_run2.log | tail -1 | tee -a "$OUT/ray_commands.txt"
cp "$RUN/metrics.jsonl" "$OUT/ray_metrics.jsonl" 2>/dev/null
tail -3 "$OUT/ray_run2.log"
