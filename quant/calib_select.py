"""Time-step-aware calibration selection (Q-Diffusion, PEERS.md §1.6) from a recorder's trajectories (calib.pt).

calib.pt (quant_scripts/01) holds x [N,...], t [N], optional context [N,...]: ``n_entries`` UNet calls in sampling
order (``calib_batches`` runs of n_entries / calib_batches steps each), ``rows_per_entry`` rows per call. With
classifier-free guidance an entry holds the uncond rows of its ``calib_batch`` trajectories first, then the cond
rows (rows_per_entry = 2·calib_batch). Selection: steps {0, s, 2s, ...} (cali_st of them, s = steps per run // cali_st;
step 0 is the noisiest) and the first cali_n trajectories (samples) at each; with guidance both the uncond and the
cond row of a sample are taken, so a conditional model gets 2·cali_n rows per step.
"""
import torch

from ldm.util import UserError

_NEEDED = ("n_entries", "rows_per_entry", "calib_steps", "calib_batch", "calib_batches")


def selected_steps(n_steps, cali_st):
    """The step indices {0, s, 2s, ...} (cali_st of them) with s = n_steps // cali_st."""
    if not 1 <= cali_st <= n_steps:
        raise UserError(f"cali_st must be between 1 and the {n_steps} recorded sampling steps, got {cali_st}.")
    s = n_steps // cali_st
    return [i * s for i in range(cali_st)]


def trajectory_layout(meta):
    """How calib.pt's rows are laid out: {"n_steps" (per run), "rows_per_entry", "calib_batch", "calib_batches",
    "paired" (uncond + cond rows per entry)}; a UserError for a file that does not add up."""
    missing = [k for k in _NEEDED if k not in meta]
    if missing:
        raise UserError(f"calib.pt has no {missing[0]!r} in its meta; re-record it with "
                        "quant_scripts/01_collect_input_4_calib.py.")
    batch, batches = int(meta["calib_batch"]), int(meta["calib_batches"])
    # the steps a trajectory really took (entries per run): CompVis's uniform spacing turns a non-divisor request
    # into more steps (400 of 1000 -> stride 2 -> 500)
    if batches < 1 or int(meta["n_entries"]) % batches:
        raise UserError(f"calib.pt holds {meta['n_entries']} entries, which is not {batches} equal runs; re-record it.")
    n_steps = int(meta["n_entries"]) // batches
    per_entry = int(meta["rows_per_entry"])
    if per_entry not in (batch, 2 * batch):
        raise UserError(f"calib.pt holds {meta['n_entries']} entries of {per_entry} rows, which is not "
                        f"{batches} runs of {n_steps} steps with {batch} trajectories; re-record it.")
    return {"n_steps": n_steps, "rows_per_entry": per_entry, "calib_batch": batch, "calib_batches": batches,
            "paired": per_entry == 2 * batch}


def selected_rows(meta, cali_st, cali_n):
    """(row indices into calib.pt, step index of each row), ordered by step, uncond rows before cond rows."""
    layout = trajectory_layout(meta)
    n_steps, per_entry, paired = layout["n_steps"], layout["rows_per_entry"], layout["paired"]
    batch, batches = layout["calib_batch"], layout["calib_batches"]
    if not 1 <= cali_n <= batch * batches:
        raise UserError(f"cali_n must be between 1 and the {batch * batches} recorded trajectories, got {cali_n}; "
                        "record more with quant_scripts/01_collect_input_4_calib.py --calib_batch/--calib_batches.")
    rows, steps = [], []
    for k in selected_steps(n_steps, cali_st):
        halves = ([], []) if paired else ([],)
        for sample in range(cali_n):
            run, i = divmod(sample, batch)
            start = (run * n_steps + k) * per_entry
            halves[0].append(start + i)                 # the uncond row (or the only row)
            if paired:
                halves[1].append(start + batch + i)     # its cond row
        for h in halves:
            rows += h
            steps += [k] * len(h)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(steps, dtype=torch.long)


def check_row_count(calib):
    """calib.pt holds as many rows as its meta announces."""
    meta, n = calib["meta"], int(calib["t"].shape[0])
    if n != int(meta["n_entries"]) * int(meta["rows_per_entry"]):
        raise UserError(f"calib.pt holds {n} rows but its meta announces "
                        f"{meta['n_entries']} x {meta['rows_per_entry']}; re-record it.")


def select_calibration(calib, cali_st, cali_n):
    """{"x", "t", "context" (or None), "step"} of the selected rows of a loaded calib.pt artifact."""
    rows, steps = selected_rows(calib["meta"], cali_st, cali_n)
    check_row_count(calib)
    context = calib.get("context")
    return {"x": calib["x"][rows], "t": calib["t"][rows],
            "context": None if context is None else context[rows], "step": steps}
