"""leandit's learnable-pruning and masked-KD training steps against a re-implementation of the
TinyFusion reference's steps, side by side in one process on the same shapes.

    OMP_NUM_THREADS=2 python benchmarks/reference_step_speed.py --rounds 4 --steps 2
    python benchmarks/reference_step_speed.py --device cuda --shapes dit-xl      # on a GPU

The reference side is written here from the facts of VainF/TinyFusion (`prune_by_learning.py`,
`train_masked_kd.py`, the ADM `gaussian_diffusion.py` it ships); nothing of it is imported:
- LoRA (rank 8, alpha = 2 * rank, torchtune's LoRALinear: base + alpha/rank * B(A(x))) on every
  nn.Linear of the model, the embedders and the final layer included;
- the gates in the forward, per N:M group `gumbel_softmax(logits.repeat(N, 1) * scale, tau,
  hard=True) @ options`, and every block mixed as `block(x, c) * m + x * (1 - m)`;
- the diffusion loss from float64 numpy tables, each coefficient moved to the device and
  indexed per call (`_extract_into_tensor`), MSE + the VB term of the learned variance;
- a step of `zero_grad`, `backward`, `if loss.isnan().sum() == 0: clip_grad_norm_(all
  parameters, 1.0); opt.step()`, the EMA as `mul_(d).add_(p, alpha=1 - d)` over every named
  parameter, and `loss.item()` for the running log (four of them in masked KD);
- masked KD: the teacher's forward under no_grad, 0.9 * (KD MSE + KD KL) + 0.1 * (MSE + VB)
  + beta * masked feature loss (|f - mean| < 2 std masks, forward hooks on the blocks), plain
  AdamW with a cosine learning rate to half, full fine-tuning.

On a GPU the reference runs as it ships: bf16 autocast for mask learning, fp16 autocast with
a GradScaler for masked KD.

The leandit side runs the training loop's own step (`Trainer._step`, the EMA update, the job's
`on_step_end`, the log accumulation) on `LearnablePruningJob` / `RecoveryJob`: in fp32 (the
same numbers as the reference up to rounding), in bf16 autocast (with a bf16 teacher in KD),
and compiled where that pays. Random weights; `--shapes small`: 12 blocks of width 192 at
batch 128 (16 tokens) and of width 384 at batch 32 (64 tokens); `--shapes dit-xl`: DiT-XL/2
(28 blocks of 1152, 256 tokens) at batch 32. The masked-KD student keeps every other block.
Rounds alternate the sides; the table shows medians of the per-step times and, on a GPU, each
side's peak memory above the weights (activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import tempfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import leandit
from leandit.compress.depth import LearnablePruningJob, LearnableSettings
from leandit.compress.depth.scheme import parse_scheme
from leandit.compress.recovery.job import RecoveryJob, RecoverySettings
from leandit.models.blocks import keep_blocks
from leandit.evaluate.speed import seconds_of
from leandit.train.ema import EMA
from leandit.train.loop import LoopConfig, Trainer, _accumulate

SHAPES = {  # width, heads, latent size (patch 2), batch, depth
    "small": [(192, 3, 8, 128, 12), (384, 6, 16, 32, 12)],
    "dit-xl": [(1152, 16, 32, 32, 28)],
    "tiny": [(32, 2, 8, 4, 4)],  # for the test that keeps this script running
}


def kd_layers(depth: int) -> tuple[list[int], list[int]]:
    """The student's kept blocks (every other) and, per kept block, the last teacher block of
    its 1:2 group (what RepKD aligns it with)."""
    kept = list(range(0, depth, 2))
    return kept, [i + 1 for i in kept]


# -- the reference, re-implemented ---------------------------------------------------------
class ReferenceLoRALinear(nn.Module):
    """A frozen Linear plus alpha/rank * B(A(x)) (torchtune's LoRALinear, dropout 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = nn.Parameter(base.weight.data, requires_grad=False)
        self.bias = nn.Parameter(base.bias.data, requires_grad=False) if base.bias is not None else None
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_b(self.lora_a(x))


def convert_every_linear(module: nn.Module, rank: int, alpha: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, ReferenceLoRALinear(child, rank, alpha))
        else:
            convert_every_linear(child, rank, alpha)


class ReferenceGatedDiT(nn.Module):
    """The reference's DiT with per-group Gumbel gates in its forward (labels dropped inside)."""

    def __init__(self, dit: nn.Module, scheme: str, class_dropout: float = 0.1):
        super().__init__()
        self.dit = dit
        self.class_dropout = class_dropout
        groups = parse_scheme(scheme, len(dit.blocks)).groups
        self.options = [g.candidates() for g in groups]  # (C, M) 0/1 rows per group
        self.gumbel_gates = nn.ParameterList([nn.Parameter(torch.full((1, len(o)), 0.02)) for o in self.options])
        self.tau, self.scaling = 4.0, 100.0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.dit
        n = x.shape[0]
        if self.training and self.class_dropout > 0:
            y = torch.where(torch.rand(n, device=y.device) < self.class_dropout, d.y_embedder.num_classes, y)
        tokens = d.x_embedder(x) + d.pos_embed
        t_emb = d.t_embedder(t)
        c = t_emb + d.y_embedder(y)
        layer = 0
        for gate, option in zip(self.gumbel_gates, self.options):
            one_hot = F.gumbel_softmax(gate.repeat(n, 1) * self.scaling, tau=self.tau, hard=True, dim=1)
            mask = one_hot @ option.to(one_hot.device)  # (N, M)
            for j in range(mask.shape[1]):
                m = mask[:, j][:, None, None]
                tokens = d.blocks[layer](tokens, c, t_emb=t_emb) * m + tokens * (1 - m)
                layer += 1
        return d.unpatchify(d.final_layer(tokens, c))


class ReferenceDiffusion:
    """ADM's Gaussian diffusion as the reference ships it: float64 numpy tables, extracted per
    call; linear betas over 1000 steps, learned-range variance, MSE + VB."""

    def __init__(self, steps: int = 1000):
        betas = np.linspace(1e-4, 0.02, steps, dtype=np.float64)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        self.num_timesteps = steps
        self.betas = betas
        self.sqrt_ac, self.sqrt_1m_ac = np.sqrt(ac), np.sqrt(1.0 - ac)
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.post_logvar = np.log(np.append(post_var[1], post_var[1:]))
        self.post_c1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.post_c2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)

    @staticmethod
    def extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
        res = torch.from_numpy(arr).to(device=t.device)[t].float()
        while res.dim() < len(shape):
            res = res[..., None]
        return res + torch.zeros(shape, device=t.device)

    def q_sample(self, x0, t, noise):
        return self.extract(self.sqrt_ac, t, x0.shape) * x0 + self.extract(self.sqrt_1m_ac, t, x0.shape) * noise

    def q_posterior(self, x0, xt, t):
        mean = self.extract(self.post_c1, t, xt.shape) * x0 + self.extract(self.post_c2, t, xt.shape) * xt
        return mean, self.extract(self.post_logvar, t, xt.shape)

    def p_mean_variance(self, output, xt, t):
        c = xt.shape[1]
        eps, v = torch.split(output, c, dim=1)
        min_log = self.extract(self.post_logvar, t, xt.shape)
        max_log = self.extract(np.log(self.betas), t, xt.shape)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = self.extract(self.sqrt_recip_ac, t, xt.shape) * xt - self.extract(self.sqrt_recipm1_ac, t, xt.shape) * eps
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_var

    def vb(self, frozen, x0, xt, t, teacher_frozen=None):
        """KL(q or the teacher's p || p) in bits per dim; the decoder NLL at t = 0."""
        mean, log_var = self.p_mean_variance(frozen, xt, t)
        if teacher_frozen is None:
            true_mean, true_logvar = self.q_posterior(x0, xt, t)
        else:
            true_mean, true_logvar = self.p_mean_variance(teacher_frozen, xt, t)
        kl = 0.5 * (-1.0 + log_var - true_logvar + torch.exp(true_logvar - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        kl = kl.mean(dim=(1, 2, 3)) / np.log(2.0)
        nll = -_discretized_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / np.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, t, y, noise):
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y)
        c = x0.shape[1]
        eps = out[:, :c]
        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        return {"loss": mse + self.vb(frozen, x0, xt, t), "mse": mse, "out": out, "xt": xt}


def _discretized_log_likelihood(x, means, log_scales):
    def cdf(z):  # ADM's tanh approximation of the normal CDF
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))

    centered, inv_stdv = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_stdv * (centered + 1.0 / 255)), cdf(inv_stdv * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@torch.no_grad()
def reference_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = OrderedDict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


class ReferenceLearnable:
    def __init__(self, dit: nn.Module, device: torch.device, scheme: str = "1:2"):
        convert_every_linear(dit, rank=8, alpha=16)
        self.device = device
        self.model = ReferenceGatedDiT(dit, scheme).to(device)
        for name, p in self.model.named_parameters():
            p.requires_grad = "lora_" in name or "gumbel_gates" in name
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n]
        self.opt = torch.optim.AdamW([{"params": lora, "lr": 1e-4},
                                      {"params": list(self.model.gumbel_gates), "lr": 1e-3}], lr=1e-4, weight_decay=0.0)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.diffusion = ReferenceDiffusion()
        self.running = 0.0
        self.model.train()

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        self.model.tau = 4.0 + (0.1 - 4.0) * step / 999
        self.opt.zero_grad()
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.diffusion.training_losses(self.model, x, t, y, torch.randn_like(x))["loss"].mean()
        loss.backward()
        if loss.isnan().sum() == 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        reference_ema(self.ema, self.model, 0.999)
        self.running += loss.item()


class ReferenceMaskedKD:
    def __init__(self, teacher_dit: nn.Module, device: torch.device):
        self.device = device
        self.kept, self.teacher_layers = kd_layers(len(teacher_dit.blocks))
        self.teacher = teacher_dit.to(device).eval().requires_grad_(False)
        self.student = keep_blocks(teacher_dit, self.kept).requires_grad_(True).train()
        for block in (*self.student.blocks, *(self.teacher.blocks[i] for i in self.teacher_layers)):
            block.register_forward_hook(_keep_feature)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=2e-4, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=1000, eta_min=1e-4)
        self.ema = copy.deepcopy(self.student).requires_grad_(False)
        self.diffusion = ReferenceDiffusion()
        self.running = [0.0] * 4

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            loss, parts = self._loss(x, y, step)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        reference_ema(self.ema, self.student, 0.9999)
        for i, value in enumerate((loss, *parts)):
            self.running[i] += value.mean().item()

    def _loss(self, x: torch.Tensor, y: torch.Tensor, step: int):
        diffusion, n, c = self.diffusion, x.shape[0], x.shape[1]
        self.opt.zero_grad()
        t = torch.randint(0, diffusion.num_timesteps, (n,), device=self.device)
        noise = torch.randn_like(x)
        xt = diffusion.q_sample(x, t, noise)
        drop = torch.rand(n, device=self.device) < 0.1
        y = torch.where(drop, self.student.y_embedder.num_classes, y)  # shared with the teacher
        out = self.student(xt, t, y)
        with torch.no_grad():
            teacher_out = self.teacher(xt, t, y)
        eps, teacher_eps = out[:, :c], teacher_out[:, :c]
        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
        vb = diffusion.vb(frozen, x, xt, t)
        vb_kd = diffusion.vb(frozen, x, xt, t, teacher_frozen=teacher_out.detach())
        gt = ((noise - eps) ** 2).mean(dim=(1, 2, 3)) + vb
        feat = 0
        for slayer, tlayer in zip(self.student.blocks, self.teacher_layers):
            fs, ft = slayer.feature, self.teacher.blocks[tlayer].feature
            var_s, mean_s = torch.var_mean(fs, dim=[1, 2], keepdim=True)
            var_t, mean_t = torch.var_mean(ft, dim=[1, 2], keepdim=True)
            mask_s = (fs - mean_s).abs() < 2 * var_s.sqrt()
            mask_t = (ft - mean_t).abs() < 2 * var_t.sqrt()
            feat = feat + ((mask_s * fs - mask_t * ft.detach()) ** 2).mean(dim=(1, 2))
        feat = feat / len(self.teacher_layers)
        kd = ((eps - teacher_eps) ** 2).mean(dim=(1, 2, 3)) + vb_kd
        beta = 1e-2 * (1 - step / 999)
        return (0.9 * kd + 0.1 * gt + beta * feat).mean(), (kd, feat, gt)


def _keep_feature(module, inputs, output):
    module.feature = output


# -- leandit -------------------------------------------------------------------------------
class LeanditSteps:
    """The training loop's own step on a job, without the data loader and the checkpoints."""

    def __init__(self, job, run_dir: str, device: torch.device, lr: float, ema_decay: float, schedule: str = "constant",
                 precision: str = "fp32", compile: bool = False):
        config = LoopConfig(steps=1000, global_batch_size=1, lr=lr, ema_decay=ema_decay, grad_clip=1.0,
                            lr_schedule=schedule, final_lr_ratio=0.5 if schedule == "cosine" else 1.0,
                            precision=precision, log_every=10)
        self.trainer = Trainer(config, run_dir, device=str(device), progress=False)
        self.job = job
        job.setup(self.trainer.dist.device)
        self.optimizer, self.params = self.trainer._optimizer(job)
        self.ema = EMA(job.module, ema_decay)
        self.sums: dict = {}
        job.module.train()
        # As Trainer.fit does with --compile: the step calls a compiled module, and the job
        # compiles its teacher.
        self.train_module = torch.compile(job.module) if compile else job.module
        if compile:
            job.prepare_compile("inductor")

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        self.trainer.config.global_batch_size = x.shape[0]
        loss, logs, norm, bad = self.trainer._step(self.job, self.train_module, self.params, self.optimizer, (x, y), step)
        self.ema.update(self.job.module, ~bad)
        logs = {**logs, **self.job.on_step_end(step, self.job.module, self.ema.shadow)}
        _accumulate(self.sums, {"loss": loss, "grad_norm": norm, **logs}, ~bad)


# -- the benchmark -------------------------------------------------------------------------
def build_dit(width: int, heads: int, size: int, depth: int = 12) -> nn.Module:
    torch.manual_seed(0)
    model = leandit.build_model("DiT-S/2", input_size=size, in_channels=4, hidden_size=width, num_heads=heads,
                                depth=depth, num_classes=1000, space="latent")
    with torch.no_grad():  # adaLN-Zero starts at zero: give every branch weight real values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def sides(kind: str, shape: tuple, run_dir: str, device: torch.device, compiled: bool = True) -> dict:
    """The reference and leandit's variants of one step (`compiled`: with the --compile ones)."""
    width, heads, size, _, depth = shape
    dit = build_dit(width, heads, size, depth)
    cuda = device.type == "cuda"
    if kind == "learnable":
        def job(skip: str = "auto"):
            settings = LearnableSettings(scheme="1:2", recoverability="lora", skip_dropped_backward=skip)
            return LearnablePruningJob(copy.deepcopy(dit), settings)

        def lean(skip: str = "auto", **options):
            return LeanditSteps(job(skip), run_dir, device, 1e-4, 0.999, **options)

        variants = {"reference": ReferenceLearnable(copy.deepcopy(dit), device)}
        if cuda:  # skip auto = off on GPUs; compiled without the skip (static shapes)
            variants.update({"leandit bf16": lean(precision="bf16"), "leandit bf16, skip on": lean("on", precision="bf16")})
            if compiled:
                variants["leandit bf16 --compile"] = lean(precision="bf16", compile=True)
        else:
            variants.update({"leandit fp32, no skip": lean("off"), "leandit fp32": lean(), "leandit bf16": lean(precision="bf16")})
        return variants

    kept, teacher_layers = kd_layers(depth)

    def lean_kd(precision: str = "fp32", compile: bool = False):
        teacher_dtype = torch.bfloat16 if precision == "bf16" else None  # as `leandit finetune` does
        job = RecoveryJob(keep_blocks(dit, kept), copy.deepcopy(dit), RecoverySettings(), teacher_layers=teacher_layers,
                          teacher_dtype=teacher_dtype)
        return LeanditSteps(job, run_dir, device, 2e-4, 0.9999, "cosine", precision=precision, compile=compile)

    variants = {"reference": ReferenceMaskedKD(copy.deepcopy(dit), device)}
    if not cuda:
        variants["leandit fp32"] = lean_kd()
        if compiled:
            variants["leandit fp32 --compile"] = lean_kd(compile=True)
    variants["leandit bf16"] = lean_kd("bf16")
    if compiled:
        variants["leandit bf16 --compile"] = lean_kd("bf16", compile=True)
    return variants


def time_side(side, batch, steps: int, start: int) -> float:
    """Milliseconds per step of `steps` steps from step `start`."""
    def run() -> None:
        for step in range(start, start + steps):
            side.step(*batch, step)

    return seconds_of(run, batch[0].device) / steps * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and side")
    parser.add_argument("--kinds", default="learnable,masked-kd")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="leave out the --compile rows (they compile for a minute first)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"machine: {where}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| step | blocks x width | batch | tokens | side | ms per step | / reference | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        for shape in SHAPES[args.shapes]:
            width, heads, size, batch_size, depth = shape
            gen = torch.Generator().manual_seed(0)
            batch = (torch.randn(batch_size, 4, size, size, generator=gen).to(device),
                     torch.randint(0, 1000, (batch_size,), generator=gen).to(device))
            with tempfile.TemporaryDirectory() as run_dir:
                variants = sides(kind, shape, run_dir, device, compiled=not args.no_compile)
                peaks = {}
                for name, side in variants.items():
                    # The step's own peak above what every side's weights already hold: its
                    # activations, gradients and (created by the first step) optimizer state.
                    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    time_side(side, batch, 2, 0)  # warm-up (and compilation)
                    peaks[name] = (torch.cuda.max_memory_allocated(device) - held) / 2**30 if device.type == "cuda" else None
                times = {name: [] for name in variants}
                for r in range(args.rounds):
                    for name, side in variants.items():
                        times[name].append(time_side(side, batch, args.steps, 2 + r * args.steps))
            medians = {name: statistics.median(values) for name, values in times.items()}
            blocks = f"{depth}" if kind == "learnable" else f"{depth} -> {depth // 2}"
            for name, ms in medians.items():
                peak = f"{peaks[name]:.1f}" if peaks[name] is not None else "–"
                print(f"| {kind} | {blocks} x {width} | {batch_size} | {(size // 2) ** 2} | {name} | {ms:.0f} | "
                      f"{ms / medians['reference']:.2f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
