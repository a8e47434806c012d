#!/usr/bin/env bash
# Download the official CompVis latent-diffusion checkpoints (needs internet; never run by the tests).
# Usage: bash scripts/download_models.sh [cin256-v2|lsun_bedrooms|lsun_churches|celebahq|ffhq|sd-v1-4|cifar10|cifar10-nonema|all]
# cifar10: the DDIM-paper CIFAR-10 DDPM (EMA weights, the file Q-Diffusion / TFMQ-DM / EDA-DM quantize) goes to
# models/ddim/cifar10/model-790000.ckpt, where the cifar10 preset and ddim.checkpoint look; cifar10-nonema (the
# non-EMA weights, same keys) to models/ddim/cifar10-nonema/model-790000.ckpt. Both are checked against the MD5s
# of ermongroup/ddim's functions/ckpt_util.py.
set -euo pipefail
cd "$(dirname "$0")/.."

fetch() {  # fetch URL DEST
  mkdir -p "$(dirname "$2")"
  if [ -f "$2" ]; then echo "exists: $2"; return; fi
  echo "downloading $1 -> $2"
  wget -c -O "$2.part" "$1" && mv "$2.part" "$2"
}

fetch_zip() {  # fetch_zip URL DIR  (the zips hold model.ckpt)
  if [ -f "$2/model.ckpt" ]; then echo "exists: $2/model.ckpt"; return; fi
  fetch "$1" "$2/model.zip"
  (cd "$2" && unzip -o model.zip && rm -f model.zip)
}

check_md5() {  # check_md5 FILE MD5
  local got
  got=$(md5sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then echo "MD5 mismatch for $1 (got $got, expected $2); delete it and retry" >&2; exit 1; fi
}

what=${1:-cin256-v2}
case "$what" in
  cin256-v2|all)      fetch "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt" models/ldm/cin256-v2/model.ckpt ;;&
  lsun_bedrooms|all)  fetch_zip "https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip" models/ldm/lsun_beds256 ;;&
  lsun_churches|all)  fetch_zip "https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip" models/ldm/lsun_churches256 ;;&
  celebahq|all)       fetch_zip "https://ommer-lab.com/files/latent-diffusion/celeba.zip" models/ldm/celeba256 ;;&
  ffhq|all)           fetch_zip "https://ommer-lab.com/files/latent-diffusion/ffhq.zip" models/ldm/ffhq256 ;;&
  sd-v1-4|all)        fetch "https://huggingface.co/CompVis/stable-diffusion-v-1-4-original/resolve/main/sd-v1-4.ckpt" models/ldm/stable-diffusion-v1/model.ckpt ;;&
  cifar10|all)        fetch "https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1" models/ddim/cifar10/model-790000.ckpt
                      check_md5 models/ddim/cifar10/model-790000.ckpt 1fa350b952534ae442b1d5235cce5cd3 ;;&
  cifar10-nonema)     fetch "https://heibox.uni-heidelberg.de/f/869980b53bf5416c8a28/?dl=1" models/ddim/cifar10-nonema/model-790000.ckpt
                      check_md5 models/ddim/cifar10-nonema/model-790000.ckpt 82ed3067fd1002f5cf4c339fb80c4669 ;;&
  cin256-v2|lsun_bedrooms|lsun_churches|celebahq|ffhq|sd-v1-4|cifar10|cifar10-nonema|all) ;;
  *) echo "unknown model '$what'; choose cin256-v2, lsun_bedrooms, lsun_churches, celebahq, ffhq, sd-v1-4, cifar10, cifar10-nonema or all" >&2; exit 2 ;;
esac
