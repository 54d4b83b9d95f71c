#!/usr/bin/env bash
# Make Fashion-MNIST available offline: Debian's dataset-fashion-mnist package puts the original
# gzipped IDX files in /usr/share/datasets/fashion-mnist/, where normsearch looks first.
# Elsewhere (no apt, not root) normsearch falls back to torchvision's download on first use.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian package dataset-fashion-mnist (Fashion-MNIST, 30 MB)"
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST on first use" >&2
else
  echo "Fashion-MNIST not in $dir; torchvision will download it on first use" >&2
fi
exit 0
