# Sourced by the experiments' run scripts: the clock (t0, left, hms) and, on the GPU machine, the wheels of the
# libraries it lacks and the Fashion-MNIST idx files carried in .whl and .data (see ../shared/device/README.md).
t0=$(date +%s)
left() { echo $((DEADLINE_S - ($(date +%s) - t0))); }
hms() { printf "00:%02d:%02d:%02d" $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }
if [ "$ACCEL" = gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  mkdir -p /usr/share/datasets && ln -sfn "$PWD/.data/fashion-mnist" /usr/share/datasets/fashion-mnist
  nvidia-smi -L
fi
