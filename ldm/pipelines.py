"""Model families behind one small interface: the questions that the sampling loop (ldm.generate), the calibration
recorder (quant_scripts/01) and the fine-tuning loop (quant.stages.finetune) ask of a model, answered once per family
so that no script carries a family ``if`` chain.

- ``LDMFamily``: a CompVis LatentDiffusion conditioned on a class (ClassEmbedder; the last embedding row is the null
  class of classifier-free guidance), on text (FrozenCLIPEmbedder; "" is the unconditional prompt) or on nothing.
  Samplers: ldm's DDIMSampler and PLMSSampler over the uniform DDIM timesteps (make_ddim_timesteps, +1 shift); decode
  = the first stage; fine-tuning trajectory = uniform DDIM with CompVis's ᾱ_prev (ᾱ_prev of the last step = ᾱ_0).
- ``PixelFamily``: the DDIM paper's pixel-space Model in ddim.pipeline.PixelDiffusion, unconditional. Sampler:
  generalized_steps (PixelDiffusion.sample) over the uniform or quad sequence; decode = identity; fine-tuning
  trajectory = the same sequence with ᾱ₋₁ = 1, identity steps (t == t_next, e.g. (0, 0) in quad-100) skipped:
  they return x_t whatever the network says, so they cost a forward and train nothing that reaches the sample
  (the real step at the same timestep value trains the same per-step quantizers on the same input).

Conditioning items are per image: class ids (class), prompt strings (text), or None (none).
"""
import math

import numpy as np
import torch

from ldm.util import UserError

TEXT_UNCONDITIONAL_PROMPT = ""


def distinct(timesteps):
    """The distinct values of a schedule in order of first appearance (quad-100: 100 values -> 96)."""
    return list(dict.fromkeys(int(t) for t in timesteps))


def adapter_for(model):
    """The family adapter of a LatentDiffusion or a PixelDiffusion."""
    from ddim.pipeline import PixelDiffusion

    if isinstance(model, PixelDiffusion):
        return PixelFamily(model)
    return LDMFamily(model)


class Trajectory:
    """A fine-tuning trajectory: ``order`` = [(k, t)] of the trained steps in sampling order (k indexes the step
    arrays), ``timesteps`` = the distinct timestep values (the quantized model's step-table keys), and
    ``step(x, eps, k, generator)`` = the deterministic update of step k (+ σ_k z with η > 0)."""

    def __init__(self, order, alphas, alphas_next, sigmas, timesteps):
        self.order = [(int(k), int(t)) for k, t in order]
        self.alphas = torch.as_tensor(alphas, dtype=torch.float32)
        self.alphas_next = torch.as_tensor(alphas_next, dtype=torch.float32)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        self.timesteps = list(timesteps)

    def __len__(self):
        return len(self.order)

    def step(self, x, eps, k, generator=None):
        """x_next from x_t and ε (Song et al. eq. 12): √ᾱ_n x̂0 + √(1 − ᾱ_n − σ²) ε + σ z."""
        a_t, a_next, sigma = self.alphas[k].item(), self.alphas_next[k].item(), self.sigmas[k].item()
        pred_x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        x_next = math.sqrt(a_next) * pred_x0 + math.sqrt(max(0.0, 1.0 - a_next - sigma ** 2)) * eps
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x_next = x_next + sigma * noise
        return x_next


class _Family:
    family = ""
    samplers = ("ddim",)
    skip_types = ("uniform",)
    conditioning = "none"
    n_classes = 0
    null_class = None

    def __init__(self, model):
        self.model = model

    @property
    def latent_shape(self):
        return [int(self.model.channels), int(self.model.image_size), int(self.model.image_size)]

    @property
    def num_timesteps(self):
        return int(self.model.num_timesteps)

    def check_sampler(self, sampler, eta, skip_type=None):
        if sampler not in self.samplers:
            raise UserError(f"the {self.family} family samples with {' or '.join(self.samplers)}, not {sampler!r}")
        if sampler == "plms" and eta != 0:
            raise UserError(f"the PLMS sampler is deterministic and needs eta 0, got eta {eta}")
        if skip_type is not None and skip_type not in self.skip_types:
            raise UserError(f"the {self.family} family spaces its timesteps {' or '.join(self.skip_types)}, "
                            f"not {skip_type!r}")

    # conditioning: per-image items -> context; None for an unconditional model
    def cond(self, items):
        return None

    def uncond(self, n):
        return None

    def items_of(self, labels=None, prompts=None):
        """The conditioning items of a batch from the loop's per-image labels / prompts."""
        return None


class LDMFamily(_Family):
    family = "ldm"
    samplers = ("ddim", "plms")

    def __init__(self, model):
        super().__init__(model)
        cond, key = getattr(model, "cond_stage_model", None), getattr(model, "cond_stage_key", None)
        if cond is not None and key == "class_label":
            self.conditioning = "class"
            n = cond.embedding.num_embeddings  # the last row is the null class of classifier-free guidance
            self.n_classes, self.null_class = n - 1, n - 1
        elif cond is not None and hasattr(cond, "tokenize"):
            self.conditioning = "text"
        elif cond is not None and getattr(model, "conditioning_key", None) is not None:
            raise UserError(f"the toolkit samples class-, text- and unconditional LDMs, not conditioning on "
                            f"{key!r}")
        self._samplers = {}

    def schedule(self, steps, skip_type=None, flag="--ddim_steps"):
        from ldm.generate import uniform_schedule

        self.check_sampler("ddim", 0.0, skip_type)
        return uniform_schedule(steps, self.num_timesteps, flag)

    def sampler(self, name, eta=0.0):
        self.check_sampler(name, eta)
        if name not in self._samplers:
            from ldm.models.diffusion.ddim import DDIMSampler
            from ldm.models.diffusion.plms import PLMSSampler

            self._samplers[name] = (PLMSSampler if name == "plms" else DDIMSampler)(self.model)
        return self._samplers[name]

    def items_of(self, labels=None, prompts=None):
        return {"class": labels, "text": prompts}.get(self.conditioning)

    @torch.no_grad()
    def cond(self, items):
        if self.conditioning == "class":
            labels = torch.as_tensor(np.asarray(items), dtype=torch.long, device=self.model.device)
            return self.model.get_learned_conditioning({self.model.cond_stage_key: labels})
        if self.conditioning == "text":
            return self.model.get_learned_conditioning([str(p) for p in items])
        return None

    @torch.no_grad()
    def uncond(self, n):
        if self.conditioning == "class":
            return self.cond(np.full(n, self.null_class, dtype=np.int64))
        if self.conditioning == "text":
            return self.model.get_learned_conditioning([TEXT_UNCONDITIONAL_PROMPT] * int(n))
        return None

    def _run(self, x_T, cond, uncond, scale, steps, eta, sampler, generator, progress=False):
        smp = self.sampler(sampler, eta)
        z, _ = smp.sample(S=steps, batch_size=x_T.shape[0], shape=list(x_T.shape[1:]), conditioning=cond, eta=eta,
                          x_T=x_T.to(self.model.device), unconditional_guidance_scale=scale,
                          unconditional_conditioning=uncond, verbose=False, generator=generator, progress=progress)
        return z

    @torch.no_grad()
    def sample(self, x_T, cond, uncond, scale, steps, eta, sampler="ddim", skip_type=None, generator=None):
        """Final latents from x_T (CFG against ``uncond`` when scale != 1 and uncond is given)."""
        return self._run(x_T, cond, uncond if scale != 1.0 else None, scale, steps, eta, sampler, generator)

    @torch.no_grad()
    def decode(self, z):
        return self.model.decode_first_stage(z)

    def sampling_timesteps(self, steps, sampler="ddim", skip_type=None):
        """The sampler's timestep list (ascending), as the sample meta records it."""
        smp = self.sampler(sampler, 0.0)
        smp.make_schedule(ddim_num_steps=steps, ddim_eta=0.0, verbose=False)
        return [int(t) for t in np.asarray(smp.ddim_timesteps)]

    @torch.no_grad()
    def record(self, x_T, cond, uncond, scale, steps, eta, sampler="ddim", skip_type=None, generator=None,
               progress=False):
        """The UNet's inputs along one sampling run, one entry {x, t, context} per sampling step in sampling order
        (a CFG call's rows: uncond first, then cond). PLMS's look-ahead call of its first step (at t_next, on an
        Euler estimate that the trajectory never visits) is left out, so a run gives exactly one entry per step,
        as Q-Diffusion's calibration files hold one x_t per step."""
        with self.model.record_unet_inputs(uncond_context=uncond) as rec:
            self._run(x_T, cond, uncond, scale, steps, eta, sampler, generator, progress)
        entries = list(rec.entries)
        n_steps = len(self.sampling_timesteps(steps, sampler))
        if sampler == "plms" and len(entries) == n_steps + 1:
            if not torch.equal(entries[1]["t"], entries[2]["t"]):
                raise RuntimeError("PLMS's look-ahead call was not where the first step puts it")
            del entries[1]
        if len(entries) != n_steps:
            raise RuntimeError(f"recorded {len(entries)} UNet calls for {n_steps} sampling steps")
        return entries

    def trajectory(self, steps, eta, skip_type=None):
        """Uniform DDIM over the LDM's schedule with CompVis's σ and ᾱ_prev (k indexes the ascending timesteps)."""
        from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters

        timesteps = self.schedule(steps, skip_type, "the fine-tuning schedule")
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(self.model.alphas_cumprod.detach().cpu(),
                                                                    np.asarray(timesteps), eta, verbose=False)
        order = [(k, timesteps[k]) for k in reversed(range(len(timesteps)))]
        return Trajectory(order, alphas, alphas_prev, sigmas, timesteps)


class PixelFamily(_Family):
    family = "pixel"
    samplers = ("ddim",)  # generalized_steps is DDIM
    skip_types = ("uniform", "quad")

    def schedule(self, steps, skip_type="quad", flag="--ddim_steps"):
        """The ascending sequence ``seq`` of ermongroup/ddim's runner (quad-100: 100 values, 96 distinct)."""
        from ddim.runners.diffusion import timestep_sequence

        self.check_sampler("ddim", 0.0, skip_type or "quad")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps:
            raise UserError(f"{flag} {steps} does not fit the {self.num_timesteps}-step schedule; choose 1 to "
                            f"{self.num_timesteps} steps")
        return timestep_sequence(skip_type or "quad", steps, self.num_timesteps)

    def sampling_timesteps(self, steps, sampler="ddim", skip_type="quad"):
        return self.schedule(steps, skip_type)

    @torch.no_grad()
    def sample(self, x_T, cond, uncond, scale, steps, eta, sampler="ddim", skip_type="quad", generator=None,
               callback=None):
        self.check_sampler(sampler, eta, skip_type)
        return self.model.sample(x_T, steps, skip_type=skip_type or "quad", eta=eta, generator=generator,
                                 callback=callback)

    def decode(self, z):
        return z  # pixel space

    @torch.no_grad()
    def record(self, x_T, cond, uncond, scale, steps, eta, sampler="ddim", skip_type="quad", generator=None,
               progress=False):
        """The network's inputs along one generalized_steps run, one entry {x, t, context=None} per step (identity
        steps included: their x_t and t are real inputs, shared with the real step at the same value)."""
        entries = []

        def keep(step):
            x = step["x"].detach().to("cpu", copy=True)
            entries.append({"x": x, "t": torch.full((x.shape[0],), int(step["t"]), dtype=torch.long),
                            "context": None})
        self.sample(x_T, None, None, 1.0, steps, eta, sampler, skip_type, generator, callback=keep)
        return entries

    def trajectory(self, steps, eta, skip_type="quad"):
        """generalized_steps' pairs (t, t_next) with ᾱ₋₁ = 1, identity steps left out (see the module doc)."""
        from ddim.functions.denoising import compute_alpha, step_pairs

        seq = self.schedule(steps, skip_type, "the fine-tuning schedule")
        pairs = [(t, n) for t, n in step_pairs(seq) if t != n]
        betas = self.model.betas.detach().cpu()
        a_t = compute_alpha(betas, torch.tensor([t for t, _ in pairs])).flatten()
        a_n = compute_alpha(betas, torch.tensor([n for _, n in pairs])).flatten()
        # generalized_steps' c1 = η √((1 − ᾱ_t/ᾱ_n)(1 − ᾱ_n)/(1 − ᾱ_t))
        sigmas = eta * ((1 - a_t / a_n) * (1 - a_n) / (1 - a_t)).sqrt()
        order = [(k, t) for k, (t, _) in enumerate(pairs)]
        return Trajectory(order, a_t, a_n, sigmas, distinct(seq))


# ------------------------------------------------------------------------------------------ calibration prompts
def _norm(text):
    return " ".join(str(text).lower().split())


def calibration_prompts(source, n, seed=0, eval_source=None, eval_n=None, allow_overlap=False):
    """(calibration PromptSelection of ``n`` prompts from ``source``, its JSON record) kept disjoint from the
    evaluation selection select_prompts(load_prompts(eval_source), eval_n, seed) unless ``allow_overlap`` (EDA-DM's
    pitfall: calibrating on evaluation prompts flatters the evaluation). Same source: the rule of
    ldm.data.prompts.calibration_and_evaluation; another source: every prompt whose text is an evaluation prompt is
    left out of the draw, by the same seeded rule."""
    from ldm.data.prompts import (CALIBRATION_RULE, OVERLAP_RULE, PromptSelection, calibration_and_evaluation,
                                  load_prompts, select_prompts)

    pool = load_prompts(source)
    if eval_source is not None and str(eval_source) == str(source):
        n_eval = len(pool) if eval_n is None else eval_n
        if n_eval > len(pool):
            raise UserError(f"the evaluation selection asks for {n_eval} prompts but {source} holds {len(pool)}; "
                            "ask for fewer")
        calibration, evaluation = calibration_and_evaluation(pool, n, n_eval, seed, allow_overlap, str(source))
    else:
        evaluation = None if eval_source is None else select_prompts(load_prompts(eval_source), eval_n, seed,
                                                                     str(eval_source))
        taken = set() if evaluation is None or allow_overlap else {_norm(p) for p in evaluation.prompts}
        pool_idx = np.array([i for i, p in enumerate(pool) if _norm(p) not in taken], dtype=np.int64)
        if not 1 <= n <= len(pool_idx):
            raise UserError(f"asked for {n} calibration prompts but only {len(pool_idx)} prompts of {source} are "
                            f"available{'' if allow_overlap or evaluation is None else ' outside the evaluation set'}"
                            "; ask for fewer")
        idx = pool_idx[np.random.default_rng([int(seed), 1]).permutation(len(pool_idx))[:n]]
        calibration = PromptSelection([pool[i] for i in idx], [int(i) for i in idx],
                                      OVERLAP_RULE if allow_overlap else CALIBRATION_RULE, int(seed), str(source),
                                      {"allow_overlap": bool(allow_overlap)})
    overlap = 0 if evaluation is None else len({_norm(p) for p in calibration.prompts}
                                               & {_norm(p) for p in evaluation.prompts})
    record = {**calibration.meta(), "prompts": list(calibration.prompts), "allow_overlap": bool(allow_overlap),
              "evaluation": None if evaluation is None else {"source": str(eval_source), "n": len(evaluation.prompts),
                                                             "seed": int(seed), "rule": evaluation.rule},
              "overlap_with_evaluation": overlap}
    return calibration, record


def evaluation_overlap(calib_record, prompts):
    """How many distinct evaluation ``prompts`` are calibration prompts of a calib record (text, case and spacing
    ignored)."""
    if not calib_record:
        return 0
    return len({_norm(p) for p in prompts} & {_norm(p) for p in calib_record.get("prompts", [])})
