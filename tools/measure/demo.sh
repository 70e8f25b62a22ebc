#!/bin/bash
# docs/bench.md, Threads: the demo (config.DEMO_ARGS, --threads 1): OMP_WAIT_POLICY=PASSIVE vs unset (libgomp's default), alone and
# beside a 2-thread bench-shape LoRA job (policy unset)
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/threads}; mkdir -p $OUT
cd $HERE/../..
ARGS=$($PY -c "import config; print(' '.join(config.DEMO_ARGS))")
one() {  # policy neighbour rep
  pol=$1; nb=$2; rep=$3; out=$OUT/demo-$pol-$nb-$rep; rm -rf $out
  nbpid=""
  if [ "$nb" = bench2t ]; then env -u OMP_WAIT_POLICY $PY $HERE/steps.py lora-nodrop 1000 $OUT/nb.json & nbpid=$!; sleep 3; fi
  t0=$(date +%s.%N)
  if [ "$pol" = passive ]; then OMP_WAIT_POLICY=PASSIVE $PY train.py $ARGS --out $out > $out.log 2>&1
  else env -u OMP_WAIT_POLICY $PY train.py $ARGS --out $out > $out.log 2>&1; fi
  t1=$(date +%s.%N)
  [ -n "$nbpid" ] && kill $nbpid 2>/dev/null; wait 2>/dev/null
  echo "demo $pol $nb $rep wall $(python3 -c "print(round($t1-$t0,1))") $(grep -o 'exact match after.*' $out.log | head -1)"
}
for rep in 1 2; do for nb in alone bench2t; do for pol in spinning passive; do one $pol $nb $rep; done; done; done
