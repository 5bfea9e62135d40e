#!/usr/bin/env bash
# Issue 2/10 acceptance: convnet on the full Fashion-MNIST, fp32 then QAT at 8 (server, mobile), 4 and 2 bits,
# int8 export of the 8-bit runs; the 4/2-bit runs also with the old body-width edges (quant.edge_bits=0, the
# tie artefact of issue 10) and 2-bit with learned ranges. Resumable: re-run to continue.
# Results: runs/acceptance/*/results.json and runs/acceptance/eval.jsonl (accuracy + tie rate per run).
set -euo pipefail
cd "$(dirname "$0")/.."
Q=".venv/bin/qrobust"
R=runs/acceptance
QAT="--config configs/fmnist-convnet-qat.toml quant.init=$R/fp32 --no-progress"
$Q train --config configs/fmnist-convnet.toml --out $R/fp32 --no-progress
# QAT fine-tunes from the float model (2 epochs at 8 bits, 3 at 4 and 2 bits)
$Q train $QAT train.epochs=2 --out $R/q8-server
$Q train $QAT train.epochs=2 quant.backend=mobile --out $R/q8-mobile
$Q train $QAT quant.bits=4 --out $R/q4
$Q train $QAT quant.bits=2 --out $R/q2
$Q train $QAT quant.bits=2 quant.act_range=learned --out $R/q2-learned
$Q train $QAT quant.bits=4 quant.edge_bits=0 --out $R/q4-edges-follow-body
$Q train $QAT quant.bits=2 quant.edge_bits=0 --out $R/q2-edges-follow-body
$Q export $R/q8-server
$Q export $R/q8-mobile
rm -f $R/eval.jsonl
for run in fp32 q8-server q8-mobile q4 q2 q2-learned q4-edges-follow-body q2-edges-follow-body; do
  $Q eval $R/$run | python3 -c "import json,sys; d=json.load(sys.stdin); d['run']='$run'; print(json.dumps(d))" >> $R/eval.jsonl
done
cat $R/eval.jsonl
