"""``secure-aggregation``: the server learns only the round's aggregate, never one client's update.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"; SecAgg+, Bell et al. 2020) lets the
server decode Σ_k x_k mod M from masked integer vectors while each masked
vector alone is uniformly random. In a federation (``[federation]`` in a study)
the server, and so every attack, observes only :meth:`SecureAggregation.secure_aggregate`;
the clients' updates are not changed (``transform`` is the identity). Outside
a federation (one client, no aggregate) the defense is the undefended update.

Two decodings, chosen by ``quantization_range`` (Q):

* ``Q = 0`` — the exact weighted sum Σ p_k Δ_k (semantics of the protocol with
  no encoding error).
* ``Q > 0`` — Flower's SecAgg+ encoding (``secaggplus_mod`` /
  ``SecAggPlusWorkflow``, flwr 1.42), simulated step by step on the clients'
  *updates* Δ_k:

  1. weight ratio r_k = p_k·W / ``max_weight`` with W = Σ_k ``batch_size_k``
     (the samples behind the round), so that r_k = n_k / ``max_weight``, Flower's
     ratio, when p_k = n_k / W (the default weights); ``max_weight = 0``
     quantizes p_k itself (r_k = p_k, Σ r_k = 1). q_k = round(r_k·Q), dq_k = q_k / Q;
  2. each entry of dq_k·Δ_k is clipped to ±c (``clipping_range``), shifted by
     +c, scaled by Q / (2c) and stochastically rounded (``ceil``, minus 1 with
     probability ``ceil − value``; unbiased) with the trial's generator;
  3. q_k is prepended, a private self-mask and pairwise masks (+m_ij at i,
     −m_ij at j, from seeds drawn from the generator) are added mod M
     (``modulus_range``), in int64 arithmetic;
  4. the server sums mod M, removes the self-masks (the seeds it reconstructs
     from shares in the protocol; the pairwise masks cancel by themselves),
     reads Σ q_k, dequantizes v ↦ v·2c/Q − c, adds −(K − 1)·c and multiplies by
     Q / Σ q_k: the decoded value is Σ dq_k Δ_k / Σ dq_k plus the rounding error
     (then times Σ p_k, which is 1 unless the weights are not normalised, as with
     DP-FedAvg's fixed denominator under Poisson sampling).

  Per coordinate the decoded average is within 2Kc / (Q·Σ dq_k) of the
  dq-weighted mean (each client's rounding error is below one step 2c/Q) and
  unbiased; it differs from the p-weighted mean also through the weight
  rounding |dq_k − r_k| ≤ 1/(2Q). Overflow: every entry is at most Q, so
  K·Q < M is required (K < 1024 with Flower's defaults); K·Q ≥ M raises.

Difference to Flower: Flower quantizes the weighted *parameters* dq_k·θ_k; this
simulation quantizes the weighted *updates* dq_k·Δ_k (the attacks consume
updates). The rounding-error bound is the same in absolute terms, but relative
to the signal it is far larger for updates (Δ_k ≪ θ_k), and the clipping
differs: parameters with |dq·θ| > c (e.g. BatchNorm counters) are clipped by
Flower, while updates rarely reach c. Clipped entries are reported with a
warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from defenda import Defense, SharedUpdate, param
from defenda.federation.aggregation import weighted_sum

#: int64 arithmetic holds a + b for a, b < M only up to this modulus
MAX_MODULUS = 2**62


def stochastic_round(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flower's ``_stochastic_round``: ``ceil(v)``, minus 1 where a uniform draw < ``ceil(v) − v`` (unbiased)."""
    up = torch.ceil(values)
    draw = torch.rand(values.shape, generator=generator, dtype=torch.float64)
    return (up - (draw < (up - values)).to(up.dtype)).to(torch.int64)


def quantize(values: torch.Tensor, clipping_range: float, quantization_range: int,
             generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """Flower's ``quantize``: clip to ±c, shift by +c, scale by Q/(2c), stochastic rounding to [0, Q].

    :returns: the int64 entries and how many entries were clipped.
    """
    v = values.to(torch.float64)
    clipped = int((v.abs() > clipping_range).sum())
    scaled = (v.clamp(-clipping_range, clipping_range) + clipping_range) * (quantization_range / (2 * clipping_range))
    return stochastic_round(scaled, generator).clamp(0, quantization_range), clipped


def dequantize(total: torch.Tensor, clipping_range: float, quantization_range: int, clients: int) -> torch.Tensor:
    """Flower's server-side decoding of a sum of ``clients`` quantized vectors: v·2c/Q − c − (K − 1)·c."""
    return total.to(torch.float64) * (2 * clipping_range / quantization_range) - clipping_range * clients


def _mask(length: int, modulus: int, seed: int) -> torch.Tensor:
    """The PRG expansion of one mask seed: ``length`` uniform integers in [0, M)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, modulus, (length,), generator=gen, dtype=torch.int64)


def mask_vectors(vectors: list[torch.Tensor], modulus: int,
                 generator: torch.Generator | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What each client sends: its int64 vector plus a private self-mask and the pairwise masks, mod M.

    Client i adds m_ij for every j > i and subtracts m_ji for every j < i (a complete graph, SecAgg;
    SecAgg+ uses a sparse neighbourhood, which sums to the same result). Seeds are drawn from ``generator``.

    :returns: the masked vectors and Σ self-masks mod M (what the server reconstructs from the shares).
    """
    k = len(vectors)
    length = vectors[0].numel()
    seeds = torch.randint(0, 2**62, (k + k * (k - 1) // 2,), generator=generator, dtype=torch.int64).tolist()
    self_seeds, pair_seeds = seeds[:k], iter(seeds[k:])
    masked = [(v.to(torch.int64) + _mask(length, modulus, s)) % modulus for v, s in zip(vectors, self_seeds)]
    for i in range(k):
        for j in range(i + 1, k):
            m = _mask(length, modulus, next(pair_seeds))
            masked[i] = (masked[i] + m) % modulus
            masked[j] = (masked[j] - m) % modulus
    self_total = torch.zeros(length, dtype=torch.int64)
    for s in self_seeds:
        self_total = (self_total + _mask(length, modulus, s)) % modulus
    return masked, self_total


def unmask_sum(masked: list[torch.Tensor], self_masks: torch.Tensor, modulus: int) -> torch.Tensor:
    """The server's decoding: Σ masked vectors mod M minus the self-masks mod M (the pairwise ones cancel)."""
    total = torch.zeros_like(self_masks)
    for m in masked:
        total = (total + m) % modulus
    return (total - self_masks) % modulus


def secure_sum(vectors: list[torch.Tensor], modulus: int, generator: torch.Generator | None) -> torch.Tensor:
    """Σ vectors mod M as the server decodes it from masked inputs (bit for bit (Σ vectors) mod M)."""
    masked, self_masks = mask_vectors(vectors, modulus, generator)
    return unmask_sum(masked, self_masks, modulus)


def _flat(update: SharedUpdate) -> torch.Tensor:
    return torch.cat([t.detach().to("cpu", torch.float64).reshape(-1) for t in update.tensors])


@dataclass(frozen=True)
class SecAggParams:
    quantization_range: int = param(
        0, "Q: quantization levels of Flower's SecAgg+ encoding (Flower's default 4194304 = 2^22); 0 = no "
           "encoding, the exact weighted sum; fewer levels is a coarser aggregate", strength="down")
    clipping_range: float = param(8.0, "c: each weighted entry is clipped to ±c before quantization (Flower: 8.0)")
    modulus_range: int = param(2**32, "M: the modulus of the masked sums, a power of two > Q (Flower: 2^32)")
    max_weight: float = param(1000.0, "Flower's max_weight: weight ratio = p_k·(samples in the round)/max_weight "
                                      "(= n_k/max_weight for the default weights); 0 = quantize p_k itself")

    def __post_init__(self) -> None:
        q, m = self.quantization_range, self.modulus_range
        if isinstance(q, bool) or not isinstance(q, int) or q < 0:
            raise ValueError(f"quantization_range must be an integer >= 0 (0 = exact sum), got {q!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 2 or m & (m - 1) or m > MAX_MODULUS:
            raise ValueError(f"modulus_range must be a power of two in [2, 2^62], got {m!r}")
        if q >= m:
            raise ValueError(f"quantization_range must be < modulus_range, got Q={q}, M={m}")
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ValueError(f"clipping_range must be a finite number > 0, got {self.clipping_range}")
        if not (math.isfinite(self.max_weight) and self.max_weight >= 0):
            raise ValueError(f"max_weight must be a finite number >= 0 (0 = quantize p_k), got {self.max_weight}")


class SecureAggregation(Defense):
    """Secure aggregation: the server decodes only the round's weighted sum (optionally Flower's SecAgg+ encoding).

    Paper: K. Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
    CCS 2017; encoding of Flower's SecAgg+ (J. Bell et al., CCS 2020). <https://eprint.iacr.org/2017/281>

    Acts on: what the server observes in a federation (server-side): the clients' updates are
    sent unchanged but masked, so the server (and every attack) sees only the aggregate of the
    round — with ``quantization_range = 0`` the exact Σ p_k Δ_k, otherwise Flower's SecAgg+
    quantized, masked and decoded weighted average of the *updates* (Flower quantizes weighted
    parameters; see the module docstring for the error bound 2Kc/(Q·Σ dq_k) and the
    difference). Gives no formal guarantee (mixing only), adds no noise. Outside a federation it
    changes nothing. The aggregate's ``batch_size`` is the round's total number of samples and
    ``meta["secure_aggregation"]`` records the clients, Q, c, M, ``max_weight`` and Σ q_k.

    Arguments:
        quantization_range (int, 0): Q, quantization levels (Flower: 4194304 = 2^22; 0 = the exact sum);
            the strength, fewer is stronger (a coarser aggregate).
        clipping_range (float, 8.0): c, each weighted entry is clipped to ±c before quantization.
        modulus_range (int, 4294967296): M, the modulus of the masked sums, a power of two > Q.
        max_weight (float, 1000.0): weight ratio = p_k·(samples in the round)/max_weight (0 = quantize p_k).

    Example::

        [federation]
        clients = 20
        clients_per_round = 5

        [[defenses]]
        name = "secure-aggregation"
        quantization_range = [0, 4194304, 65536]
    """

    name = "secure-aggregation"
    Params = SecAggParams
    #: coarser than 2^16 the error 2Kc/(Q·Σ dq) swamps typical updates at Flower's max_weight (FedSGD, b = 8:
    #: Σ dq ≈ K·8/1000, so ≈ 0.03 per coordinate at 2^16 and ≈ 0.5 at 2^12)
    default_sweep = (2**22, 2**20, 2**18, 2**16)
    hides_client_updates = True

    def encode(self, updates: list[SharedUpdate], weights: list[float],
               generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """The clients' integer vectors before masking: ``[q_k, quantized dq_k·Δ_k ...]`` each (Q > 0),
        and what the decoding needs (``dq`` per client, clipped entries)."""
        p = self.params
        q, c = p.quantization_range, p.clipping_range
        if q <= 0:
            raise ValueError("secure-aggregation: encode needs quantization_range > 0")
        if not updates or len(updates) != len(weights):
            raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(weights)} weights")
        k = len(updates)
        if k * q >= p.modulus_range:
            raise ValueError(f"secure-aggregation: {k} clients × quantization_range {q} = {k * q} >= modulus_range "
                             f"{p.modulus_range}; the masked sum would overflow (use fewer clients per round, a "
                             f"smaller quantization_range or a larger modulus_range)")
        samples = sum(u.batch_size for u in updates)
        ratios = [w * samples / p.max_weight if p.max_weight > 0 else w for w in weights]
        if any(r > 1 for r in ratios):
            warnings.warn(f"secure-aggregation: a weight ratio exceeds 1 (max {max(ratios):.3g}); Flower warns the "
                          "same (raise max_weight)", RuntimeWarning, stacklevel=3)
        q_ratios = [round(r * q) for r in ratios]
        if sum(q_ratios) <= 0:
            raise ValueError(f"secure-aggregation: every weight rounds to 0 at quantization_range {q} (ratios "
                             f"{[f'{r:.3g}' for r in ratios]}); raise quantization_range or lower max_weight")
        if sum(q_ratios) >= p.modulus_range:
            raise ValueError(f"secure-aggregation: the total quantized weight {sum(q_ratios)} overflows "
                             f"modulus_range {p.modulus_range}; raise max_weight")
        vectors, clipped = [], 0
        for u, qr in zip(updates, q_ratios):
            entries, n_clipped = quantize(_flat(u) * (qr / q), c, q, generator)
            clipped += n_clipped
            vectors.append(torch.cat([torch.tensor([qr], dtype=torch.int64), entries]))
        return vectors, {"q_ratios": q_ratios, "clipped": clipped, "ratios": ratios}

    def decode(self, total: torch.Tensor, clients: int) -> torch.Tensor:
        """The flat decoded average Σ dq_k Δ_k / Σ dq_k from the unmasked sum ``[Σ q_k, Σ entries ...]``."""
        p = self.params
        weight = int(total[0])
        return dequantize(total[1:], p.clipping_range, p.quantization_range, clients) * (p.quantization_range / weight)

    def secure_aggregate(self, updates: list[SharedUpdate], weights: list[float],
                         generator: torch.Generator | None = None) -> SharedUpdate:
        p = self.params
        exact = weighted_sum(updates, weights)
        info: dict[str, Any] = {"clients": len(updates), "quantization_range": p.quantization_range,
                                "clipping_range": p.clipping_range, "modulus_range": p.modulus_range,
                                "max_weight": p.max_weight, "exact": p.quantization_range == 0}
        if p.quantization_range == 0:
            return exact.replace(exact.tensors, secure_aggregation=info)
        vectors, enc = self.encode(updates, weights, generator)
        # Flower returns the normalised average; times Σ p_k it estimates Σ p_k Δ_k like the exact path
        # (the same when the weights sum to 1, e.g. not under DP-FedAvg's fixed denominator with Poisson sampling)
        flat = self.decode(secure_sum(vectors, p.modulus_range, generator), len(updates)) * float(sum(weights))
        if enc["clipped"]:
            warnings.warn(f"secure-aggregation: {enc['clipped']} weighted entries exceeded clipping_range "
                          f"{p.clipping_range} and were clipped (biased aggregate)", RuntimeWarning, stacklevel=2)
        tensors, offset = [], 0
        for t in exact.tensors:
            n = t.numel()
            tensors.append(flat[offset:offset + n].reshape(t.shape).to(t.device, t.dtype))
            offset += n
        info.update(total_quantized_weight=sum(enc["q_ratios"]), clipped_entries=enc["clipped"],
                    step=2 * p.clipping_range / p.quantization_range)
        return exact.replace(tensors, secure_aggregation=info)
