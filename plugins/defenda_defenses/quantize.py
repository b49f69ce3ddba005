"""``quantize``: uniform k-bit quantization of the shared update, one scale per tensor.

Gradient quantization as a communication-compression defense (QSGD, Alistarh
et al. 2017; signSGD, Bernstein et al. 2018; studied as a defense against
gradient inversion by Zhu et al. 2019, who found half precision no defense,
and by Wei et al. 2020). Every tensor of the update is quantized on its own:

* ``bits ≥ 2`` — symmetric uniform quantization (the usual signed int-k scheme,
  e.g. int8 = −127 … 127): levels ``j·s/(2^(bits−1) − 1)`` for integers
  ``|j| ≤ 2^(bits−1) − 1``, with the per-tensor scale ``s = max|g|`` — that is
  ``2^bits − 1`` levels, zero among them (so pruned/zero entries stay zero and
  ``bits = 2`` is ternary {−s, 0, s}, as in TernGrad, Wen et al. 2017).
* ``bits = 1`` — sign compression with a per-tensor scale: deterministic rounding
  sends ``g`` to ``s·sign(g)`` with ``s = mean|g|`` (the scaled sign of EF-signSGD,
  Karimireddy et al. 2019; a zero entry is sent as ``+s``, so there are 2 levels);
  stochastic rounding sends ``+m`` with probability ``(1 + g/m)/2`` and ``−m``
  otherwise, ``m = max|g|`` (unbiased).

``rounding = "deterministic"`` rounds to the nearest level; ``"stochastic"``
rounds up with probability equal to the fractional position between the two
neighbouring levels (unbiased: E[ĝ] = g), drawing from the trial's generator.
Fewer bits is stronger (``strength="down"``). Computation is in float64, cast
back to the update's dtype, so a tensor never takes more than ``2^bits`` values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defenda import Defense, SharedUpdate, param

MAX_BITS = 32


def _uniform(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def quantize_tensor(t: torch.Tensor, bits: int, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One tensor quantized to at most ``2^bits`` values (see the module docstring)."""
    if t.numel() == 0:
        return t.clone()
    g = t.detach().to("cpu", torch.float64)
    if bits == 1:
        if stochastic:
            m = g.abs().max()
            if m == 0:
                return t.clone()
            p_up = (1 + g / m) / 2
            out = torch.where(_uniform(g.shape, generator) < p_up, m, -m)
        else:
            s = g.abs().mean()
            out = torch.where(g >= 0, s, -s)
    else:
        scale = g.abs().max()
        if scale == 0:  # an all-zero tensor is already one level
            return t.clone()
        top = 2 ** (bits - 1) - 1
        step = scale / top
        pos = g / step
        if stochastic:
            q = torch.floor(pos + _uniform(g.shape, generator))
        else:
            q = torch.round(pos)
        out = q.clamp(-top, top) * step
    return out.to(t.device, t.dtype)


class Quantize(Defense):
    """Uniform k-bit quantization of the update with a per-tensor scale; 1 bit is the scaled sign.

    Paper: D. Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", NeurIPS 2017. <https://arxiv.org/abs/1610.02132>

    Acts on: the update after the client computed it: every tensor is quantized on its own
    to at most ``2^bits`` levels (symmetric, scale ``max|g|``; 1 bit: ``±mean|g|``), rounding
    to the nearest level or stochastically (unbiased). The server is told ``quant_bits`` and
    ``quant_rounding`` in ``meta``.

    Arguments:
        bits (int, 8): bits per entry, 1 … 32; the strength, fewer is stronger.
        rounding (str, "deterministic"): ``deterministic`` (nearest level) or ``stochastic`` (unbiased).

    Example::

        [[defenses]]
        name = "quantize"
        bits = [8, 4, 2, 1]
    """

    name = "quantize"
    default_sweep = (8, 4, 2, 1)

    @dataclass(frozen=True)
    class Params:
        bits: int = param(8, f"bits per entry, 1 … {MAX_BITS}: at most 2^bits levels per tensor, symmetric "
                             "with scale max|g| (1 = sign, scale mean|g|); fewer is stronger", strength="down")
        rounding: str = param("deterministic", "round to the nearest level ('deterministic') or up with "
                              "probability = fractional position ('stochastic', unbiased)",
                              choices=("deterministic", "stochastic"))

        def __post_init__(self) -> None:
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
                raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {self.bits!r}")
            if self.rounding not in ("deterministic", "stochastic"):
                raise ValueError(f"rounding must be 'deterministic' or 'stochastic', got {self.rounding!r}")

    def transform(self, update: SharedUpdate, generator: torch.Generator | None) -> SharedUpdate:
        bits, stochastic = self.params.bits, self.params.rounding == "stochastic"
        out = [quantize_tensor(t, bits, stochastic, generator) for t in update.tensors]
        return update.replace(out, quant_bits=bits, quant_rounding=self.params.rounding)
