"""DDIM (generalized) and DDPM ancestral sampling over a timestep sequence, as ermongroup/ddim runs them.

Both loops walk the pairs (t, t_next) of `step_pairs(seq)`: reversed(seq) with t_next from [-1] + seq[:-1], so
the last step goes to t_next = -1 where compute_alpha gives ᾱ = 1. The model is called as model(x_t, t) with a
float t [B]. One torch.randn_like draw is made per step, in step order, even where it is multiplied by zero
(eta 0), so a run consumes the global RNG exactly like the original. Returned lists hold CPU tensors
(xs[0] is the input itself), as in the original.

Repeated timesteps (the quad skip repeats small values: quad-100 has the pairs (2, 2), (2, 1), (1, 0),
(0, 0) x3, (0, -1)). An identity step (t == t_next) has ᾱ_t = ᾱ_next, so c1 = 0 for EVERY eta (its
factor 1 - ᾱ_t/ᾱ_next is exactly 0), c2 = sqrt(1 - ᾱ_t), and x_next = sqrt(ᾱ_t) x̂0 + c2 ε = x_t algebraically,
whatever ε the model returns: the step costs a forward pass, draws (and discards) its noise, and returns x_t
up to float rounding. ddpm_steps behaves the same way (β_t = 0, zero variance). Consequently all calls that
share a timestep value in one trajectory see the same x_t up to rounding: the three (0, 0) steps and the final
(0, -1) step evaluate the model on the x_t that (1, 0) produced, and (2, 2), (2, 1) share theirs. Measured in
tests/ddim/test_repeated_timesteps.py.
"""
import torch


def compute_alpha(beta, t):
    """ᾱ at integer timesteps t [B] as [B,1,1,1]: cumprod(1 - cat([0], β))[t + 1], so t = -1 gives 1."""
    beta = torch.cat([torch.zeros(1, dtype=beta.dtype, device=beta.device), beta], dim=0)
    return (1 - beta).cumprod(dim=0).index_select(0, t + 1).view(-1, 1, 1, 1)


def step_pairs(seq):
    """[(t, t_next), ...] in sampling order: zip(reversed(seq), reversed([-1] + seq[:-1]))."""
    seq = [int(s) for s in seq]
    return list(zip(reversed(seq), reversed([-1] + seq[:-1])))


def ddim_update(x_t, eps, a_t, a_next, eta, noise):
    """One generalized (DDIM) step: returns (x̂0, x_next).

    x̂0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t) (not clipped);
    c1 = η sqrt((1 - ᾱ_t/ᾱ_n)(1 - ᾱ_n)/(1 - ᾱ_t)), c2 = sqrt(1 - ᾱ_n - c1²);
    x_next = sqrt(ᾱ_n) x̂0 + c1 z + c2 ε.
    """
    x0 = (x_t - eps * (1 - a_t).sqrt()) / a_t.sqrt()
    c1 = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
    c2 = ((1 - a_next) - c1 ** 2).sqrt()
    return x0, a_next.sqrt() * x0 + c1 * noise + c2 * eps


def _timestep_batch(value, n, device):
    return (torch.ones(n) * value).to(device)  # float32, as the model receives it in the original


@torch.no_grad()
def generalized_steps(x, seq, model, b, eta=0.0):
    """DDIM sampling from x = x_T along seq; returns (xs, x0_preds), lists of CPU tensors (len(seq)+1, len(seq))."""
    n = x.size(0)
    xs, x0_preds = [x], []
    for i, j in step_pairs(seq):
        t, next_t = _timestep_batch(i, n, x.device), _timestep_batch(j, n, x.device)
        at, at_next = compute_alpha(b, t.long()), compute_alpha(b, next_t.long())
        xt = xs[-1].to(x.device)
        et = model(xt, t)
        x0_t, xt_next = ddim_update(xt, et, at, at_next, eta, torch.randn_like(x))
        x0_preds.append(x0_t.to("cpu"))
        xs.append(xt_next.to("cpu"))
    return xs, x0_preds


@torch.no_grad()
def ddpm_steps(x, seq, model, b, **kwargs):
    """Ancestral (DDPM) sampling along seq with the posterior of the skipped chain; x̂0 is clipped to [-1, 1],
    the variance is β_t = 1 - ᾱ_t/ᾱ_next, and no noise is added at t = 0. Returns (xs, x0_preds) like
    generalized_steps. Extra keyword arguments are accepted and ignored, as in the original."""
    n = x.size(0)
    xs, x0_preds = [x], []
    for i, j in step_pairs(seq):
        t, next_t = _timestep_batch(i, n, x.device), _timestep_batch(j, n, x.device)
        at, atm1 = compute_alpha(b, t.long()), compute_alpha(b, next_t.long())
        beta_t = 1 - at / atm1
        xt = xs[-1].to(x.device)
        e = model(xt, t.float())
        x0 = torch.clamp((1.0 / at).sqrt() * xt - (1.0 / at - 1).sqrt() * e, -1, 1)
        x0_preds.append(x0.to("cpu"))
        mean = ((atm1.sqrt() * beta_t) * x0 + ((1 - beta_t).sqrt() * (1 - atm1)) * xt) / (1.0 - at)
        noise = torch.randn_like(xt)
        mask = (1 - (t == 0).float()).view(-1, 1, 1, 1)
        sample = mean + mask * torch.exp(0.5 * beta_t.log()) * noise
        xs.append(sample.to("cpu"))
    return xs, x0_preds
