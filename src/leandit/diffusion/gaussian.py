"""Discrete-time Gaussian diffusion as trained by DiT (Ho et al. 2020; Nichol & Dhariwal 2021).

Forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) with a_t the cumulative product
of (1 - beta) over a linear beta schedule. The network predicts epsilon and, when it learns
sigma, a value v in [-1, 1] per element that interpolates the log variance between the
posterior variance (v = -1) and beta_t (v = 1). Training loss: MSE on epsilon plus the
variational bound with the mean frozen (the "hybrid" loss), in bits per dimension.

Every sampler takes `model_fn(x, t) -> output` with `t` on the model's own timestep scale
(the original 0..999 even after respacing), so guidance, labels and compression wrappers are
bound by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .solvers import DEFAULT_SOLVER_STEPS, SOLVERS, SolverSettings, make_scheduler, solve

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[], torch.Tensor]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DiT/ADM linear schedule, 1e-4 -> 0.02 for 1000 steps, rescaled for other lengths."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule (Nichol & Dhariwal 2021) that MAR's diffusion head uses:
    alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2 and beta_i = 1 - alpha_bar((i + 1) / T) /
    alpha_bar(i / T), capped at `max_beta`."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta) for i in range(num_timesteps)],
        dtype=np.float64,
    )


def space_timesteps(num_timesteps: int, spec: int | str) -> list[int]:
    """Which of the original timesteps a respaced process keeps.

    `spec` is a step count (250), "ddimN" (a constant stride giving exactly N steps), or
    comma-separated counts per equal section ("10,15,20"). Within a section the kept steps
    are evenly spaced and include both ends (rounded to the nearest integer), as in ADM/DiT.
    """
    if isinstance(spec, str) and spec.startswith("ddim"):
        count = int(spec[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no constant stride gives exactly {count} of {num_timesteps} steps")
    counts = [int(spec)] if isinstance(spec, int) else [int(c) for c in str(spec).split(",")]
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        # A one-step section keeps its last timestep (ADM keeps the first), so that a
        # one-step sampler starts from pure noise rather than from t = 0.
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0 if count > 1 else float(size - 1)
        for _ in range(count):
            # Accumulated (not j * stride) so the kept steps equal those of the ADM/DiT
            # respacing, which FID comparisons with published numbers rely on.
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    # (logvar2 - logvar1) first: it is exactly 0 for equal variances, so the KL of two equal
    # Gaussians is exactly 0 (adding -1 first rounds it in float32).
    return 0.5 * ((logvar2 - logvar1) - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of data quantised to 256 levels in [-1, 1] under N(mean, e^(2 log_scale)):
    the Gaussian mass of x's bin (width 2/255), with the edge bins extended to infinity."""
    inv_std = torch.exp(-log_scale)
    upper = torch.special.ndtr(inv_std * (x - mean + 1.0 / 255))
    lower = torch.special.ndtr(inv_std * (x - mean - 1.0 / 255))
    tiny = 1e-12
    return torch.where(
        x < -0.999,
        torch.log(upper.clamp(min=tiny)),
        torch.where(x > 0.999, torch.log((1.0 - lower).clamp(min=tiny)), torch.log((upper - lower).clamp(min=tiny))),
    )


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 (others unchanged): for losses under bf16 autocast."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


@dataclass
class MeanVariance:
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


class GaussianDiffusion:
    """Gaussian diffusion over `len(betas)` steps.

    Args:
        betas: the noise schedule (float64).
        learn_sigma: the model output carries the variance interpolation channels.
        fixed_variance: variance when not learned: "large" (beta_t, DDPM's choice for
            sampling) or "small" (the true posterior variance).
        timestep_map: for a respaced process, the original timestep of each step; the model
            always receives original timesteps.
    """

    kind = "diffusion"
    samplers = ("ddpm", "ddim", "dpm++2m", "unipc")
    default_sampler = "ddim"

    def __init__(
        self,
        betas: np.ndarray,
        *,
        learn_sigma: bool = True,
        fixed_variance: str = "large",
        timestep_map: Sequence[int] | None = None,
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(len(betas)))

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1
        # (to beta_0 for a one-step process, which has no t = 1).
        clip = post_var[1] if len(betas) > 1 else betas[0]
        post_logvar = np.log(np.append(clip, post_var[1:]))
        large_var = np.append(clip, betas[1:])
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self._tables_np = {
            "sqrt_ac": np.sqrt(ac),
            "sqrt_1m_ac": np.sqrt(1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac),
            "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1.0),
            "ac": ac,
            "ac_prev": ac_prev,
            "post_var": post_var,
            "post_logvar": post_logvar,
            "post_coef_x0": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "post_coef_xt": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
            "large_var": large_var,
            "large_logvar": np.log(large_var),
            "timestep_map": np.asarray(self.timestep_map, dtype=np.float64),
        }
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def dit(cls, num_timesteps: int = 1000, learn_sigma: bool = True) -> "GaussianDiffusion":
        return cls(linear_betas(num_timesteps), learn_sigma=learn_sigma)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, learn_sigma: bool = True) -> "GaussianDiffusion":
        """MAR's head: the cosine schedule, learned variance."""
        return cls(cosine_betas(num_timesteps), learn_sigma=learn_sigma)

    def respaced(self, spec: int | str) -> "GaussianDiffusion":
        """The same process on a subset of the timesteps (for fewer sampling steps)."""
        kept = space_timesteps(self.num_timesteps, spec)
        betas, last = [], 1.0
        for t in kept:
            betas.append(1.0 - self.alphas_cumprod[t] / last)
            last = self.alphas_cumprod[t]
        original = [self.timestep_map[t] for t in kept]
        return GaussianDiffusion(
            np.array(betas), learn_sigma=self.learn_sigma, fixed_variance=self.fixed_variance, timestep_map=original
        )

    # -- table lookups -----------------------------------------------------------------------
    def _table(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        device = t.device
        if device not in self._tables:
            self._tables[device] = {
                k: torch.from_numpy(v).to(device=device, dtype=torch.float32) for k, v in self._tables_np.items()
            }
        values = self._tables[device][name][t]  # (N,)
        return values.reshape(-1, *([1] * (ndim - 1)))  # (N, 1, ..., 1)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps the model is conditioned on for steps t of this process."""
        if self.timestep_map == list(range(self.num_timesteps)):
            return t
        return self._table("timestep_map", t, 1).long()

    # -- the forward process and its posterior -----------------------------------------------
    def sample_timesteps(self, n: int, random) -> torch.Tensor:
        """Uniform training timesteps, from a StepRandom-like source."""
        return random.randint(0, self.num_timesteps)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        return self._table("sqrt_ac", t, x0.dim()) * x0 + self._table("sqrt_1m_ac", t, x0.dim()) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        n = x0.dim()
        mean = self._table("post_coef_x0", t, n) * x0 + self._table("post_coef_xt", t, n) * xt
        return mean, self._table("post_var", t, n), self._table("post_logvar", t, n)

    def pred_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = xt.dim()
        return self._table("sqrt_recip_ac", t, n) * xt - self._table("sqrt_recipm1_ac", t, n) * eps

    def eps_from_pred_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        n = xt.dim()
        return (self._table("sqrt_recip_ac", t, n) * xt - x0) / self._table("sqrt_recipm1_ac", t, n)

    def p_mean_variance(
        self, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> MeanVariance:
        """The reverse step p(x_{t-1} | x_t) that a model output stands for.

        Takes the output (not the model) so that distillation can compare two outputs.
        """
        c = xt.shape[1]
        n = xt.dim()
        if self.learn_sigma:
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learned-sigma output needs {2 * c} channels, got {model_output.shape[1]}")
            eps, v = model_output[:, :c], model_output[:, c:]
            frac = (v + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_var = frac * self._table("log_betas", t, n) + (1 - frac) * self._table("post_logvar", t, n)
            var = torch.exp(log_var)
        else:
            eps = model_output[:, :c]
            prefix = "large_" if self.fixed_variance == "large" else "post_"
            var = self._table(prefix + "var", t, n).expand_as(xt)
            log_var = self._table(prefix + "logvar", t, n).expand_as(xt)
        pred_x0 = self.pred_x0_from_eps(xt, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
            eps = self.eps_from_pred_x0(xt, t, pred_x0)
        mean, _, _ = self.q_posterior(pred_x0, xt, t)
        return MeanVariance(mean, var, log_var, pred_x0, eps)

    # -- training ----------------------------------------------------------------------------
    def training_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses: "loss" (= "mse" + "vb" with learned sigma), "mse", "vb", and the
        raw "model_output" and "xt" for callers that compute more terms."""
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, self.model_timesteps(t))
        c = x0.shape[1]
        mse = mean_flat((noise - out[:, :c]) ** 2)
        terms = {"mse": mse, "model_output": out, "xt": xt}
        if self.learn_sigma:
            # The VB term trains only the variance: the mean it sees is frozen.
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0, xt, t)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def distillation_losses(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample logits-KD terms between two outputs on the same x_t, t and labels:
        "kd" (the total), "kd_mse" (epsilon channels) and, with learned sigma, "kd_kl": the KL
        from the teacher's reverse Gaussian to the student's in bits per dimension. As with
        the VB term, the student's mean is frozen inside the KL so that it distils only the
        variance head; the epsilon MSE distils the mean."""
        c = xt.shape[1]
        # In float32 even under bf16 autocast (and a bf16 teacher): the terms are small differences.
        student_output, xt = upcast(student_output), upcast(xt)
        teacher_output = upcast(teacher_output.detach()).to(student_output.dtype)
        mse = mean_flat((student_output[:, :c] - teacher_output[:, :c]) ** 2)
        terms = {"kd_mse": mse, "kd": mse}
        if self.learn_sigma:
            frozen = torch.cat([student_output[:, :c].detach(), student_output[:, c:]], dim=1)
            student = self.p_mean_variance(frozen, xt, t)
            teacher = self.p_mean_variance(teacher_output, xt, t)
            kl = mean_flat(normal_kl(teacher.mean, teacher.log_variance, student.mean, student.log_variance)) / math.log(2.0)
            terms["kd_kl"] = kl
            terms["kd"] = mse + kl
        return terms

    def vb_terms(self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample variational bound term L_t in bits per dimension: KL(q || p) for t > 0,
        the discretised decoder NLL for t = 0."""
        true_mean, _, true_logvar = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(model_output, xt, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p.mean, p.log_variance)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- sampling ----------------------------------------------------------------------------
    def sample(
        self,
        model_fn: ModelFn,
        noise: NoiseFn,
        *,
        sampler: str = "ddim",
        steps: int | str | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
        temperature: float = 1.0,
        progress: bool = False,
        solver: SolverSettings | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from x_T = noise() to x_0.

        Args:
            noise: returns a fresh standard normal tensor of the sample shape at each call.
            sampler: "ddpm" (ancestral, uses the learned variance), "ddim" (eta = 0:
                deterministic), or diffusers' multistep "dpm++2m" (DPM-Solver++ 2M) and
                "unipc" on this process's betas, with `solver`'s spacing options.
            steps: respace to this many steps (or a respacing spec); default: all. For the
                multistep solvers: model evaluations (default 20).
            clip_denoised: clamp the predicted x0 to [-1, 1] (pixel-space models); DDIM then
                uses the epsilon implied by the clamped x0.
            temperature: multiplies the noise of every DDPM step (not the starting noise), as
                MAR's head samples; 1 is plain DDPM.
        """
        if sampler not in self.samplers:
            raise ValueError(f"unknown diffusion sampler {sampler!r}; choose one of {self.samplers}")
        if sampler in SOLVERS:
            return self._solve(model_fn, noise(), sampler, DEFAULT_SOLVER_STEPS if steps is None else int(steps), clip_denoised, solver)
        process = self.respaced(steps) if steps is not None and steps != self.num_timesteps else self
        x = noise()
        for i in tqdm(range(process.num_timesteps - 1, -1, -1), disable=not progress, desc=sampler, leave=False):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = model_fn(x, process.model_timesteps(t))
            if sampler == "ddpm":
                x = process.ddpm_step(out, x, t, noise, clip_denoised, temperature)
            else:
                x = process.ddim_step(out, x, t, noise, eta, clip_denoised)
        return x

    def _solve(self, model_fn: ModelFn, x: torch.Tensor, solver: str, steps: int, clip_denoised: bool,
               settings: SolverSettings | None) -> torch.Tensor:
        if self.timestep_map != list(range(self.num_timesteps)):
            raise ValueError("the multistep solvers run on the model's own (not respaced) process: pass the steps instead")
        scheduler = make_scheduler(solver, settings or SolverSettings(), betas=self.betas, clip_denoised=clip_denoised)
        c = x.shape[1]

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model_fn(x, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long))[:, :c]

        x = solve(scheduler, predict, x, steps)
        return x.clamp(-1, 1) if clip_denoised else x

    def ddpm_step(self, out, xt, t, noise: NoiseFn, clip_denoised: bool, temperature: float = 1.0) -> torch.Tensor:
        p = self.p_mean_variance(out, xt, t, clip_denoised)
        not_last = (t != 0).float().reshape(-1, *([1] * (xt.dim() - 1)))
        step_noise = noise() if temperature == 1.0 else noise() * temperature
        return p.mean + not_last * torch.exp(0.5 * p.log_variance) * step_noise

    def ddim_step(self, out, xt, t, noise: NoiseFn, eta: float, clip_denoised: bool) -> torch.Tensor:
        p = self.p_mean_variance(out, xt, t, clip_denoised)
        n = xt.dim()
        ac, ac_prev = self._table("ac", t, n), self._table("ac_prev", t, n)
        sigma = eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
        x = p.pred_x0 * torch.sqrt(ac_prev) + torch.sqrt(1 - ac_prev - sigma**2) * p.pred_eps
        if eta > 0:
            not_last = (t != 0).float().reshape(-1, *([1] * (n - 1)))
            x = x + not_last * sigma * noise()
        return x
