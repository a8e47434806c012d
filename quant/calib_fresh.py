"""TFMQ-DM's calibration data (PEERS.md §3.4): for every sampling step k, a FRESH FP run from new noise, stopped right
after step k, keeps only the UNet input (x_k, t_k) of that step; so no two steps' rows share a trajectory.

The entries come out in the layout of recorded trajectories (``n_steps`` entries per batch, sampling order, uncond
rows first with guidance), so quant.calib_select selects from them unchanged. The cost is n(n+1)/2 sampling steps
per batch instead of n (PLMS: one look-ahead call more per run past the first step). The model is not edited: the
LDM family's recorder hooks the UNet, and a second hook stops the run at the first call below step k's timestep
(timesteps only decrease along a run); the pixel family's step callback does both.
"""
import torch


class _Stop(Exception):
    """Raised by a hook once the wanted step's input is recorded."""


def unet_calls(n_steps, sampler="ddim"):
    """UNet calls (one per step and batch, as a CFG call counts once) of the fresh runs for one batch."""
    return n_steps * (n_steps + 1) // 2 + (n_steps - 1 if sampler == "plms" else 0)


@torch.no_grad()
def _ldm_prefix(fam, t_k, x_T, cond, uncond, scale, steps, eta, sampler, skip_type, generator):
    unet = fam.model.model.diffusion_model

    def stop(_module, args, kwargs):     # timesteps only decrease: a call below t_k belongs to a later step
        t = args[1] if len(args) > 1 else kwargs.get("timesteps")
        if int(torch.as_tensor(t).reshape(-1)[0]) < t_k:
            raise _Stop
    # before the recorder's hook, so the stopped call is not recorded (PLMS's look-ahead at t_{k} is, and the real
    # call of step k comes after it)
    handle = unet.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        with fam.model.record_unet_inputs(uncond_context=uncond) as rec:
            try:
                fam.sample(x_T, cond, uncond, scale, steps, eta, sampler, skip_type, generator)
            except _Stop:
                pass
    finally:
        handle.remove()
    return rec.entries[-1]


@torch.no_grad()
def _pixel_prefix(fam, k, x_T, steps, eta, skip_type, generator):
    kept = []

    def keep(step):
        if step["i"] == k:
            x = step["x"].detach().to("cpu", copy=True)
            kept.append({"x": x, "t": torch.full((x.shape[0],), int(step["t"]), dtype=torch.long), "context": None})
            raise _Stop
    try:
        fam.sample(x_T, None, None, 1.0, steps, eta, "ddim", skip_type, generator, callback=keep)
    except _Stop:
        pass
    return kept[0]


def record_fresh_per_step(fam, draw, scale, steps, eta, sampler="ddim", skip_type=None, progress=False):
    """One entry per step k (sampling order) of a batch, each from a fresh run stopped after step k.

    draw(k) -> (x_T, cond, uncond, generator): the new noise, conditioning and sampler-noise generator of run k."""
    from tqdm.auto import tqdm

    descending = sorted(fam.sampling_timesteps(steps, sampler, skip_type), reverse=True)
    n_steps = len(descending)
    entries = []
    for k in tqdm(range(n_steps), desc="fresh runs", disable=not progress):
        x_T, cond, uncond, generator = draw(k)
        if fam.family == "pixel":
            entry = _pixel_prefix(fam, k, x_T, steps, eta, skip_type, generator)
        else:
            entry = _ldm_prefix(fam, descending[k], x_T, cond, uncond if scale != 1.0 else None, scale, steps, eta,
                                sampler, skip_type, generator)
        if fam.family != "pixel" and int(entry["t"][0]) != descending[k]:
            raise RuntimeError(f"the fresh run for step {k} stopped at timestep {int(entry['t'][0])}, "
                               f"not {descending[k]}")
        entries.append(entry)
    return entries
