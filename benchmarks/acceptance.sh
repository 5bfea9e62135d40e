#!/usr/bin/env bash
# Issue 2 acceptance: convnet on the full Fashion-MNIST, fp32 then QAT at 8 (server, mobile), 4 and 2 bits,
# int8 export of the 8-bit runs. Resumable: re-run to continue. Results: runs/acceptance/*/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=".venv/bin/qrobust"
R=runs/acceptance
$Q train --config configs/fmnist-convnet.toml --out $R/fp32 --no-progress
# QAT fine-tunes from the float model (2 epochs at 8 bits, 3 at 4 and 2 bits)
$Q train --config configs/fmnist-convnet-qat.toml quant.init=$R/fp32 train.epochs=2 --out $R/q8-server --no-progress
$Q train --config configs/fmnist-convnet-qat.toml quant.init=$R/fp32 train.epochs=2 quant.backend=mobile --out $R/q8-mobile --no-progress
$Q train --config configs/fmnist-convnet-qat.toml quant.init=$R/fp32 quant.bits=4 --out $R/q4 --no-progress
$Q train --config configs/fmnist-convnet-qat.toml quant.init=$R/fp32 quant.bits=2 --out $R/q2 --no-progress
$Q export $R/q8-server
$Q export $R/q8-mobile
