"""MAR's objective and generation: masked tokens, each predicted by a diffusion head.

Training (Li et al. 2024, section 3): the image's tokens in a random order; a fraction r of
them, r from a normal around 1 (sd 0.25) truncated to [r_min, 1] and drawn once per batch,
is unknown; encoder and decoder see the rest and give a condition z per token; the head
learns to denoise every unknown token from z, each token repeated `batch_mul` times with its
own timestep and noise, on its own Gaussian diffusion (cosine schedule, learned variance,
the DiT loss: epsilon MSE + VB).

It has the small interface every objective has, so the one training loop, the depth methods
and recovery take it unchanged:
- `draw(x0, random)` -> (t, noise): here t is a `MaskedDraw` (the mask, which token each head
  row is, the head timesteps) and noise (N, M, C) the head rows' noise;
- `training_losses(model_fn, x0, t, noise)` calls `model_fn(inputs, steps)` with inputs a
  `MaskedTokens` and steps (N, M): the call a student and its teacher both get;
- `distillation_losses(student_out, teacher_out, inputs, t)`: the head's logits KD.

Generation (`generate`): all tokens unknown; at step s of S the tokens predicted are those
that the cosine schedule floor(L cos(pi/2 (s+1)/S)) no longer leaves unknown (at least one,
all at the last step), in each image's random order; guidance on the head's epsilon with the
linear schedule 1 + (w - 1)(L - that count) / L; the head samples by DDPM on its respaced
schedule with the step noise times a temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .gaussian import GaussianDiffusion, space_timesteps


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> tokens (N, L, C p^2), row-major over the (H/p, W/p) grid, MAR's layout
    (channel, then the patch's rows and columns)."""
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)  # (N, H/p, W/p, C, p, p)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens (N, L, C p^2) -> (N, C, H, W), the inverse of `patchify`."""
    n, length, _ = tokens.shape
    side = int(round(math.sqrt(length)))
    p = patch_size
    x = tokens.reshape(n, side, side, channels, p, p)
    x = torch.einsum("nhwcpq->nchpwq", x)  # (N, C, side, p, side, p)
    return x.reshape(n, channels, side * p, side * p)


def truncated_mask_ratio(u: float, minimum: float) -> float:
    """The mask ratio for a uniform u in [0, 1): the inverse CDF of N(1, 0.25^2) truncated to
    [minimum, 1] (MAR's `truncnorm((minimum - 1) / 0.25, 0, loc=1, scale=0.25)`)."""
    std = 0.25
    lower = float(torch.special.ndtr(torch.tensor((minimum - 1.0) / std, dtype=torch.float64)))
    p = lower + u * (0.5 - lower)  # CDF values between the bounds; 0.5 = CDF at the mean
    z = float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
    return min(1.0, max(minimum, 1.0 + std * z))


def unknown_after_step(step: int, num_iter: int, seq_len: int, unknown_now: int) -> int:
    """MAR's count of tokens left unknown by generation step `step` (0-based) of `num_iter`:
    floor(L cos(pi/2 (step + 1) / S)), at least one fewer than now, at least 1. The last step
    predicts every token left whatever this says; its guidance still uses this count (as MAR)."""
    planned = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
    return max(1, min(unknown_now - 1, planned))


def guidance_at(cfg_scale: float, schedule: str, seq_len: int, unknown_after: int) -> float:
    """The guidance scale of a step: "linear" 1 + (w - 1) (L - unknown after the step) / L
    (Muse's, MAR's default), or "constant" w."""
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * (seq_len - unknown_after) / seq_len
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose 'linear' or 'constant'")


def head_spacing(spec: int | str, head_timesteps: int) -> int | str:
    """A head respacing given on the command line or in Python: a step count ("100", 100),
    "ddimN" (a constant stride) or counts per section ("10,15,20"), checked against the head's
    training timesteps; returns an int for a plain count. One-line ValueError otherwise."""
    text = str(spec).strip()
    value: int | str = int(text) if text.isdigit() else text
    try:
        space_timesteps(head_timesteps, value)
    except (ValueError, TypeError):
        raise ValueError(f"--head-steps must be a step count 1..{head_timesteps}, 'ddimN' or comma-separated counts per "
                         f"section, got {spec!r}") from None
    return value


def head_step_count(spec: int | str, head_timesteps: int) -> int:
    """How many DDPM steps the head runs per token under the respacing `spec`."""
    return len(space_timesteps(head_timesteps, head_spacing(spec, head_timesteps)))


@dataclass
class MaskedTokens:
    """What a MAR network is called on in training: the image's tokens (N, L, C), its mask
    (N, L) bool (True = unknown), and the head rows: index (N, M) the token each row denoises,
    noisy (N, M, C) its noised value."""

    tokens: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor
    noisy: torch.Tensor

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "MaskedTokens":
        """Moved (and floating tensors cast to `dtype`); the mask and indices keep their type.
        A dtype as the only argument casts, as `Tensor.to(torch.bfloat16)` does."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return MaskedTokens(self.tokens.to(device=device, dtype=dtype), self.mask.to(device),
                            self.index.to(device), self.noisy.to(device=device, dtype=dtype))

    def __getitem__(self, rows: slice) -> "MaskedTokens":
        return MaskedTokens(*(getattr(self, f.name)[rows] for f in fields(self)))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device


@dataclass
class MaskedDraw:
    """A training step's draw: mask (N, L) bool, index (N, M) long, steps (N, M) head timesteps."""

    mask: torch.Tensor
    index: torch.Tensor
    steps: torch.Tensor

    def __len__(self) -> int:
        return self.mask.shape[0]


class MaskedDiffusion:
    """MAR's objective (see the module docstring) for tokens of `patch_size` patches of
    `channels`-channel inputs, with a head diffusion of `head_timesteps` cosine steps."""

    kind = "masked"
    samplers = ("mar",)
    default_sampler = "mar"

    def __init__(self, patch_size: int, channels: int, *, mask_ratio_min: float = 0.7, batch_mul: int = 4,
                 head_timesteps: int = 1000, head_sampling_steps: int = 100):
        self.patch_size = patch_size
        self.channels = channels
        self.mask_ratio_min = mask_ratio_min
        self.batch_mul = batch_mul
        self.head = GaussianDiffusion.cosine(head_timesteps)
        self.head_sampling_steps = head_sampling_steps
        self.num_timesteps = head_timesteps

    @classmethod
    def for_config(cls, config: Any) -> "MaskedDiffusion":
        return cls(config.patch_size, config.in_channels, mask_ratio_min=config.mask_ratio_min,
                   batch_mul=config.head_batch_mul, head_timesteps=config.head_timesteps,
                   head_sampling_steps=config.head_sampling_steps)

    # -- training ----------------------------------------------------------------------------
    def num_unknown(self, seq_len: int, u: float) -> int:
        return min(seq_len, max(1, math.ceil(seq_len * truncated_mask_ratio(u, self.mask_ratio_min))))

    def draw(self, x0: torch.Tensor, random) -> tuple[MaskedDraw, torch.Tensor]:
        """The step's mask, head rows and noise, from a StepRandom (the same on every process)."""
        n = x0.shape[0]
        seq_len = (x0.shape[-1] // self.patch_size) * (x0.shape[-2] // self.patch_size)
        token_dim = x0.shape[1] * self.patch_size**2
        # One ratio per global batch: the encoder input stays dense, as in MAR.
        unknown = self.num_unknown(seq_len, float(random.shared_rand()))
        order = random.rand(seq_len).argsort(dim=1)  # (N, L): a random order per image
        mask = torch.zeros(n, seq_len, dtype=torch.bool, device=x0.device)
        mask.scatter_(1, order[:, :unknown], True)
        index = order[:, :unknown].repeat(1, self.batch_mul)  # (N, M): every unknown token, batch_mul times
        m = index.shape[1]
        steps = random.randint(0, self.num_timesteps, m)  # (N, M)
        noise = random.randn(m, token_dim)  # (N, M, C)
        return MaskedDraw(mask, index, steps), noise

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])  # (N, M, C) -> (N M, C): the head's batch of tokens

    def training_losses(self, model_fn: Callable, x0: torch.Tensor, t: MaskedDraw, noise: torch.Tensor) -> dict[str, Any]:
        """Per-image losses (N,): "loss" = "mse" + "vb" averaged over the image's head rows,
        and the raw "model_output" (N, M, 2C) and "xt" (the MaskedTokens) for KD."""
        tokens = patchify(x0, self.patch_size)  # (N, L, C)
        n, m = t.index.shape
        target = tokens.gather(1, t.index.unsqueeze(-1).expand(n, m, tokens.shape[-1]))  # (N, M, C)
        rows_t = t.steps.reshape(-1)  # (N M,)
        noisy = self.head.q_sample(self._rows(target), rows_t, self._rows(noise)).reshape(n, m, -1)  # (N, M, C)
        inputs = MaskedTokens(tokens, t.mask, t.index, noisy)
        out = model_fn(inputs, t.steps)  # (N, M, 2C)
        c = tokens.shape[-1]
        rows_out = self._rows(out)
        mse = ((self._rows(noise) - rows_out[:, :c]) ** 2).mean(dim=1)  # (N M,)
        frozen = torch.cat([rows_out[:, :c].detach(), rows_out[:, c:]], dim=1)
        vb = self.head.vb_terms(frozen, self._rows(target), self._rows(noisy), rows_t)  # (N M,)
        per_image = lambda v: v.reshape(n, m).mean(dim=1)  # noqa: E731  (N,)
        return {"mse": per_image(mse), "vb": per_image(vb), "loss": per_image(mse + vb),
                "model_output": out, "xt": inputs}

    def distillation_losses(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                            xt: MaskedTokens, t: MaskedDraw) -> dict[str, torch.Tensor]:
        """The head's logits KD per image (N,): epsilon MSE + the variance KL (as for DiT),
        between two outputs on the same tokens, mask, rows and timesteps."""
        n, m = t.index.shape
        terms = self.head.distillation_losses(self._rows(student_output), self._rows(teacher_output),
                                              self._rows(xt.noisy), t.steps.reshape(-1))
        return {name: value.reshape(n, m).mean(dim=1) for name, value in terms.items()}

    def calibration_inputs(self, x0: torch.Tensor, seed: int) -> tuple[MaskedTokens, torch.Tensor, torch.Tensor]:
        """A fixed scoring set for depth methods: (inputs, head timesteps (N, M), target noise
        (N, M, C)). The masked fraction is the median of the training distribution and every
        image's unknown tokens appear once, at head timesteps spread evenly over the range."""
        n = x0.shape[0]
        tokens = patchify(x0, self.patch_size)
        seq_len, c = tokens.shape[1], tokens.shape[2]
        g = torch.Generator().manual_seed(seed)
        unknown = self.num_unknown(seq_len, 0.5)
        order = torch.rand(n, seq_len, generator=g).argsort(dim=1)
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask.scatter_(1, order[:, :unknown], True)
        index = order[:, :unknown]  # (N, M)
        fraction = (torch.arange(n * unknown, dtype=torch.float64) + 0.5) / (n * unknown)
        fraction = fraction[torch.randperm(n * unknown, generator=g)]
        steps = (fraction * self.num_timesteps).long().clamp(max=self.num_timesteps - 1).reshape(n, unknown)
        noise = torch.randn(n, unknown, c, generator=g)
        target = tokens.gather(1, index.unsqueeze(-1).expand(n, unknown, c))
        noisy = self.head.q_sample(self._rows(target), steps.reshape(-1), self._rows(noise)).reshape(n, unknown, c)
        return MaskedTokens(tokens, mask, index, noisy), steps, noise

    # -- generation --------------------------------------------------------------------------
    def sample_head(self, model: Any, z: torch.Tensor, noise: Callable[[], torch.Tensor], *,
                    unconditional: torch.Tensor | None = None, cfg_scale: float = 1.0, temperature: float = 1.0,
                    process: GaussianDiffusion | None = None) -> torch.Tensor:
        """Tokens (M, C) sampled by the head for conditions z (M, D_dec); with guidance (the
        unconditional branch's conditions (M, D_dec) given) epsilon is u + w (c - u) and the
        variance values are the conditional rows' (as MAR). `noise()` gives fresh (M, C) noise:
        the start and every DDPM step's (times `temperature`)."""
        process = process or self.head.respaced(self.head_sampling_steps)
        c = self.channels * self.patch_size**2
        # Pixel-space tokens are images in [-1, 1]: the head's x0 is clamped there, as leandit's
        # pixel-space DiT samplers do; without it a small head's error at t = 999 (times 316 in
        # the first step of the respaced cosine schedule) throws tokens off for good.
        clip = getattr(getattr(model, "config", None), "space", "latent") == "pixel"
        both = torch.cat([z, unconditional]) if unconditional is not None else None

        def head_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if both is None:
                return model.head(x, t, z)
            out = model.head(torch.cat([x, x]), torch.cat([t, t]), both)  # (2M, 2C)
            cond, uncond = out.chunk(2)
            eps = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
            return torch.cat([eps, cond[:, c:]], dim=1)

        return process.sample(head_fn, noise, sampler="ddpm", temperature=temperature, clip_denoised=clip)

    @torch.no_grad()
    def generate(self, model: Any, labels: torch.Tensor, noise, *, num_iter: int = 64, cfg_scale: float = 1.0,
                 cfg_schedule: str = "linear", temperature: float = 1.0, null_label: int | None = None,
                 head_steps: int | None = None, progress: bool = False) -> torch.Tensor:
        """Images (N, C, H, W) in the model's space, for labels (N,).

        `model` has `context(tokens, mask, labels)`, `head(x, t, z)` and `config`; `noise` is
        a `PerSampleNoise` of the batch (each image's order and head noise come from its own
        stream, so an image does not depend on the batch it is generated in)."""
        config = model.config
        seq_len, c = config.num_tokens, config.token_dim
        if num_iter < 1 or num_iter > seq_len:
            raise ValueError(f"MAR generation needs 1 to {seq_len} steps (one token at least per step), got {num_iter}")
        guided = cfg_scale != 1.0
        if guided and null_label is None:
            raise ValueError("guidance needs the unconditional label")
        n = labels.shape[0]
        device = labels.device
        dtype = next(model.parameters()).dtype
        head = self.head.respaced(head_spacing(head_steps or self.head_sampling_steps, self.num_timesteps))
        order = noise.randn((seq_len,)).argsort(dim=1).to(device)  # (N, L)
        tokens = torch.zeros(n, seq_len, c, device=device, dtype=dtype)
        unknown = seq_len
        both = torch.cat([labels, torch.full_like(labels, null_label)]) if guided else labels
        for step in tqdm(range(num_iter), disable=not progress, desc="mar", leave=False):
            after = unknown_after_step(step, num_iter, seq_len, unknown)
            left = 0 if step == num_iter - 1 else after  # unknown once this step is done
            mask = torch.zeros(n, seq_len, dtype=torch.bool, device=device)
            mask.scatter_(1, order[:, :unknown], True)
            index = order[:, left:unknown]  # (N, k): the tokens this step predicts
            k = index.shape[1]
            if k == 0:
                continue
            if guided:
                z = model.context(torch.cat([tokens, tokens]), torch.cat([mask, mask]), both)  # (2N, L, Dd)
            else:
                z = model.context(tokens, mask, labels)  # (N, L, Dd)
            rows = torch.cat([index, index]) if guided else index
            z = z.gather(1, rows.unsqueeze(-1).expand(*rows.shape, z.shape[-1])).reshape(-1, z.shape[-1])  # (N' k, Dd)
            scale = guidance_at(cfg_scale, cfg_schedule, seq_len, after)
            # Each image's noise for the whole head run in one draw from its own stream (the start
            # and one per DDPM step): per-call draws would be 100 small calls per image and step.
            draws = noise.randn((head.num_timesteps + 1, k, c)).to(device=device, dtype=dtype)  # (N, S + 1, k, C)
            calls = iter(range(head.num_timesteps + 1))
            step_noise = lambda: draws[:, next(calls)].reshape(n * k, c)  # noqa: E731
            z_cond, z_uncond = z.chunk(2) if guided else (z, None)
            sampled = self.sample_head(model, z_cond, step_noise, unconditional=z_uncond, cfg_scale=scale,
                                       temperature=temperature, process=head)  # (N k, C)
            tokens = tokens.scatter(1, index.unsqueeze(-1).expand(n, k, c), sampled.reshape(n, k, c).to(dtype))
            unknown = left
        return unpatchify(tokens.float(), self.patch_size, self.channels)


__all__ = ["MaskedDiffusion", "MaskedDraw", "MaskedTokens", "guidance_at", "head_spacing", "head_step_count", "patchify", "truncated_mask_ratio",
           "unknown_after_step", "unpatchify"]
