"""Knowledge is enforced in one place: :func:`defenda.grants.visible_update`.

What an attacker is not granted (the batch size, the client's lr, the defenses' internal
metadata) is withheld from the update it receives; every built-in attack then gives
bit-identical outputs whether those hidden fields were right or poisoned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from defenda.federation.client import compute_update
from defenda.grants import PUBLIC_META_KEYS, visible_update
from defenda.plugins import get_plugins
from defenda.records import Knowledge, Reconstruction, RoundSettings, SharedUpdate
from defenda.testing import make_tiny_case

pytestmark = pytest.mark.usefixtures("one_thread")

#: small budgets per built-in attack (the test checks equality, not quality)
FAST: dict[str, dict[str, Any]] = {
    "geiping": {"iterations": 4},
    "gias": {"prior_steps": 3, "latent_iterations": 2, "iterations": 2},
    "giml": {"meta_rounds": 1, "round_images": 1, "inner_latent_iterations": 1, "inner_iterations": 1,
             "latent_iterations": 2, "iterations": 2},
    "spear": {"feature_inversion_steps": 2},
    "stein": {"width": 2000, "restarts": 2, "cp_iters": 3, "fit_rows": 500},
}
#: what a defense or the harness might leave in the metadata (all of it internal)
POISON_META = {"noise_std": 7.0, "client_noise_std": 7.0, "noise_scale": 7.0, "client_batch_size": 999,
               "quant_bits": 1, "prune_fraction": 0.5, "batch_size": 999, "lr": 123.0, "true_labels": [0, 1]}


def _poisoned(update: SharedUpdate) -> SharedUpdate:
    return dataclasses.replace(update, batch_size=999, lr=123.0, meta={**update.meta, **POISON_META})


def _attack_names() -> set[str]:
    return {entry.cls.name for entry in get_plugins().registry.entries("attack")}


def _run(name: str, update: SharedUpdate, model: torch.nn.Module, knowledge: Knowledge) -> Reconstruction:
    cls = get_plugins().registry.get("attack", name).cls
    torch.manual_seed(knowledge.seed + 1)  # as the harness seeds each attack
    return cls(FAST.get(name, {})).reconstruct(update, model, knowledge)


def _same(a: Reconstruction, b: Reconstruction) -> bool:
    labels_same = (a.labels is None and b.labels is None) or (
        a.labels is not None and b.labels is not None and torch.equal(a.labels, b.labels))
    return torch.equal(a.inputs, b.inputs) and labels_same


def test_every_builtin_attack_is_covered() -> None:
    assert set(FAST) <= _attack_names()


def test_visible_update_withholds_what_is_not_granted() -> None:
    case = make_tiny_case("image", model="mlp")
    update = _poisoned(compute_update(case.model, case.x, case.y))
    none = visible_update(update, case.knowledge(()))
    assert none.batch_size == 0 and none.lr is None and set(none.meta) <= PUBLIC_META_KEYS
    assert none.tensors is update.tensors and none.names == update.names and none.kind == update.kind
    assert none.local_steps == update.local_steps and none.masks is update.masks
    told = visible_update(update, case.knowledge(("batch_size", "lr")))
    assert told.batch_size == 999 and told.lr == 123.0 and set(told.meta) <= PUBLIC_META_KEYS
    assert update.meta["noise_std"] == 7.0  # the original is not modified


@pytest.mark.parametrize("name", sorted(FAST))
def test_poisoned_hidden_fields_do_not_change_the_output(name: str) -> None:
    """Through the filter (as the harness and ``defenda.reconstruct`` call attacks) and also without
    it (the attacks themselves read only ``knowledge`` and the visible fields)."""
    cls = get_plugins().registry.get("attack", name).cls
    case = make_tiny_case("image", model="mlp", batch_size=2)
    torch.manual_seed(case.seed)
    model = case.fresh_model()
    if cls.requires.server == "malicious":
        model = cls(FAST[name]).prepare_model(model, case.data)
    model.eval()
    knowledge = case.knowledge(sorted(cls.requires.knowledge))  # batch size and lr withheld
    clean = compute_update(model, case.x, case.y)
    poisoned = _poisoned(clean)
    reference = _run(name, visible_update(clean, knowledge), model, knowledge)
    assert _same(reference, _run(name, visible_update(poisoned, knowledge), model, knowledge))
    assert _same(reference, _run(name, poisoned, model, knowledge)), f"{name} reads a hidden field itself"


def test_fedavg_delta_ignores_the_hidden_lr() -> None:
    """A FedAvg delta is matched at the granted lr (else 0.1), never at the update's own lr."""
    case = make_tiny_case("image", model="mlp", batch_size=2)
    model = case.fresh_model().eval()
    delta = compute_update(model, case.x, case.y, RoundSettings(kind="delta", local_steps=2, lr=0.1))
    knowledge = case.knowledge(())
    reference = _run("geiping", delta, model, knowledge)
    assert _same(reference, _run("geiping", _poisoned(delta), model, knowledge))
