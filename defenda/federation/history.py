"""Earlier rounds of the federation, as an honest-but-curious server observed them.

Some attacks (GIML) learn from *other* clients' gradients seen in earlier rounds,
not from images. The harness hands them a :class:`GradientHistory` when the study
grants the knowledge flag ``gradient_history``: it replays a simple FedSGD
federation — every round ``clients`` other clients each share the gradient of one
private sample, then the server applies the mean — and yields, per round, what the
server sees: the global model and the clients' gradients.

Whose data: the other clients' samples are drawn from the split held apart from
the victims (``TaskData.public``), so no victim image ever enters the history. The
attack receives gradients only; the samples stay inside this object (plugins must
use :meth:`GradientHistory.rounds` and nothing else).

The history is the federation's recorded past: undefended, and the same for every
trial of a study (fixed seed), so a prior learned from it can be cached once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from defenda.federation.client import gradient


@dataclass
class ObservedRound:
    """One FL round as the server saw it.

    :ivar round: 1-based round number.
    :ivar model: the global model the clients used in this round (the same object across
        rounds: it is updated in place after the consumer has seen the round).
    :ivar gradients: per client, one gradient tensor per ``model.named_parameters()`` entry.
    :ivar names: the parameter names.
    """

    round: int
    model: nn.Module
    gradients: list[list[torch.Tensor]]
    names: list[str]


class GradientHistory:
    """A replayable record of earlier FedSGD rounds (see the module docstring).

    :param x, y: the other clients' samples, model space (never handed out).
    :param lr: the server's SGD step size between rounds (the study's ``lr``).
    :param seed: which clients take part in which round.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, lr: float, seed: int = 0) -> None:
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"a gradient history needs samples with one label each, got {len(x)} and {len(y)}")
        self._x, self._y = x.detach().cpu(), y.detach().cpu().long()
        self.lr = float(lr)
        self.seed = int(seed)

    @property
    def fingerprint(self) -> str:
        """A short hash naming this history (data, step size, seed): a cache key for what is learned from it."""
        h = hashlib.sha256()
        for t in (self._x.float().contiguous(), self._y.contiguous()):
            h.update(t.numpy().tobytes())
        h.update(f"{self.lr!r}/{self.seed}".encode())
        return h.hexdigest()[:16]

    def _clients(self, t: int, count: int) -> list[int]:
        """Sample indices of round ``t``'s clients: distinct classes while the classes last."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        classes = self._y.unique()
        chosen = classes[torch.randperm(len(classes), generator=gen)][:count]
        idx = []
        for c in chosen.tolist():
            pool = torch.nonzero(self._y == c).flatten()
            idx.append(int(pool[torch.randint(len(pool), (1,), generator=gen)]))
        while len(idx) < count:  # fewer classes than clients: repeat classes
            idx.append(int(torch.randint(len(self._y), (1,), generator=gen)))
        return idx

    def rounds(self, model: nn.Module, *, rounds: int, clients: int, start: int = 0) -> Iterator[ObservedRound]:
        """Rounds ``start+1 … rounds`` of the federation, starting from the global ``model``.

        ``model`` is updated in place after each yielded round
        (``θ ← θ − lr·mean_k g_k``), so the global model drifts as in federated
        training; a resumed run (``start`` > 0, with the model of that round) sees
        the same rounds as an uninterrupted one. The step of round t happens when round
        t + 1 is requested (or the iterator ends), after the consumer has seen round t: a
        checkpoint to resume from after round t must copy ``model`` at that point, not
        while it handles round t.
        """
        if clients < 1:
            raise ValueError(f"clients per round must be >= 1, got {clients}")
        names = [n for n, _ in model.named_parameters()]
        device = next(model.parameters()).device
        x, y = self._x.to(device), self._y.to(device)
        for t in range(start + 1, rounds + 1):
            grads = [
                gradient(model, x[i : i + 1], y[i : i + 1])
                for i in self._clients(t, clients)
            ]
            yield ObservedRound(round=t, model=model, gradients=grads, names=names)
            with torch.no_grad():
                for k, p in enumerate(model.parameters()):
                    p.sub_(self.lr * torch.stack([g[k] for g in grads]).mean(0))
