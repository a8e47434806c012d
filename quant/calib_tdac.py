"""EDA-DM's TDAC (Temporal Distribution Alignment Calibration, PEERS.md §2.1): how many calibration samples each
sampling step contributes, from the density and variety of the UNet's middle-attention input features across steps.

From calib.pt's trajectories (quant_scripts/01, one entry per step, sampling order, step 0 the noisiest):
1. features F_k: the input of the middle attention block (CompVis ``middle_block.1``, DDIM ``mid.attn_1``) of the
   FP UNet on the FIRST batch of trajectories at every step k (all its rows: uncond and cond with guidance);
2. density D_k = #{j != k : mean((F_k - F_j)^2) <= r};
3. variety V_k = sum over j != k and every (sample, pixel) of 1 - cos(F_k, F_j), the cosine over channels (eps 1e-6);
4. weights w_k = D^_k + λ·V^_k with D^, V^ min-max normalised over k (a constant vector normalises to 0 [T]);
5. counts n_k = round(N·w_k / Σw) (half to even, as Python's and NumPy's round), then the released rule makes them
   sum to N exactly: if short, +1 to the steps in descending order of n_k (ties: the earlier step first); if over,
   -1 to the latest steps with n_k > 0, going back from the last step; both repeat over the steps until Σ n_k = N;
6. assignment: the list [k repeated n_k times], permuted by a seeded generator; calibration sample i is trajectory
   i at step k_i, so N distinct trajectories give N samples (2 rows each with guidance: uncond and cond).
``uniform=True`` gives every step the same weight (the "TDAC off" ablation: uniform steps, same rounding rule and
assignment).
"""
import torch
import torch.nn.functional as F

from ldm.util import UserError
from quant.calib_select import check_row_count, trajectory_layout

MIDDLE_ATTENTION = {"compvis_unet": "middle_block.1", "ddim_model": "mid.attn_1"}
COS_EPS = 1e-6


# ------------------------------------------------------------------------------------------- statistics
def density(features, radius):
    """D_k = #{j != k : mean((F_k - F_j)^2) <= radius} over the steps of ``features`` [K, ...]."""
    flat = features.reshape(features.shape[0], -1)
    gram = (flat @ flat.T).double().cpu()             # [K, K] in the features' precision: no [K, K, D] tensor
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0) / flat.shape[1]
    close = dist <= radius
    close.fill_diagonal_(False)
    return close.sum(1).double()


def variety(features):
    """V_k = Σ_{j != k} Σ_{n,h,w} (1 - cos_c(F_k, F_j)) over the steps of ``features`` [K, R, C, ...]."""
    out = torch.zeros(features.shape[0], dtype=torch.float64)
    for a in range(features.shape[0]):   # one step against all: [K, R, H, W] cosines, summed in float64
        cos = F.cosine_similarity(features[a:a + 1], features, dim=2, eps=COS_EPS)
        per_step = (1 - cos).flatten(1).double().sum(1).cpu()
        out[a] = per_step.sum() - per_step[a]
    return out


def minmax(v):
    span = v.max() - v.min()
    return torch.zeros_like(v) if span == 0 else (v - v.min()) / span


def step_weights(features, radius, lam):
    """(w, D, V): w_k = minmax(D)_k + λ·minmax(V)_k."""
    d, v = density(features, radius), variety(features)
    return minmax(d) + lam * minmax(v), d, v


def allocate(weights, n):
    """Integer counts per step proportional to ``weights`` that sum exactly to ``n`` (the released rounding rule,
    see the module docstring); a zero weight vector is read as uniform."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    counts = [int(round(n * float(x) / float(w.sum()))) for x in w]   # round(): half to even
    k = len(counts)
    short = n - sum(counts)
    if short > 0:
        order = sorted(range(k), key=lambda i: (-counts[i], i))
        for j in range(short):
            counts[order[j % k]] += 1
    while sum(counts) > n:
        for i in reversed(range(k)):
            if sum(counts) == n:
                break
            if counts[i] > 0:
                counts[i] -= 1
    return counts


def assign(counts, seed):
    """Step of each calibration sample i: [k repeated counts[k]] under one seeded permutation."""
    steps = torch.tensor([k for k, c in enumerate(counts) for _ in range(c)], dtype=torch.long)
    return steps[torch.randperm(len(steps), generator=torch.Generator().manual_seed(seed))]


# ------------------------------------------------------------------------------------------- calib.pt
@torch.no_grad()
def middle_features(fp_unet, calib, family, device, micro_batch=64):
    """F [K, R, C, ...]: the middle attention block's input on the first batch of trajectories at every step (kept
    on ``device``: at LSUN's 200 steps they are gigabytes, and the statistics are cheapest where they are)."""
    from quant.reconstruct.driver import CalibrationRows, capture_inputs

    layout = trajectory_layout(calib["meta"])
    hook = MIDDLE_ATTENTION[family]
    try:
        fp_unet.get_submodule(hook)
    except AttributeError:
        raise UserError(f"TDAC reads the input of the middle attention block {hook!r}, which this UNet lacks "
                        "(a model without middle attention): run EDA-DM with --tdac off.") from None
    rows = CalibrationRows(calib["x"], calib["t"], calib.get("context"))
    per_entry = layout["rows_per_entry"]
    feats = []
    for k in range(layout["n_steps"]):
        idx = torch.arange(k * per_entry, (k + 1) * per_entry)        # run 0, entry k: all its rows
        parts = [capture_inputs(fp_unet, hook, rows.call_args(idx[i:i + micro_batch], device))[0][0]
                 for i in range(0, len(idx), micro_batch)]
        feats.append(torch.cat(parts))
    return torch.stack(feats)


def tdac_select(fp_unet, calib, family, n, radius, lam, seed, device, uniform=False):
    """({"x", "t", "context", "step"} of the N selected samples (uncond row, then cond row, per sample), log)."""
    layout = trajectory_layout(calib["meta"])
    check_row_count(calib)
    n_steps, batch, runs = layout["n_steps"], layout["calib_batch"], layout["calib_batches"]
    if not 1 <= n <= batch * runs:
        raise UserError(f"TDAC takes one sample per trajectory, so N = {n} needs {n} recorded trajectories; calib.pt "
                        f"holds {batch * runs}. Record more with quant_scripts/01_collect_input_4_calib.py "
                        "--calib_batch/--calib_batches, or lower --tdac_n.")
    log = {"n": n, "uniform": bool(uniform)}
    if uniform:
        weights = torch.ones(n_steps, dtype=torch.float64)
    else:
        features = middle_features(fp_unet, calib, family, device)
        weights, d, v = step_weights(features, radius, lam)
        log.update(density=d.tolist(), variety=v.tolist(), radius=radius, lam=lam)
    counts = allocate(weights, n)
    steps = assign(counts, seed)
    per_entry, paired = layout["rows_per_entry"], layout["paired"]
    rows, row_steps = [], []
    for i, k in enumerate(steps.tolist()):
        run, j = divmod(i, batch)
        start = (run * n_steps + k) * per_entry
        rows += [start + j] + ([start + batch + j] if paired else [])
        row_steps += [k] * (2 if paired else 1)
    idx = torch.tensor(rows, dtype=torch.long)
    context = calib.get("context")
    log.update(weights=weights.tolist(), counts=counts)
    return {"x": calib["x"][idx], "t": calib["t"][idx], "context": None if context is None else context[idx],
            "step": torch.tensor(row_steps, dtype=torch.long)}, log
