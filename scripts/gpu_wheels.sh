#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check.sh needs on a GPU machine without internet
# (Python 3.12, x86_64, torch 2.11 preinstalled: the lent H200's image) into .whl/
# (gitignored). Run it on a machine that reaches the package registry:
#
#   bash scripts/gpu_wheels.sh [DEST]          # default DEST: .whl
#
# The list is exactly what the project imports and that image lacks (its package list:
# torch, triton, numpy, pandas, pyarrow, tokenizers, tensorboard, safetensors, einops,
# fsspec, huggingface-hub, pyyaml, requests, tqdm, xxhash, typing-extensions, ... are
# there), read from each wheel's Requires-Dist:
#   torchtitan 0.2.2  -> torchdata, tyro, datasets, tokenizers*, tomli (3.12 has tomllib),
#                        fsspec*, tensorboard*, einops*, pillow*
#   torchdata 0.11.0  -> requests*, torch*, urllib3*
#   tyro 1.0.17       -> docstring-parser, typeguard, typing-extensions*
#   datasets 5.2.0    -> dill (<0.4.2), multiprocess (<0.70.20), filelock*, numpy*, pyarrow*,
#                        pandas*, tqdm*, xxhash*, fsspec*, huggingface-hub*, packaging*, pyyaml*
#   multiprocess      -> dill;  typeguard -> typing-extensions*
#   torchao 0.18.0    -> (none); float8 training; its C++ parts need torch >= 2.11
# (* = already on the GPU machine.) --no-deps: nothing else is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
WHEELS=(
  torchtitan==0.2.2
  torchdata==0.11.0
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  torchao==0.18.0
)
mkdir -p "$DEST"
# One version of each package: an older wheel of the same name would stop the install.
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  rm -f "$DEST/${name//-/_}"-*.whl "$DEST/${name}"-*.whl
done
python3 -m pip download --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
echo "wheels in $DEST:"
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
