#!/usr/bin/env bash
# Download the official CompVis latent-diffusion checkpoints (needs internet; never run by the tests).
# Usage: bash scripts/download_models.sh [cin256-v2|lsun_bedrooms|lsun_churches|celebahq|ffhq|sd-v1-4|all]
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

what=${1:-cin256-v2}
case "$what" in
  cin256-v2|all)      fetch "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt" models/ldm/cin256-v2/model.ckpt ;;&
  lsun_bedrooms|all)  fetch_zip "https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip" models/ldm/lsun_beds256 ;;&
  lsun_churches|all)  fetch_zip "https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip" models/ldm/lsun_churches256 ;;&
  celebahq|all)       fetch_zip "https://ommer-lab.com/files/latent-diffusion/celeba.zip" models/ldm/celeba256 ;;&
  ffhq|all)           fetch_zip "https://ommer-lab.com/files/latent-diffusion/ffhq.zip" models/ldm/ffhq256 ;;&
  sd-v1-4|all)        fetch "https://huggingface.co/CompVis/stable-diffusion-v-1-4-original/resolve/main/sd-v1-4.ckpt" models/ldm/stable-diffusion-v1/model.ckpt ;;&
  cin256-v2|lsun_bedrooms|lsun_churches|celebahq|ffhq|sd-v1-4|all) ;;
  *) echo "unknown model '$what'; choose cin256-v2, lsun_bedrooms, lsun_churches, celebahq, ffhq, sd-v1-4 or all" >&2; exit 2 ;;
esac
