#!/bin/bash
# docs/bench.md, Threads: OMP_WAIT_POLICY=PASSIVE vs unset (libgomp's default), alone and beside a neighbour;
# tools/bench.py's CPU shape, LoRA (dropout 0), 2 threads, the median of 5 steps. Run alone on the machine:
#   PYTHON=venv/bin/python bash tools/measure/threads.sh
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/threads}; mkdir -p $OUT
one() {  # policy neighbour rep
  pol=$1; nb=$2; rep=$3
  envp=(env -u OMP_WAIT_POLICY); [ "$pol" = passive ] && envp=(env OMP_WAIT_POLICY=PASSIVE)
  nbpid=""
  if [ "$nb" = same ]; then "${envp[@]}" $PY $HERE/steps.py lora-nodrop 1000 $OUT/nb.json & nbpid=$!; sleep 3; fi
  if [ "$nb" = burner ]; then $PY -c "while True: pass" & nbpid=$!; fi
  t0=$(date +%s.%N)
  "${envp[@]}" $PY $HERE/steps.py lora-nodrop 6 $OUT/$pol-$nb-$rep.json
  t1=$(date +%s.%N)
  [ -n "$nbpid" ] && kill $nbpid 2>/dev/null; wait 2>/dev/null
  echo "$pol $nb $rep median_step $(python3 -c "import json;print(round(json.load(open('$OUT/$pol-$nb-$rep.json'))['median'],3))") wall $(python3 -c "print(round($t1-$t0,1))")"
}
for rep in 1 2; do
  for nb in alone burner same; do
    for pol in spinning passive; do one $pol $nb $rep; done
  done
done
