"""Stein / Hermite-tensor attack: a malicious server reconstructs the batch from one gradient.

Import-light: torch-heavy helpers (``_stein_core``) are imported inside the methods.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from defenda.interfaces import Attack, Knowledge, Reconstruction, Requirements, SharedUpdate, TaskData
from defenda.params import param

if TYPE_CHECKING:
    from torch import nn

_ACT_CHOICES = ("tanh", "sigmoid", "relu", "leaky_relu", "gelu", "silu", "softplus", "elu")


def _act_module(name: str) -> nn.Module:
    from torch import nn

    return {
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "relu": nn.ReLU,
        "leaky_relu": nn.LeakyReLU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "softplus": nn.Softplus,
        "elu": nn.ELU,
    }[name]()


def _act_name(module: nn.Module) -> str | None:
    from torch import nn

    table = [
        (nn.Tanh, "tanh"),
        (nn.Sigmoid, "sigmoid"),
        (nn.ReLU, "relu"),
        (nn.LeakyReLU, "leaky_relu"),
        (nn.GELU, "gelu"),
        (nn.SiLU, "silu"),
        (nn.Softplus, "softplus"),
        (nn.ELU, "elu"),
    ]
    for cls, name in table:
        if type(module) is cls:
            if name == "leaky_relu" and getattr(module, "negative_slope", 0.01) != 0.01:
                return None
            if name == "gelu" and getattr(module, "approximate", "none") != "none":
                return None
            if name in ("softplus", "elu") and (
                getattr(module, "beta", 1) != 1
                or getattr(module, "threshold", 20) != 20
                or getattr(module, "alpha", 1.0) != 1.0
            ):
                return None
            return name
    return None


class Stein(Attack):
    """Stein/Hermite-tensor reconstruction at attacker-chosen weights (malicious server).

    Wang, Lee, Lei, "Reconstructing Training Data from Model Gradient, Provably",
    AISTATS 2023 (PMLR 206). Spec: ``reference/attacks.md`` §1.

    The server replaces the model by a two-layer network
    ``Flatten → Linear(d, m, bias=False) → σ → Linear(m, C)`` whose first-layer rows
    are ``N(0, I)·gain/ρ̄`` (``ρ̄`` the median input norm of the attacker's public data,
    so ``wᵀx = O(1)``), drawn in antithetic pairs ``(w, -w)`` for even tensor orders,
    and whose second layer is ``a_cj = ±1/m`` (random signs per class, so that the
    first-layer gradient does not cancel under softmax; the identity only needs
    the rows of ``∇_A`` to be ``Σ_i r_ic σ(w_jᵀx_i)``).

    From one FedSGD gradient (cross-entropy, mean over the batch):

    1. span ``V`` (d, B) from the top singular vectors of ``∇_W`` (exact). B is the
       granted batch size, else the numerical rank of ``∇_W`` (the largest log-gap of
       its spectrum for a noisy update). Without a usable ``∇_W`` (``span="tensor"`` or
       a zero gradient): the order-2 estimator (μ₂ ≠ 0) or the order-3 estimator
       contracted with random θ's (odd σ), B̂ = singular values above 1.5× those of a
       sign-randomised null estimator (heuristic; grant ``batch_size`` when you can);
    2. the C×m second-layer gradient reduced to its K ≤ min(B, C-1) principal rows
       (never summed: the softmax rows cancel), centred, and — beyond the spec's
       centring and antithetic pairs — the lower Hermite orders of the same parity
       regressed out (control variates; halves the error at m = 1e4–1e5);
    3. the order-p Stein estimator ``T_k = (1/m) Σ_j Y_kj He_p(ρ̄ Vᵀw_j)`` (K, B^p),
       p = 3 when μ₃ carries the signal (tanh, sigmoid, ELU), else 4 (ReLU-like);
    4. decomposition ``T_k ≈ Σ_i λ_ik v_i^{⊗p}``: Jennrich simultaneous
       diagonalisation (random Gaussian row combinations) with ``restarts`` chosen by
       fit residual (never by ground truth), then Levenberg–Marquardt on the
       symmetric CP model over all K rows;
    5. sign and norm. tanh (odd): norms by nonlinear least squares of ``∇_A`` (exact
       model); the sign, invisible in ``∇_A``, from the cross-entropy residual pattern
       ``r_i = (p_i - e_y)/B`` (one dominant negative entry; C ≥ 3), else from the
       public data (nearest neighbour) or the image box. Other σ: sign by enumerating
       the 2^B patterns (greedy beyond B = 10); norm from cross-entropy consistency
       (positively homogeneous ReLU/LeakyReLU, where only ``ρ_i r_i`` is identified)
       or nonlinear least squares (sigmoid, GELU, SiLU, softplus, ELU);
    6. optional refinement: gradient matching of ``∇_A`` in the recovered span
       (Levenberg–Marquardt over ``z_i = Vᵀx_i`` and the residuals, on ``fit_rows``
       rows), at most ``refine_steps`` iterations; without noise it reaches the exact
       batch.

    Shapes: ``update`` holds ``∇_W`` (m, d) and ``∇_A`` (C, m) for the model returned by
    :meth:`prepare_model`. Returns ``inputs`` (B̂, *input_shape) in model space and
    ``labels`` (B̂,) (argmin of each recovered residual row). Batches whose tensor has
    more than ``max_tensor_entries`` entries (B^p) raise :class:`UnsupportedError`.
    ``info`` holds scalars — stage timings ``t_span``, ``t_estimator``, ``t_decomposition``,
    ``t_sign_scale``, ``t_refinement``; residuals ``jennrich_residual``, ``cp_residual``,
    ``scale_residual``, ``refine_residual``; ``batch_size_est``, ``order``, ``span``,
    ``sign_by`` — and lists (restart residuals, spectrum, recovered norms).
    """

    name = "stein"
    requires = Requirements(server="malicious", updates=frozenset({"gradient"}), knowledge=frozenset())

    @dataclass(frozen=True)
    class Params:
        width: int = param(100_000, "hidden width m of the attacker's two-layer network")
        activation: str = param("tanh", "hidden activation of the attacker's network", choices=_ACT_CHOICES)
        order: int = param(
            0, "Hermite tensor order: 3, 4, or 0 = from the activation (odd: 3, ReLU-like: 4)", choices=(0, 3, 4)
        )
        refine_steps: int = param(
            0, "Levenberg–Marquardt iterations of gradient matching on ∇_A after the tensor step (0 = off)"
        )
        restarts: int = param(8, "Jennrich restarts (the lowest fit residual is kept)")
        cp_iters: int = param(30, "Levenberg–Marquardt iterations on the symmetric CP fit (0 = off)")
        gain: float = param(
            0.0, "first-layer weight std times the typical input norm (0 = auto: 2 for sigmoid, else 1)"
        )
        antithetic: str = param(
            "auto", "draw weights in (w, -w) pairs: auto = for even orders", choices=("auto", "on", "off")
        )
        control: str = param(
            "lower",
            "variance reduction of ∇_A: centre, or regress out lower Hermite orders",
            choices=("none", "center", "lower"),
        )
        span: str = param(
            "auto",
            "span source: the ∇_W singular vectors (exact) or the tensor estimator",
            choices=("auto", "gradient", "tensor"),
        )
        head_scale: float = param(
            1.0, "second-layer weights a_cj = ±head_scale / m^head_power (random signs per class)"
        )
        head_power: float = param(
            1.0, "see head_scale: 1 gives the spec's a = ±1/m; 0.5 gives O(1) logits and a larger ∇_W"
        )
        min_span_gap: float = param(
            1.3, "span='auto': use ∇_W only when its spectrum drops by this factor after B̂ (else the tensor span)"
        )
        max_tensor_entries: int = param(
            2**16, "refuse (skip) batches whose order-p tensor has more entries than this (B^p)"
        )
        fit_rows: int = param(
            5_000, "rows of ∇_A used by the sign/norm fit and the refinement (the model there is exact)"
        )

    # ------------------------------------------------------------------ helpers

    def _gain(self, act: str | None = None) -> float:
        if self.params.gain > 0:
            return float(self.params.gain)
        return 2.0 if (act or self.params.activation) == "sigmoid" else 1.0

    def _order(self, act: str | None = None) -> int:
        if self.params.order:
            return int(self.params.order)
        from defenda_attacks import _stein_core as core

        act = act or self.params.activation
        return core.auto_order(act, self._gain(act))

    def _antithetic(self) -> bool:
        a = self.params.antithetic
        return (self._order() % 2 == 0) if a == "auto" else a == "on"

    @staticmethod
    def _layers(model: nn.Module) -> tuple[Any, str, Any] | str:
        from torch import nn

        mods = [
            m for m in (model.children() if isinstance(model, nn.Sequential) else []) if not isinstance(m, nn.Flatten)
        ]
        if len(mods) != 3:
            return "stein needs its own two-layer model (Linear → activation → Linear); use it with a malicious server"
        lin1, act, lin2 = mods
        if not (isinstance(lin1, nn.Linear) and isinstance(lin2, nn.Linear)) or lin1.bias is not None:
            return "stein needs Linear(d, m, bias=False) → activation → Linear(m, C)"
        name = _act_name(act)
        if name is None:
            return f"stein cannot model the activation {type(act).__name__}"
        return lin1, name, lin2

    # ------------------------------------------------------------------ plugin API

    def check(self, model: nn.Module, data: TaskData, knowledge: Knowledge) -> str | None:
        layers = self._layers(model)
        return layers if isinstance(layers, str) else None

    def prepare_model(self, model: nn.Module, data: TaskData) -> nn.Module:
        """The attacker's network: Gaussian first layer scaled to the public inputs' median norm."""
        from torch import nn

        p = self.params
        d = math.prod(data.input_shape)
        C = data.num_classes
        xs = data.public[0] if data.public is not None and len(data.public[0]) else data.train[0]
        rho = float(xs[:2000].reshape(min(len(xs), 2000), -1).to(torch.float64).norm(dim=1).median())
        rho = rho if rho > 0 else math.sqrt(d)
        params = list(model.parameters())
        device = params[0].device if params else torch.device("cpu")
        m = int(p.width)
        anti = self._antithetic()
        if anti:
            half = (m + 1) // 2
            Wh = torch.randn(half, d)
            W = torch.cat([Wh, -Wh])
            m = 2 * half
        else:
            W = torch.randn(m, d)
        W = W * (self._gain() / rho)
        signs = torch.randint(0, 2, (C, m)).to(torch.float32) * 2 - 1
        lin1, lin2 = nn.Linear(d, m, bias=False), nn.Linear(m, C)
        with torch.no_grad():
            lin1.weight.copy_(W.to(torch.float32))
            lin2.weight.copy_((signs * (p.head_scale / m**p.head_power)).to(torch.float32))
            lin2.bias.zero_()
        net = nn.Sequential(nn.Flatten(), lin1, _act_module(p.activation), lin2)
        return net.to(device).eval()

    def reconstruct(self, update: SharedUpdate, model: nn.Module, knowledge: Knowledge) -> Reconstruction:
        import numpy as np

        from defenda_attacks import _stein_core as core

        p = self.params
        layers = self._layers(model)
        if isinstance(layers, str):
            from defenda.errors import UnsupportedError

            raise UnsupportedError(layers)
        lin1, act, lin2 = layers
        if update.kind != "gradient":
            from defenda.errors import UnsupportedError

            raise UnsupportedError("stein reads a FedSGD gradient (update kind 'gradient')")
        by_id = {id(prm): t for prm, t in zip(model.parameters(), update.tensors)}
        gW, gA = by_id[id(lin1.weight)], by_id[id(lin2.weight)]
        dt = torch.float64
        W = lin1.weight.detach()
        dev = W.device
        m, d = W.shape
        rho_bar = math.sqrt(m * d) / core.frobenius(W)  # W has rows N(0, I/ρ̄²)
        order = self._order(act)
        rng = np.random.default_rng(knowledge.seed)
        gen = torch.Generator().manual_seed(int(knowledge.seed))
        B_known = knowledge.batch_size if "batch_size" in knowledge.granted and knowledge.batch_size else None
        info: dict[str, Any] = {"order": order, "width": m, "activation": act}
        t0 = time.perf_counter()

        # ---- step 1: span and batch size
        use_grad = p.span in ("auto", "gradient") and float(gW.abs().max()) > 0
        if p.span == "gradient" and not use_grad:
            from defenda.errors import UnsupportedError

            raise UnsupportedError("stein span='gradient' needs a nonzero first-layer weight gradient")
        if use_grad:
            V, sv = core.span_from_weight_gradient(gW.to(dev), B_known)
            k = V.shape[1]
            gap = float(sv[k - 1] / sv[k]) if 0 < k < len(sv) and float(sv[k]) > 0 else math.inf
            info["span_gap"] = gap if math.isfinite(gap) else 1e300
            # a noise-dominated ∇_W (e.g. a noise defense: its entries are O(1/m)) has a flat spectrum;
            # the tensor estimators average the noise of ∇_A over m instead
            use_grad = p.span == "gradient" or gap >= p.min_span_gap
        if use_grad:
            info["span"] = "gradient"
            Q, Y = core.principal_rows(gA.to(dev), max_rows=V.shape[1])
        else:
            Q, Y = core.principal_rows(gA.to(dev), max_rows=B_known)
            mu = core.hermite_coefficients(act, self._gain(act))
            span_order = 2 if abs(mu[2]) > 0.05 else 3
            V, sv, null = core.span_from_tensor(Y, W, rho_bar, span_order, B_known, gen)
            info["span"] = f"order{span_order}"
            info["null_singular_value"] = float(null[0] / sv[0])
            Q, Y = Q[:, : V.shape[1]], Y[: V.shape[1]]
        B = V.shape[1]
        info["batch_size_est"] = B
        info["singular_values"] = [float(x) for x in (sv[:12] / sv[0].clamp_min(1e-300))]
        if B == 0:
            return Reconstruction(inputs=torch.zeros(0, *knowledge.input_shape), info=info)
        if B**order > p.max_tensor_entries:
            from defenda.errors import UnsupportedError

            raise UnsupportedError(
                f"stein: batch size {B} gives a {B}^{order} tensor (> max_tensor_entries={p.max_tensor_entries}); "
                "the tensor method is for small batches"
            )
        P = core.project(W, V)  # (m, B): projected attacker weights
        U = P * rho_bar  # projected standard-normal weights
        t1 = time.perf_counter()

        # ---- step 2-3: variance reduction and the Stein estimator
        if p.control == "none":
            Yc = Y
        elif p.control == "center":
            Yc = Y - Y.mean(1, keepdim=True)
        else:
            feats = torch.cat([torch.ones(m, 1, dtype=dt, device=dev), core.lower_order_features(U, order)], 1)
            Yc = core.regress_out(Y, feats)
        T = core.hermite_moment(Yc, U, order)
        t2 = time.perf_counter()

        # ---- step 4: decomposition
        Tn = T.cpu().numpy()
        Vc, _lam, _res, dinfo = core.decompose(Tn, B, p.restarts, rng, p.cp_iters)
        info.update(dinfo)
        Zdir = torch.as_tensor(Vc, dtype=dt, device=dev)  # (B, n) unit
        t3 = time.perf_counter()

        # ---- step 5: sign and norm
        n_fit = min(m, max(p.fit_rows, 1))
        Ps, Ys = P[:n_fit], Y[:, :n_fit]
        rho0 = torch.full((Zdir.shape[1],), rho_bar * self._gain(act), dtype=dt, device=dev)

        def logits(xdir: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(xdir.to(lin1.weight.dtype).reshape(len(xdir), *knowledge.input_shape)).to(dt)

        if act in core.ODD:
            rho, R, sres = core.fit_norms(act, Ps, Ys, Zdir, rho0)
            Zdir, R, sign_by = self._odd_signs(Q, Zdir, R, rho, V, knowledge)
            info["sign_by"] = sign_by
        else:
            s, sres_sign = core.resolve_signs(act, Ps, Ys, Zdir, rho0)
            Zdir = Zdir * s[None]
            info["sign_residual"] = sres_sign
            if act in core.HOMOGENEOUS:
                Rb, sres = core._lsq(core._design_act(act, Ps, Zdir), Ys)  # β = ρ r (K, n)
                rho, _ = core.ce_norms((Q @ Rb).T, (V @ Zdir).T, logits, B_known or B)
                R = Rb / rho[None]
            else:
                rho, R, sres = core.fit_norms(act, Ps, Ys, Zdir, rho0)
        info["scale_residual"] = sres
        Z = Zdir * rho[None]
        t4 = time.perf_counter()

        # ---- step 6: optional refinement (gradient matching on ∇_A in the span)
        if p.refine_steps > 0:
            Z2, R2, rres = core.refine_second_layer(act, Ps, Ys, Z, R, p.refine_steps)
            if act in core.HOMOGENEOUS:
                nz = Z2.norm(dim=0)
                Zd2 = Z2 / nz[None]
                rho2, _ = core.ce_norms((Q @ (R2 * nz[None])).T, (V @ Zd2).T, logits, B_known or B)
                Z2, R2 = Zd2 * rho2[None], R2 * nz[None] / rho2[None]
            elif act in core.ODD:
                nz = Z2.norm(dim=0)
                Zd2, R2, _ = self._odd_signs(Q, Z2 / nz[None], R2, nz, V, knowledge)
                Z2 = Zd2 * nz[None]
            Z, R = Z2, R2
            info["refine_residual"] = rres
        t5 = time.perf_counter()

        Xhat = (V @ Z).T  # (n, d)
        labels = (Q @ R).argmin(dim=0)
        # flat scalars: the trial runner keeps only scalar info values
        info.update(t_span=t1 - t0, t_estimator=t2 - t1, t_decomposition=t3 - t2, t_sign_scale=t4 - t3)
        info["t_refinement"] = t5 - t4
        info["norms"] = [float(x) for x in rho]
        inputs = Xhat.to(torch.float32).reshape(len(Xhat), *knowledge.input_shape).cpu()
        # Heavy noise can leave the decomposition degenerate: report non-finite entries and
        # return them as a blank (mean) guess instead of NaNs.
        info["non_finite"] = int((~torch.isfinite(inputs)).sum())
        inputs = torch.nan_to_num(inputs, nan=0.0, posinf=0.0, neginf=0.0)
        return Reconstruction(inputs=inputs, labels=labels.cpu(), info=info)

    # ------------------------------------------------------------------ sign for odd σ

    @staticmethod
    def _odd_signs(
        Q: torch.Tensor, Zdir: torch.Tensor, R: torch.Tensor, rho: torch.Tensor, V: torch.Tensor, knowledge: Knowledge
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Odd σ: ``(x_i, r_i) → (-x_i, -r_i)`` leaves ∇_A unchanged. Cross-entropy breaks the tie
        (``r_i = (p_i - e_y)/B`` has one negative entry that dominates, C ≥ 3); with two classes
        (the flip is then a label swap) the sign closer to a public sample, or with fewer values
        outside the image box, is kept."""
        r = Q @ R  # (C, n)
        C = r.shape[0]
        flip = torch.zeros(r.shape[1], dtype=torch.bool, device=r.device)
        how = "cross_entropy"
        if C >= 3:
            flip = r.max(dim=0).values > -r.min(dim=0).values
        elif knowledge.public is not None and len(knowledge.public[0]):
            how = "public_data"
            pub = knowledge.public[0].reshape(len(knowledge.public[0]), -1).to(V)
            X = (V @ (Zdir * rho[None])).T
            flip = torch.cdist(-X, pub).min(dim=1).values < torch.cdist(X, pub).min(dim=1).values
        else:
            box = knowledge.box
            how = "box" if box is not None else "none"
            if box is not None:
                lo, hi = (b.reshape(-1).to(V) for b in box)
                X = (V @ (Zdir * rho[None])).T
                out_pos = ((X < lo) | (X > hi)).sum(1)
                out_neg = ((-X < lo) | (-X > hi)).sum(1)
                flip = out_neg < out_pos
        s = torch.where(flip, -1.0, 1.0).to(Zdir)
        return Zdir * s[None], R * s[None], how
