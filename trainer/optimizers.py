"""The DiT trainer's optimizers: AdamW, AdamW with 8-bit states (bitsandbytes), CAME (came_pytorch),
and `StochasticAdamW` for weights held in bf16.

bf16 weights cannot take AdamW's small updates by rounding to nearest: an update under half a
bf16 step (1/256 of the weight) is lost every time, so a fine-tune at 1e-5 barely moves.
`StochasticAdamW` keeps both moments in fp32, computes the update in fp32 and writes the weight
back rounded up or down at random with the probabilities that make the rounding unbiased
(stochastic rounding): the expected weight follows the fp32 trajectory. Its random bits come from
a generator seeded by (seed, step, parameter), so a resumed run rounds as the uninterrupted one.
For fp32 weights it is AdamW exactly.

The optional packages are imported only when chosen; a missing one is a `SanaInputError` naming
the option and the package to install, raised before anything is loaded.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch

from sana.errors import SanaInputError

from . import distributed

OPTIONAL_PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "came": ("came_pytorch", "came-pytorch")}


def check_optimizer_available(name: str) -> None:
    """`SanaInputError` naming `--optimizer` when the package `name` needs is not installed."""
    if name not in OPTIONAL_PACKAGES:
        return
    module, package = OPTIONAL_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise SanaInputError(f"--optimizer {name}: needs the {package} package, which is not installed "
                             f"(pip install {package}, or pip install -e '.[train]')")


def _import_optional(name: str):
    module, package = OPTIONAL_PACKAGES[name]
    try:
        return importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as error:  # installed but unusable (e.g. no native library for this machine)
        raise SanaInputError(f"--optimizer {name}: the {package} package cannot be imported here ({error})") from None


def make_optimizer(params: list[torch.Tensor], name: str, *, lr: float, betas: list[float], eps: float,
                   weight_decay: float, seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`: stochastic-rounding AdamW for "adamw" when the
    parameters are low-precision floats, torch's AdamW for fp32 ones."""
    if name == "came":
        came = _import_optional("came")
        came_betas = tuple(betas) if len(betas) == 3 else (0.9, 0.999, 0.9999)
        return came.CAME(params, lr=lr, weight_decay=weight_decay, betas=came_betas, eps=(1e-30, 1e-16))
    if name == "adamw8bit":
        bnb = _import_optional("adamw8bit")
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas[:2]), eps=eps, weight_decay=weight_decay)
    if any(p.dtype != torch.float32 for p in params):
        return StochasticAdamW(params, lr=lr, betas=tuple(betas[:2]), eps=eps, weight_decay=weight_decay, seed=seed)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas[:2]), eps=eps, weight_decay=weight_decay)


def round_to_bf16(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 → bf16 with unbiased stochastic rounding: a value between two bf16 neighbours becomes
    the farther-from-zero one with probability (distance past the nearer-to-zero one) / step."""
    bits = values.contiguous().view(torch.int32)
    fraction = bits & 0xFFFF  # what truncating to bf16 drops
    truncated = bits & ~0xFFFF
    draw = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    rounded = torch.where(draw < fraction, truncated + 0x10000, truncated)
    return rounded.view(torch.float32).to(torch.bfloat16)


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) with fp32 moments for parameters of
    any float dtype; low-precision parameters are written back by stochastic rounding."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # laid out as the parameter (FSDP: a DTensor shard), in fp32
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                weight, grad = distributed.local_tensor(p), distributed.local_tensor(p.grad).float()
                exp_avg, exp_avg_sq = distributed.local_tensor(state["exp_avg"]), distributed.local_tensor(state["exp_avg_sq"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
                updated = weight.float().mul_(1 - group["lr"] * group["weight_decay"])
                updated.addcdiv_(exp_avg, denominator, value=-group["lr"] / (1 - beta1**step))
                if weight.dtype == torch.bfloat16:
                    generator = torch.Generator(device=weight.device).manual_seed(
                        (self.seed * 1_000_003 + step * 65_537 + index) % (2**63))
                    weight.copy_(round_to_bf16(updated, generator))
                else:
                    weight.copy_(updated)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that the moments stay fp32 (torch casts them to the parameter's dtype)."""
        moments = {int(i): {k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, tensors in moments.items():
            for key, value in tensors.items():
                self.state[params[i]][key] = value.to(device=self.state[params[i]][key].device, dtype=torch.float32, copy=True)
