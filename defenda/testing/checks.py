"""The contract checks: :func:`check_defense`, :func:`check_attack`, :func:`check_metric`.

Updates and reconstructions are validated by :mod:`defenda.contracts`, the same
validators the harness applies in a study; the checks here add what only a test
can see (determinism, an untouched model, time budgets, well-declared classes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from defenda.grants import visible_update
from defenda.testing.probes import _class_problems, _construct, _model_changes, _Problems, _snapshot, _timed
from defenda.testing.tiny import TINY_LOCAL_STEPS, TINY_LR, TinyCase, make_tiny_case

if TYPE_CHECKING:
    import torch
    from torch import nn

    from defenda.interfaces import Attack, Defense, Metric
    from defenda.records import Knowledge, Reconstruction, SharedUpdate


# --------------------------------------------------------------------------- defenses


def check_defense(
    cls: type[Defense],
    params: Mapping[str, Any] | None = None,
    *,
    case: TinyCase | None = None,
    kinds: Sequence[str] = ("gradient", "delta"),
    budget_s: float = 60.0,
) -> SharedUpdate:
    """Check a defense class against the contract; return its update on the tiny case.

    Checks: the class registers (slug, ``Params`` with defaults and help, one strength
    field, a docstring); it constructs with defaults and with ``params``; every value of
    ``default_sweep`` is a valid strength; after ``calibrate`` (as the harness does),
    ``client_update`` on the tiny case (FedSGD
    gradient and FedAvg delta, at ``params`` and at the strongest swept strength)
    returns a :class:`SharedUpdate` aligned with ``model.named_parameters()``, finite,
    detached, of the requested kind, with well-shaped ``masks``; leaves the model
    untouched; gives identical tensors for the same seed; runs within ``budget_s``
    each; ``client_batch_size`` and ``epsilon`` return sensible values; in a federation the
    aggregation weights sum to at most 1, ``secure_aggregate`` (when the defense hides client
    updates) and ``server_update`` return aligned updates, and the accounting hooks answer sensibly;
    a defense with ``poisson_sampling`` accepts an empty FedSGD batch and accounts the rate
    q = min(1, b/n_k) the federation draws at.
    """
    problems = _Problems(f"defense {getattr(cls, '__name__', cls)!r}")
    _class_problems("defense", cls, problems)
    problems.raise_if_any()
    defense = _construct(cls, params, problems)
    variants = [defense, *_swept_variants(cls, params, problems)]
    case = case or make_tiny_case()
    first = None
    for variant in variants:
        for kind in kinds:
            update = _defense_runs(variant, kind, case, problems, budget_s)
            first = first or update
    _accounting_problems(defense, problems)
    _federation_problems(defense, case, problems)
    _poisson_problems(defense, case, problems)
    problems.raise_if_any()
    assert first is not None
    return first


def _swept_variants(cls: type[Defense], params: Mapping[str, Any] | None, problems: _Problems) -> list[Defense]:
    """Check every ``default_sweep`` value; the defense at the strongest one (none without a sweep)."""
    from defenda.params import strength_param

    strength = strength_param(cls.Params)
    if strength is None:
        return []
    for value in cls.default_sweep:
        try:
            cls(**{**dict(params or {}), strength.name: value})
        except Exception as exc:
            problems.add(f"default_sweep value {value!r} is not a valid {strength.name}: {exc}")
    if not cls.default_sweep:
        return []
    strongest = (max if strength.strength == "up" else min)(cls.default_sweep)
    with contextlib.suppress(Exception):
        return [cls(**{**dict(params or {}), strength.name: strongest})]
    return []


def _defense_runs(variant: Defense, kind: str, case: TinyCase, problems: _Problems, budget_s: float) -> SharedUpdate:
    """Two seeded ``client_update`` runs of ``variant`` on fresh models, checked; the first update."""
    import torch

    from defenda.records import RoundSettings

    label = f"{variant!r}.client_update(kind={kind!r})"
    settings = RoundSettings(kind=kind, local_steps=TINY_LOCAL_STEPS, lr=TINY_LR)  # type: ignore[arg-type]
    results = []
    for _ in range(2):
        model = case.fresh_model()
        before = _snapshot(model)
        # the harness calibrates before the first update (DP target-ε mode needs it)
        _timed(problems, budget_s, f"{variant!r}.calibrate()", variant.calibrate, steps=10,
               sample_rate=len(case.x) / len(case.data.train[0]), delta=1e-5,
               local_steps=TINY_LOCAL_STEPS if kind == "delta" else 1)
        torch.manual_seed(case.seed)
        gen = torch.Generator().manual_seed(case.seed)
        update = _timed(problems, budget_s, label, variant.client_update, model, case.x.clone(), case.y.clone(),
                        settings, gen)
        for change in _model_changes(model, before):
            problems.add(f"{label} {change}; a defense must leave the caller's model unchanged")
        if not _check_update(update, model, kind, problems, label):
            problems.raise_if_any()
        results.append(update)
    problems.check(_same(results[0].tensors, results[1].tensors),
                   f"{label} is not deterministic: two runs with the same seed and generator differ")
    return results[0]


def _check_update(update: Any, model: nn.Module, kind: str, problems: _Problems, label: str) -> bool:
    """Add the update contract's problems with ``update``; False when it cannot be read against ``model``."""
    from defenda.contracts import update_alignment_problem, update_problems

    misfit = update_alignment_problem(update, model)
    if misfit is not None:
        problems.add(f"{label}: {misfit}")
        return False
    problems.extend(update_problems(update, model, kind=kind), prefix=f"{label}: ")
    return True


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))


def _accounting_problems(defense: Defense, problems: _Problems) -> None:
    """``client_batch_size`` and ``epsilon`` return sensible values."""
    size = defense.client_batch_size(4)
    problems.check(isinstance(size, int) and size >= 1, f"client_batch_size(4) returned {size!r}")
    try:
        eps = defense.epsilon(steps=10, sample_rate=0.05, delta=1e-5)
        problems.check(eps is None or (isinstance(eps, (int, float)) and eps >= 0),
                       f"epsilon() returned {eps!r}; expected None or a non-negative number")
    except Exception as exc:
        problems.add(f"epsilon() raised {type(exc).__name__}: {exc}")


def _federation_problems(defense: Defense, case: TinyCase, problems: _Problems) -> None:
    """The server-side hooks of a federation: weights sum to at most 1, the observed aggregate and
    the post-processed step are updates aligned with the model, the accounting hooks answer sensibly."""
    import torch

    from defenda.contracts import update_problems
    from defenda.federation.client import compute_update
    from defenda.records import FederationPlan, RoundSettings

    try:
        defense.join_federation(FederationPlan(clients=4, clients_per_round=2, rounds=3))
        weights = defense.aggregation_weights([3, 5])
        problems.check(len(weights) == 2 and all(w >= 0 for w in weights) and sum(weights) <= 1 + 1e-9,
                       f"aggregation_weights([3, 5]) returned {weights!r}; expected 2 weights >= 0 summing to <= 1")
        model = case.fresh_model()
        half = len(case.x) // 2 or 1
        updates = [compute_update(model, case.x[:half], case.y[:half]), compute_update(model, case.x[half:],
                                                                                        case.y[half:])]
        gen = torch.Generator().manual_seed(0)
        if defense.hides_client_updates:
            agg = defense.secure_aggregate(updates, weights, gen)
            for p in update_problems(agg, model):
                problems.add(f"secure_aggregate() {p}")
            updates = [agg]
        step = defense.server_update(updates[0], 2, gen)
        for p in update_problems(step, model):
            problems.add(f"server_update() {p}")
        entry = defense.sample_ledger_entry(RoundSettings(client_samples=8), 4)
        problems.check(entry is None or (len(entry) == 3 and entry[0] >= 0 and 0 < entry[1] <= 1 and entry[2] >= 1),
                       f"sample_ledger_entry() returned {entry!r}; expected None or (σ >= 0, 0 < q <= 1, steps >= 1)")
        z = defense.client_noise_multiplier()
        problems.check(z is None or z >= 0, f"client_noise_multiplier() returned {z!r}")
        problems.check(defense.noise_position() in (None, "before", "after"),
                       f"noise_position() returned {defense.noise_position()!r}; expected None, 'before' or 'after'")
    except Exception as exc:
        problems.add(f"a federation hook raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _poisson_problems(defense: Defense, case: TinyCase, problems: _Problems) -> None:
    """A defense whose accounting assumes Poisson batches gets them in a federation, and with them
    empty batches: its update on one must be well formed, and its ledger rate the drawing rate."""
    import torch

    from defenda.records import RoundSettings

    flag = defense.poisson_sampling
    if not problems.check(isinstance(flag, bool), f"poisson_sampling is {flag!r}; expected True or False"):
        return
    if not flag:
        return
    n = len(case.x)
    b = max(1, n // 2)
    settings = RoundSettings(kind="gradient", lr=TINY_LR, local_batch_size=b, client_samples=n)
    label = f"{defense!r}.client_update(empty Poisson batch)"
    try:
        model = case.fresh_model()
        update = defense.client_update(model, case.x[:0].clone(), case.y[:0].clone(), settings,
                                       torch.Generator().manual_seed(case.seed))
        _check_update(update, model, "gradient", problems, label)
        entry = defense.sample_ledger_entry(settings, b)
        problems.check(entry is not None and abs(entry[1] - min(1.0, b / n)) < 1e-12,
                       f"sample_ledger_entry() of a Poisson batch at rate {b}/{n} returned {entry!r}; "
                       "its q must be the rate the batch is drawn at")
    except Exception as exc:
        problems.add(f"{label} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


# --------------------------------------------------------------------------- attacks


def _requirement_problems(cls: Any, problems: _Problems) -> None:
    from defenda.records import KNOWLEDGE_FLAGS, Requirements

    req = cls.requires
    if not problems.check(isinstance(req, Requirements), "requires must be a defenda.Requirements"):
        return
    problems.check(req.server in ("honest", "malicious"), f"requires.server {req.server!r} is not honest/malicious")
    problems.check(bool(req.updates) and set(req.updates) <= {"gradient", "delta"},
                   f"requires.updates {sorted(req.updates)} must be a non-empty subset of gradient, delta")
    unknown = set(req.knowledge) - set(KNOWLEDGE_FLAGS)
    problems.check(not unknown, f"requires.knowledge has unknown flags {sorted(unknown)}; "
                                f"known: {list(KNOWLEDGE_FLAGS)}")
    problems.check(bool(req.task_kinds) and set(req.task_kinds) <= {"image", "tabular"},
                   f"requires.task_kinds {sorted(req.task_kinds)} must be a non-empty subset of image, tabular")


def check_attack(
    cls: type[Attack],
    params: Mapping[str, Any] | None = None,
    *,
    case: TinyCase | None = None,
    budget_s: float = 120.0,
) -> Reconstruction:
    """Check an attack class against the contract; return its reconstruction on the tiny case.

    Checks: the class registers (slug, ``Params``, ``reconstruct`` implemented, a
    docstring) and declares valid :class:`Requirements`; it constructs with defaults and
    with ``params`` (pass a small budget, e.g. ``{"iterations": 5}``); on the tiny case
    (the attack's first update kind, its required knowledge plus the batch size,
    ``prepare_model`` first for a malicious-server attack) ``check`` accepts the model
    and ``reconstruct`` returns a :class:`Reconstruction` with inputs ``(B̂, *input_shape)``,
    finite, labels ``(B̂,)`` in range or None, a dict ``info``; the model is untouched;
    the same seed gives the same inputs; each run fits in ``budget_s``. Use ``case=``
    (e.g. ``make_tiny_case("tabular")``) for an attack that needs another model family.
    """
    problems = _Problems(f"attack {getattr(cls, '__name__', cls)!r}")
    _class_problems("attack", cls, problems)
    if isinstance(cls, type):
        _requirement_problems(cls, problems)
    problems.raise_if_any()
    attack = _construct(cls, params, problems)
    req = cls.requires
    if case is None:
        case = make_tiny_case("image" if "image" in req.task_kinds else "tabular")
    problems.check(case.data.kind in req.task_kinds, f"the case is a {case.data.kind} task; the attack "
                                                     f"declares task_kinds {sorted(req.task_kinds)}")
    knowledge = case.knowledge(sorted({"batch_size", *req.knowledge}))
    outputs = [_attack_run(attack, case, knowledge, problems, budget_s) for _ in range(2)]
    _reconstruction_checks(outputs[0], outputs[1], case, problems)
    problems.raise_if_any()
    return outputs[0]


def _attack_run(attack: Attack, case: TinyCase, knowledge: Knowledge, problems: _Problems,
                budget_s: float) -> Reconstruction:
    """One seeded run on a fresh model: (``prepare_model``,) the honest update, ``check``, ``reconstruct``."""
    import torch

    from defenda.contracts import reconstruction_problems
    from defenda.federation.client import compute_update
    from defenda.records import Reconstruction, RoundSettings, UpdateKind

    req = attack.requires
    torch.manual_seed(case.seed)
    model = case.fresh_model()
    if req.server == "malicious":
        model = _timed(problems, budget_s, "prepare_model()", attack.prepare_model, model, case.data)
        if not problems.check(isinstance(model, torch.nn.Module), "prepare_model() must return the nn.Module"):
            problems.raise_if_any()
    kind: UpdateKind = "gradient" if "gradient" in req.updates else "delta"
    update = compute_update(model, case.x, case.y, RoundSettings(kind=kind, local_steps=TINY_LOCAL_STEPS, lr=TINY_LR))
    why = _timed(problems, budget_s, "check()", attack.check, model, case.data, knowledge)
    if why is not None:
        problems.check(isinstance(why, str), f"check() returned {why!r}; expected None or a reason string")
        problems.add(f"check() declined the tiny {case.data.kind} case: {why!r}; pass case=make_tiny_case(...) "
                     "with a model the attack handles")
        problems.raise_if_any()
    model.eval()
    before = _snapshot(model)
    torch.manual_seed(case.seed + 1)
    # the attack sees the update as the harness shows it: only what its knowledge grants
    rec = _timed(problems, budget_s, "reconstruct()", attack.reconstruct, visible_update(update, knowledge), model,
                 knowledge)
    for change in _model_changes(model, before):
        problems.add(f"reconstruct() {change}; an attack must leave the model unchanged")
    if not isinstance(rec, Reconstruction):
        problems.extend(reconstruction_problems(rec, case.data.input_shape))
        problems.raise_if_any()
    return rec


def _reconstruction_checks(rec: Reconstruction, again: Reconstruction, case: TinyCase, problems: _Problems) -> None:
    """The reconstruction contract on ``rec``, plus: a sample at least, labels in range, ``again`` the same."""
    import torch

    from defenda.contracts import reconstruction_problems

    problems.extend(reconstruction_problems(rec, case.data.input_shape))
    if not isinstance(rec.inputs, torch.Tensor) or rec.inputs.ndim == 0:
        return  # not a batch: the contract's problems say why, nothing else can be read
    problems.check(rec.inputs.shape[0] >= 1, "reconstruct() returned no sample (inputs of shape "
                                             f"{tuple(rec.inputs.shape)})")
    labels = rec.labels
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == (len(rec.inputs),):
        problems.check(not labels.is_floating_point(), f"labels must be integer class indices, got {labels.dtype}")
        problems.check(bool(((labels >= 0) & (labels < case.data.num_classes)).all()), "labels out of range")
    problems.check(isinstance(rec.info, dict), "info must be a dict")
    problems.check(isinstance(again.inputs, torch.Tensor) and torch.equal(rec.inputs, again.inputs),
                   "reconstruct() is not deterministic: two runs with the same torch seed differ")


# --------------------------------------------------------------------------- metrics


def check_metric(
    cls: type[Metric],
    params: Mapping[str, Any] | None = None,
    *,
    case: TinyCase | None = None,
    budget_s: float = 60.0,
) -> dict[str, float | None]:
    """Check a metric class against the contract; return its values on a noisy reconstruction.

    Checks: the class registers (slug, ``Params``, ``compute`` implemented, non-empty
    ``columns``, a docstring); it constructs with defaults; on the tiny case of each
    declared task kind ``compute`` returns exactly ``columns``, each a finite number
    or None, for a perfect and a noisy reconstruction, the same values twice, in time.
    """
    import torch

    from defenda.records import Reconstruction

    problems = _Problems(f"metric {getattr(cls, '__name__', cls)!r}")
    _class_problems("metric", cls, problems)
    if isinstance(cls, type):
        kinds = set(getattr(cls, "task_kinds", ()))
        problems.check(bool(kinds) and kinds <= {"image", "tabular"},
                       f"task_kinds {sorted(kinds)} must be a non-empty subset of image, tabular")
    problems.raise_if_any()
    metric = _construct(cls, params, problems)
    cases = [case] if case is not None else [make_tiny_case(k) for k in sorted(cls.task_kinds)]
    result: dict[str, float | None] = {}
    for c in cases:
        g = torch.Generator().manual_seed(c.seed)
        noisy = Reconstruction(c.x + 0.3 * torch.randn(c.x.shape, generator=g), c.y.clone())
        perfect = Reconstruction(c.x.clone(), c.y.clone())
        for label, rec in (("perfect", perfect), ("noisy", noisy)):
            out = _metric_runs(cls, metric, c, label, rec, problems, budget_s)
            if label == "noisy" and out is not None:
                result = out
    problems.raise_if_any()
    return result


def _metric_runs(cls: type[Metric], metric: Metric, c: TinyCase, label: str, rec: Reconstruction,
                 problems: _Problems, budget_s: float) -> dict[str, float | None] | None:
    """Two ``compute`` runs on one reconstruction, checked; their values (None when not a dict)."""
    runs = [_timed(problems, budget_s, f"compute() on a {label} {c.data.kind} reconstruction",
                   metric.compute, c.x.clone(), c.y.clone(), rec, c.data) for _ in range(2)]
    out = runs[0]
    if not problems.check(isinstance(out, dict), f"compute() returned {type(out).__name__}, not a dict"):
        return None
    problems.check(set(out) == set(cls.columns),
                   f"compute() returned {sorted(out)}; declared columns are {sorted(cls.columns)}")
    for col, val in out.items():
        ok = val is None or (isinstance(val, (int, float)) and not isinstance(val, bool)
                             and math.isfinite(float(val)))
        problems.check(ok, f"compute()[{col!r}] = {val!r}; expected a finite number or None")
    problems.check(repr(runs[0]) == repr(runs[1]),
                   f"compute() is not deterministic on a {label} reconstruction")
    return out
