"""InceptionV3 features for IS / FID / sFID / precision-recall through torch-fidelity's TF-ported network.

torch-fidelity's FeatureExtractorInceptionV3 reproduces the 2015 TF graph the ADM evaluator uses (TF-style
bilinear resize to 299, (x-128)/128, TF padding quirks). We take from it:
  pool    '2048'            : pool_3, for FID and precision/recall;
  logits  'logits_unbiased' : pool_3 @ W of the softmax layer without its bias, which is what the ADM
                              evaluator feeds to its softmax for IS (1008 classes);
  spatial mixed_6/conv      : a forward hook on Mixed_6d.branch1x1 (conv + BN + ReLU, 192 x 17 x 17), first
                              7 channels flattened in TF's HWC order -> 2023-d, for sFID (EVALUATION.md).
The weights are never downloaded here: they are read from torch-fidelity's cache (torch hub checkpoints dir)
or from a path given by argument or MPQDM_INCEPTION_WEIGHTS, and loaded weights-only.
"""
import io
import os

import numpy as np
import torch

from ldm.util import UserError

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
# pytorch-fid ships the same TF conversion under this name with the same state-dict keys
ALT_WEIGHTS_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth",)
WEIGHTS_ENV = "MPQDM_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023


def default_weights_dir():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def resolve_inception_weights(path=None):
    """Path of the Inception weights: argument, else $MPQDM_INCEPTION_WEIGHTS, else torch-fidelity's cache."""
    candidates = [path] if path else []
    if not candidates and os.environ.get(WEIGHTS_ENV):
        candidates = [os.environ[WEIGHTS_ENV]]
    if not candidates:
        candidates = [os.path.join(default_weights_dir(), name) for name in (WEIGHTS_FILENAME,) + ALT_WEIGHTS_FILENAMES]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise UserError(
        f"InceptionV3 weights file {WEIGHTS_FILENAME} was not found at {candidates[0]}: download it from "
        f"{WEIGHTS_URL} and put it in {default_weights_dir()} or point {WEIGHTS_ENV} (or --inception-weights) at it")


def _safe_state_dict(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file that needs arbitrary unpickling is refused, not executed
        raise UserError(f"could not load {path} as a weights-only InceptionV3 state dict ({type(err).__name__})")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "Mixed_6d.branch1x1.conv.weight" not in state:
        raise UserError(f"{path} is not an InceptionV3 state dict with torch-fidelity's key names")
    return state


class InceptionExtractor:
    """uint8 NHWC images of any size -> dict(pool [N,2048], spatial [N,2023], logits [N,1008])."""

    name = "inception-v3-torch-fidelity"

    def __init__(self, weights_path=None, batch_size=64, device="cpu"):
        self.weights_path = resolve_inception_weights(weights_path)  # fail fast, before the slow import
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        state = _safe_state_dict(self.weights_path)
        # torch-fidelity unpickles its weights file with weights_only=False; handing it a buffer we just
        # serialised from plain tensors keeps untrusted pickles out of that call.
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=buf)
        except RuntimeError as err:
            raise UserError(f"{self.weights_path} does not match torch-fidelity's InceptionV3 ({str(err)[:120]})")
        self.net.to(device)
        self.device = device
        self.batch_size = batch_size
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # TF's mixed_6/conv is NHWC; keep its first 7 channels and flatten h, w, c in that order
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).to(torch.float32)

    def describe(self):
        import torch_fidelity

        return {"extractor": self.name, "torch_fidelity": torch_fidelity.__version__,
                "weights": os.path.basename(self.weights_path),
                "features": {"pool": "2048", "logits": "logits_unbiased", "spatial": "Mixed_6d.branch1x1[:7]"}}

    @torch.no_grad()
    def __call__(self, images_uint8):
        images = np.asarray(images_uint8)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise UserError(f"Inception features need uint8 images [N,H,W,3], got {images.dtype} {images.shape}")
        out = {"pool": [], "spatial": [], "logits": []}
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.array(images[i:i + self.batch_size])).permute(0, 3, 1, 2)  # copy: may be read-only
            pool, logits = self.net(x.contiguous().to(self.device))
            out["pool"].append(pool.cpu().numpy())
            out["logits"].append(logits.cpu().numpy())
            out["spatial"].append(self._spatial.cpu().numpy())
        return {k: np.concatenate(v, axis=0) for k, v in out.items()}
