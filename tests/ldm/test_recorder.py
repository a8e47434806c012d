"""record_unet_inputs(): UNet inputs along a sampling run, [uncond; cond] per step, hook removed on exit."""
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from refdata import build_tiny_ldm, close_latent


class SeparateCallsDDIM(DDIMSampler):
    """Evaluates the two guidance branches in two UNet calls (cond first if cond_first)."""

    cond_first = False

    def get_model_output(self, x, t, c, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
                         score_corrector=None, corrector_kwargs=None):
        if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
            return self.model.apply_model(x, t, c)
        if self.cond_first:
            e_c = self.model.apply_model(x, t, c)
            e_u = self.model.apply_model(x, t, unconditional_conditioning)
        else:
            e_u = self.model.apply_model(x, t, unconditional_conditioning)
            e_c = self.model.apply_model(x, t, c)
        return e_u + unconditional_guidance_scale * (e_c - e_u)


@pytest.fixture(scope="module")
def cin():
    record, model = build_tiny_ldm("e_ldm_cin_tiny.sampling")
    with torch.no_grad():
        c = model.get_learned_conditioning({"class_label": record["class_embedder"]["labels"]})
        uc = model.get_learned_conditioning({"class_label": record["class_embedder"]["uc_labels"]})
    return record, model, c, uc


def _sample(model, sampler_cls, run, c, uc, recorder_kwargs=None):
    torch.manual_seed(run["torch_seed_before_sample"])
    with model.record_unet_inputs(**(recorder_kwargs or {})) as rec:
        sampler_cls(model).sample(S=run["S"], batch_size=2, shape=run["shape"], conditioning=c, eta=run["eta"],
                                  x_T=run["x_T"].clone(), unconditional_guidance_scale=3.0,
                                  unconditional_conditioning=uc, verbose=False, progress=False)
    return rec.entries


def test_ddim_guidance_records_one_uncond_cond_entry_per_step(cin):
    record, model, c, uc = cin
    run = record["runs"]["ddim_S5_eta0_cfg3"]
    entries = _sample(model, DDIMSampler, run, c, uc)
    assert len(entries) == run["S"] == 5
    for entry, call, t in zip(entries, run["model_calls"], run["step_timesteps"].tolist()):
        assert set(entry) == {"x", "t", "context"}
        assert entry["x"].device.type == "cpu" and entry["x"].dtype == torch.float32
        assert entry["t"].dtype == torch.long and entry["t"].tolist() == [t] * 4
        assert torch.equal(entry["context"][:2], uc) and torch.equal(entry["context"][2:], c)  # uncond first
        close_latent(entry["x"], call["x"])  # the original's batched input
    assert not model.model.diffusion_model._forward_pre_hooks


@pytest.mark.parametrize("cond_first", [False, True])
def test_separate_cond_uncond_calls_merge_into_the_same_entries(cin, cond_first):
    record, model, c, uc = cin
    run = record["runs"]["ddim_S5_eta0_cfg3"]
    sampler_cls = type("S", (SeparateCallsDDIM,), {"cond_first": cond_first})
    entries = _sample(model, sampler_cls, run, c, uc, {"uncond_context": uc} if cond_first else None)
    assert len(entries) == 5
    for entry, call in zip(entries, run["model_calls"]):
        assert torch.equal(entry["t"], call["t"])
        assert torch.equal(entry["context"][:2], uc) and torch.equal(entry["context"][2:], c)
        close_latent(entry["x"], call["x"])


def test_plms_lookahead_call_stays_a_separate_entry(cin):
    record, model, c, uc = cin
    run = record["runs"]["plms_S5_cfg3"]
    entries = _sample(model, PLMSSampler, run, c, uc)
    assert [int(e["t"][0]) for e in entries] == [int(call["t"][0]) for call in run["model_calls"]]
    assert len(entries) == 6 and all(e["x"].shape[0] == 4 for e in entries)


@pytest.fixture(scope="module")
def digits():
    """(model, context of two classes) of the shipped digits LDM (no reference data needed)."""
    import os

    from ldm.presets import get_preset, load_preset_model
    if not os.path.isfile(get_preset("digits").ckpt_path):
        pytest.skip("the shipped digits checkpoint is missing (scripts/train_digits_ldm.py)")
    model = load_preset_model("digits", "cpu")
    with torch.no_grad():
        c = model.get_learned_conditioning({"class_label": torch.tensor([1, 2])})
    return model, c


def test_hook_removed_after_exit_even_on_error(digits):
    model, c = digits
    unet = model.model.diffusion_model
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 5])
    with pytest.raises(RuntimeError, match="boom"):
        with model.record_unet_inputs() as rec:
            with torch.no_grad():
                model.apply_model(x, t, c)
            raise RuntimeError("boom")
    assert len(rec.entries) == 1 and not unet._forward_pre_hooks
    with torch.no_grad():
        model.apply_model(x, t, c)
    assert len(rec.entries) == 1
