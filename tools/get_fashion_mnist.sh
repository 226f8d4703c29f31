#!/bin/sh
# make data: Fashion-MNIST into data/fashion-mnist/ (uncompressed IDX files).
# Looks in $FASHION_MNIST_DIR, then in Debian's dataset-fashion-mnist
# (/usr/share/datasets/fashion-mnist), installing that package when running
# as root or with password-less sudo; otherwise says what to do.
set -e
cd "$(dirname "$0")/.."
out=data/fashion-mnist
files="train-images-idx3-ubyte t10k-images-idx3-ubyte train-labels-idx1-ubyte t10k-labels-idx1-ubyte"
have() { for f in $files; do [ -s "$out/$f" ] || return 1; done; }
have && exit 0
find_src() {
    for d in "${FASHION_MNIST_DIR:-}" /usr/share/datasets/fashion-mnist; do
        [ -n "$d" ] && { [ -f "$d/train-images-idx3-ubyte.gz" ] || [ -f "$d/train-images-idx3-ubyte" ]; } && { echo "$d"; return 0; }
    done
    return 1
}
src=$(find_src) || {
    if [ "$(id -u)" -eq 0 ]; then
        echo "installing Debian's dataset-fashion-mnist ..."
        apt-get install -y -qq dataset-fashion-mnist >/dev/null || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        echo "installing Debian's dataset-fashion-mnist (sudo) ..."
        sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
    fi
    src=$(find_src) || {
        cat >&2 <<'MSG'
Fashion-MNIST not found. Either
  sudo apt-get install dataset-fashion-mnist      (Debian/Ubuntu; then run make again), or
  FASHION_MNIST_DIR=/path/to/dir make demo        (a directory with train-images-idx3-ubyte[.gz]
                                                   and t10k-images-idx3-ubyte[.gz], e.g. from
                                                   https://github.com/zalandoresearch/fashion-mnist)
MSG
        exit 1
    }
}
mkdir -p "$out"
for f in $files; do
    if [ -f "$src/$f.gz" ]; then gunzip -c "$src/$f.gz" > "$out/$f.tmp"; else cp "$src/$f" "$out/$f.tmp"; fi
    mv "$out/$f.tmp" "$out/$f"
done
echo "Fashion-MNIST from $src in $out"
