"""The hook contract: the one place a plugin author reads.

A plugin is a module (named by an entry point in the ``defenda`` group)
holding functions decorated with :data:`hookimpl` whose names are the hooks
below. Rules (each matches a pluggy sharp edge):

* implement a hook with the same name and accept only the arguments you use;
* never give a hookimpl argument a default value (pluggy will not pass it);
* point the entry point at a module, not a class;
* keep the plugin module fast to import: import torch-heavy code inside your classes' methods.

Example::

    from defenda import hookimpl

    @hookimpl
    def defenda_register_defenses(register):
        register(MyDefense)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from defenda.interfaces import Attack, Defense, Metric, Task

PROJECT = "defenda"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: ``register(cls)``: validates and records one class; raises RegistrationError.
Register = Callable[[type], None]


@hookspec
def defenda_register_attacks(register: Callable[[type[Attack]], None]) -> None:
    """Register gradient-inversion attacks: call ``register(AttackSubclass)`` once per attack.

    :param register: validates the class (slug ``name``, well-declared ``Params``,
        ``reconstruct`` implemented) and records it under the calling plugin;
        raises :class:`defenda.errors.RegistrationError` for an invalid class or a
        name another plugin registered.
    """


@hookspec
def defenda_register_defenses(register: Callable[[type[Defense]], None]) -> None:
    """Register defenses: call ``register(DefenseSubclass)`` once per defense.

    :param register: as for attacks; a defense's ``Params`` must mark exactly one
        field as its strength (``defenda.param(..., strength="up" | "down")``).
    """


@hookspec
def defenda_register_metrics(register: Callable[[type[Metric]], None]) -> None:
    """Register metrics that score a matched reconstruction: call ``register(MetricSubclass)``.

    :param register: as for attacks; a metric declares the ``columns`` it returns.
    """


@hookspec
def defenda_register_tasks(register: Callable[[type[Task]], None]) -> None:
    """Register tasks (data set + model family): call ``register(TaskSubclass)``.

    :param register: as for attacks.
    """


@hookspec
def defenda_trial_finished(trial: dict[str, Any], result: dict[str, Any]) -> None:
    """Observe a finished trial (log it to an experiment tracker, say).

    Called in the process that writes the store, after the row is committed.
    An exception here is reported once and does not stop the study.

    Both arguments are JSON-friendly dicts (send them to a tracker as they are).

    :param trial: the trial's specification, :meth:`defenda.harness.jobs.Trial.to_dict`: ``key``,
        ``study``, ``task``/``task_params``, ``attack``/``attack_params``, ``defense``/``defense_params``,
        ``strength``, ``batch_size``, ``seed``, ``server``, ``knowledge`` (granted flags), the federation
        settings (``rounds``, ``client_batch_size``, ``lr``, ``update``, ``local_steps``, ``delta``),
        ``timeout``, ``save_reconstructions``, ``utility_key`` and ``utility`` (the training run's spec).
    :param result: the stored row (status, reason, metrics, test_acc, epsilon, timings), the
        columns of :data:`defenda.harness.store.TRIAL_COLUMNS`.
    """
