# Sourced by the experiments' run scripts: the clock (t0, left, hms) and, on the GPU machine, the wheels of the
# libraries it lacks and the Fashion-MNIST idx files, carried in .whl and .data. Prepared once in the project's root:
#   mkdir -p .whl .data && cp ../shared/device/wheels/*.whl .whl/ && cp -r /usr/share/datasets/fashion-mnist .data/
# and named in the run's carry: [".whl", ".data"] (both git-ignored; about 60 MB with the repository).
t0=$(date +%s)
left() { echo $((DEADLINE_S - ($(date +%s) - t0))); }
hms() { printf "00:%02d:%02d:%02d" $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }
if [ "$ACCEL" = gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  if [ -d .data/fashion-mnist ]; then
    mkdir -p /usr/share/datasets && ln -sfn "$PWD/.data/fashion-mnist" /usr/share/datasets/fashion-mnist
  fi
  nvidia-smi -L
fi
# seconds, not minutes of starting processes, before anything is spent: the libraries the runs import
python3 -c "import diffusers, lpips, torch_fidelity, jsonargparse, dmd_lightning.cli" \
  || { echo "preflight: a library is missing"; exit 1; }
