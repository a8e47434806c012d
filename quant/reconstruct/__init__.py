"""Post-training reconstruction (Q-Diffusion's core, shared with TFMQ-DM and EDA-DM): AdaRound weights and block /
layer reconstruction, streamed unit by unit with a bounded cache, resumable per unit.

Entry point for quant_scripts/02: ``run_ptq(fp_unet, config, calib, run_dir, timesteps, ...)`` -> QuantUNet.
Pieces: ``units`` (what a unit is, forward order), ``cache`` (bounded micro-batch cache), ``solver`` (Adam over a
unit), ``objectives`` (what is trained and the loss), ``driver`` (the streaming walk), ``state`` (resume),
``act_init`` (activation init + running statistics), ``ptq`` (the session a PTQ method composes); the methods' own
pieces: ``tib`` / ``fsc`` (TFMQ-DM), ``fbr`` (EDA-DM's objective with QDrop).
"""
from ldm.util import UserError


def run_ptq(fp_unet, config, calib, run_dir, timesteps, progress=False, model_id=None):
    """Quantize and reconstruct ``fp_unet`` (left unchanged; a copy is quantized on the same device) with a
    post-training method's config.

    calib: a loaded calib.pt artifact ({"meta", "x", "t", "context"?}); the method selects its rows
    (Q-Diffusion, TFMQ-DM: cali_st steps x cali_n samples; a handler with ``select_rows`` its own, EDA-DM's TDAC).
    run_dir: where the resumable state (``recon/``) lives.
    timesteps: the sampling schedule recorded in the model's meta. model_id: an identity of the FP model for the
    resume fingerprint (default: ldm.generate.model_fingerprint). Returns the QuantUNet; its ``ptq_log``
    attribute holds per-unit losses and stage times.
    """
    from quant.api import get_method
    from quant.calib_select import select_calibration
    from quant.policy import model_family
    from quant.reconstruct.ptq import PTQSession

    _, handler = get_method(config.method)
    if getattr(handler, "training", None) != "ptq":
        raise UserError(f"method {config.method!r} is not a post-training method; quantize it with the naive "
                        "calibration stage instead.")
    selection = None
    if hasattr(handler, "select_rows"):     # a method's own sample selection (EDA-DM: TDAC, which needs the FP UNet)
        device = next(fp_unet.parameters()).device
        rows, selection = handler.select_rows(calib, config, fp_unet.eval(), model_family(fp_unet), device)
    else:
        rows = select_calibration(calib, config.cali_st, config.cali_n)
    if hasattr(handler, "check_calibration"):   # a method's own demands on calib.pt, before anything is written
        handler.check_calibration(calib, config, timesteps)
    session = PTQSession(fp_unet, config, rows, run_dir, timesteps, model_id=model_id, progress=progress,
                         unit_classes=getattr(handler, "unit_classes", None))
    session.calib = calib        # a method may select further rows from it (TFMQ-DM: every step for FSC)
    session.log["rows"] = int(rows["t"].shape[0])
    if selection is not None:
        session.log["selection"] = selection
    qunet = handler.run_ptq(session)
    qunet.ptq_log = session.log
    return qunet


def discard_state(run_dir, cache_dir=""):
    """Remove a reconstruction's resume state (``run_dir/recon``) and the shards and owner mark of its cache: after
    the result is saved, or to start over."""
    import os
    import shutil

    from quant.reconstruct.cache import clear_dir

    if cache_dir:
        clear_dir(cache_dir)
        mark = os.path.join(cache_dir, "OWNER")
        if os.path.exists(mark):
            os.remove(mark)
    shutil.rmtree(os.path.join(os.fspath(run_dir), "recon"), ignore_errors=True)
