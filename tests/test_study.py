"""Study files: parsing, sweeps, grid expansion, and clear errors for bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import TINY_STUDY
from defenda.errors import StudyError
from defenda.harness.study import builtin_studies, default_study_path, load_study, parse_study
from defenda.plugins import load_plugins


@pytest.fixture(scope="module")
def registry():
    return load_plugins().registry


def test_default_study_parses(registry) -> None:
    study = load_study(default_study_path(), registry)
    assert study.name == "default"
    trials = study.trials()
    n_def = sum(1 for _ in study.defenses)
    rounds = len(study.federations[0].observed_rounds)  # a real federation: every attack at each attack round
    full = [t for t in study.tasks if t.scope is None]
    # photos joins at a smaller size: Geiping, no defense and gaussian-noise (3 strengths), seed 0
    scoped = 1 * (1 + 3) * rounds * 1
    assert len(trials) == len(full) * len(study.attacks) * n_def * rounds * len(study.settings["seeds"]) + scoped
    assert sum(t.task == "photos" for t in trials) == scoped
    assert len({t.key for t in trials}) == len(trials)
    single = load_study(builtin_studies()["single-client"], registry)  # the 0.1 protocol, kept
    assert single.federations is None
    assert len(single.trials()) == len(single.tasks) * len(single.attacks) * sum(1 for _ in single.defenses) \
        * len(single.settings["batch_sizes"]) * len(single.settings["seeds"])


def test_list_values_are_sweeps_and_keys_are_stable(registry) -> None:
    study = parse_study(copy.deepcopy(TINY_STUDY), registry)
    assert [d.label() for d in study.defenses] == ["none", "gaussian-noise@0.01", "gaussian-noise@0.1"]
    trials = study.trials()
    assert len(trials) == 3 * 2
    again = parse_study(copy.deepcopy(TINY_STUDY), registry).trials()
    assert [t.key for t in trials] == [t.key for t in again]
    # utility does not depend on the attack: same key for the same (task, defense, strength, seed)
    raw = copy.deepcopy(TINY_STUDY)
    raw["attacks"].append({"name": "geiping", "iterations": 20})
    two = parse_study(raw, registry).trials()
    assert len({t.utility_key for t in two}) == len({t.utility_key for t in trials}) == 6


def test_defense_without_strength_uses_default_sweep(registry) -> None:
    raw = copy.deepcopy(TINY_STUDY)
    raw["defenses"] = [{"name": "gaussian-noise"}]
    study = parse_study(raw, registry)
    cls = registry.get("defense", "gaussian-noise").cls
    assert [d.strength for d in study.defenses] == list(cls.default_sweep)


def _error(registry, mutate) -> str:
    raw = copy.deepcopy(TINY_STUDY)
    mutate(raw)
    with pytest.raises(StudyError) as info:
        parse_study(raw, registry, source="s.toml")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("s.toml: ")
    return msg


def test_bad_studies_give_one_line_errors(registry) -> None:
    assert "[study] key 'sedes'" in _error(registry, lambda r: r["study"].update(sedes=[1]))
    assert "did you mean 'seeds'" in _error(registry, lambda r: r["study"].update(sedes=[1]))
    assert "non-empty list of integers" in _error(registry, lambda r: r["study"].update(seeds=[]))
    assert "positive integers" in _error(registry, lambda r: r["study"].update(batch_sizes=[0]))
    assert "'gradient' (FedSGD)" in _error(registry, lambda r: r["study"].update(update="sgd"))
    assert "Did you mean 'geiping'" in _error(registry, lambda r: r["attacks"][0].update(name="geipin"))
    msg = _error(registry, lambda r: r["attacks"][0].update(iteration=5))
    assert "[[attacks]] #1 ('geiping')" in msg and "Valid parameters:" in msg
    assert "empty sweep" in _error(registry, lambda r: r["defenses"][1].update(std=[]))
    assert "std and clip must be >= 0" in _error(registry, lambda r: r["defenses"][1].update(std=[-1.0]))
    assert "must be a number" in _error(registry, lambda r: r["defenses"][1].update(std="high"))
    assert "needs name" in _error(registry, lambda r: r["attacks"][0].pop("name"))
    assert "[[attacks]]: missing" in _error(registry, lambda r: r.pop("attacks"))
    assert "unknown section" in _error(registry, lambda r: r.update(attack={"name": "x"}))


def test_malformed_toml_names_the_file(tmp_path: Path, registry) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname = 1")
    with pytest.raises(StudyError, match=r"bad.toml: not valid TOML"):
        load_study(bad, registry)
    with pytest.raises(StudyError, match="study file not found"):
        load_study(tmp_path / "missing.toml", registry)


def test_composed_defense_expands_the_product_of_sweeps(registry) -> None:
    raw = copy.deepcopy(TINY_STUDY)
    raw["defenses"] = [{"name": "none+gaussian-noise", "gaussian-noise": {"std": [0.01, 0.1], "clip": [0.0, 1.0]}}]
    study = parse_study(raw, registry)
    assert len(study.defenses) == 4
    assert {d.strength for d in study.defenses} == {0.01, 0.1}
    assert study.defenses[0].params == {"none": {}, "gaussian-noise": {"std": 0.01, "clip": 0.0}}
    bad = copy.deepcopy(TINY_STUDY)
    bad["defenses"] = [{"name": "none+gaussian-noise", "std": 0.1}]
    with pytest.raises(StudyError, match="inline table named after it"):
        parse_study(bad, registry)
    bad["defenses"] = [{"name": "none+none"}]
    with pytest.raises(StudyError, match="distinct defenses"):
        parse_study(bad, registry)


def test_an_attack_can_set_its_own_batch_sizes(registry) -> None:
    raw = copy.deepcopy(TINY_STUDY)
    raw["attacks"].append({"name": "geiping", "iterations": 3, "batch_sizes": [2, 4]})
    trials = parse_study(raw, registry).trials()
    sizes = sorted({(t.attack_params["iterations"], t.batch_size) for t in trials})
    assert sizes == [(3, 2), (3, 4), (10, 1)]
    bad = copy.deepcopy(TINY_STUDY)
    bad["attacks"][0]["batch_sizes"] = [0]
    with pytest.raises(StudyError, match="key 'batch_sizes'"):
        parse_study(bad, registry)
    bad = copy.deepcopy(TINY_STUDY)
    bad["defenses"][0]["batch_sizes"] = [2]
    with pytest.raises(StudyError, match="in an \\[\\[attacks\\]\\] table only"):
        parse_study(bad, registry)


def test_a_task_can_limit_its_attacks_defenses_and_seeds(registry) -> None:
    """An expensive task joins a study at a smaller size; the other tasks keep the whole grid and their keys."""
    raw = copy.deepcopy(TINY_STUDY)
    raw["attacks"].append({"name": "spear"})
    raw["tasks"] = [raw.pop("task"), {"name": "faces", "attacks": ["geiping"], "defenses": ["gaussian-noise"],
                                      "seeds": [1]}]
    trials = parse_study(raw, registry).trials()
    faces = [t for t in trials if t.task == "faces"]
    assert sorted((t.attack, t.defense, t.strength, t.seed) for t in faces) == [
        ("geiping", "gaussian-noise", 0.01, 1), ("geiping", "gaussian-noise", 0.1, 1)]
    assert len([t for t in trials if t.task == "digits"]) == 2 * 3 * 2
    assert "attacks" not in faces[0].task_params  # the scope is not a task parameter
    alone = copy.deepcopy(TINY_STUDY)
    alone["attacks"].append({"name": "spear"})
    assert {t.key for t in parse_study(alone, registry).trials()} == {t.key for t in trials if t.task == "digits"}
    for key, value, message in (("attacks", ["gias"], r"\['gias'\] not among the study's \[\[attacks\]\]"),
                                ("defenses", "none", "expected a non-empty list"),
                                ("seeds", [-1], "non-negative integers")):
        bad = copy.deepcopy(TINY_STUDY)
        bad["task"][key] = value
        with pytest.raises(StudyError, match=message):
            parse_study(bad, registry)


def test_an_optional_task_without_its_files_is_dropped_with_a_notice(registry, tmp_path: Path) -> None:
    from defenda.harness.study import check_against_data

    raw = copy.deepcopy(TINY_STUDY)
    raw.pop("task")
    raw["tasks"] = [{"name": "digits", "model": "cnn"},
                    {"name": "cifar10", "root": str(tmp_path / "nowhere"), "optional": True}]
    study = parse_study(raw, registry)
    notices = check_against_data(study, registry)
    assert [t.name for t in study.tasks] == ["digits"]
    assert len(notices) == 1 and "cifar10" in notices[0] and "optional" in notices[0]
    raw["tasks"][1]["optional"] = False  # not optional: the missing files are an error naming the task
    with pytest.raises(StudyError, match="cifar10"):
        check_against_data(parse_study(raw, registry), registry)
    raw["tasks"] = [raw["tasks"][1] | {"optional": True}]  # nothing left to run
    with pytest.raises(StudyError, match="no task left"):
        check_against_data(parse_study(raw, registry), registry)
    raw["tasks"][0]["optional"] = "yes"
    with pytest.raises(StudyError, match="key 'optional'"):
        parse_study(raw, registry)
    bad = copy.deepcopy(TINY_STUDY)
    bad["attacks"][0]["optional"] = True
    with pytest.raises(StudyError, match="task"):
        parse_study(bad, registry)


def test_trials_are_interleaved_over_attacks(registry) -> None:
    from defenda.harness.runner import interleave

    raw = copy.deepcopy(TINY_STUDY)
    raw["attacks"].append({"name": "spear", "batch_sizes": [2]})
    trials = parse_study(raw, registry).trials()
    order = [t.attack for t in interleave(trials)]
    assert sorted(order) == sorted(t.attack for t in trials)
    assert order[:4] == ["geiping", "spear", "geiping", "spear"]


def test_the_default_study_runs_every_builtin_attack_and_defense(registry) -> None:
    study = load_study(default_study_path(), registry)
    builtin = {kind: {n for n in registry.names(kind) if registry.get(kind, n).origin.dist == "defenda"}
               for kind in ("attack", "defense")}
    assert {a.name for a in study.attacks} == builtin["attack"]
    assert {d.name for d in study.defenses if "+" not in d.name} == builtin["defense"]
    assert {t.name for t in study.tasks} == {"digits", "breast-cancer", "photos"}
    photos = next(t for t in study.tasks if t.name == "photos")  # natural images, at a smaller size
    assert photos.scope is not None and photos.scope.seeds == (0,) and "geiping" in photos.scope.attacks
    # a real federation: >= 10 non-IID clients, attacks at the first and the last round
    fs = study.federations[0]
    assert fs.clients >= 10 and fs.partition != "iid" and fs.observed_rounds == (0, fs.rounds - 1)


def test_builtin_studies_are_found_by_name(registry, tmp_path: Path) -> None:
    from defenda.harness.study import builtin_studies, resolve_study

    assert set(builtin_studies()) >= {"default", "paper"}
    assert resolve_study(None) == default_study_path()
    paper = load_study(resolve_study("paper"), registry)
    assert paper.settings["seeds"] == [0, 1, 2, 3, 4]
    assert [t.name for t in paper.tasks if t.optional] == ["cifar10"]
    assert {"photos", "faces"} <= {t.name for t in paper.tasks}  # natural images that need no download
    default = load_study(default_study_path(), registry)
    assert len(paper.defenses) > len(default.defenses)  # finer sweeps
    own = tmp_path / "paper"  # a file of that name wins over the built-in
    own.write_text('[study]\nname = "mine"\n[task]\nname = "digits"\n[[attacks]]\nname = "geiping"\n')
    assert resolve_study(str(own)) == own
    with pytest.raises(StudyError, match="built-in studies: default, paper, single-client"):
        resolve_study("no-such-study")


def test_trial_keys_are_those_of_earlier_releases(registry) -> None:
    """A trial's key hashes the same specification as before the typed Trial (so old stores resume);
    the values were computed by defenda 0.1.0's dict-based trials for this study."""
    trials = parse_study(copy.deepcopy(TINY_STUDY), registry).trials()
    assert (trials[0].key, trials[0].utility_key) == ("39ae8214b1eddf56", "1f6cb0faf6c41f7b")
    assert (trials[-1].key, trials[-1].utility_key) == ("8d2f4803509b6b47", "2eb5bbf1478f5041")


def test_a_trial_is_frozen_and_its_dict_is_json_friendly(registry) -> None:
    import dataclasses
    import json

    trial = parse_study(copy.deepcopy(TINY_STUDY), registry).trials()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        trial.seed = 3  # type: ignore[misc]
    d = json.loads(json.dumps(trial.to_dict()))
    assert d["key"] == trial.key and d["utility"]["key"] == trial.utility_key == d["utility_key"]
    assert d["knowledge"] == ["batch_size"] and d["rounds"] == 3 and d["client_batch_size"] == 8
    assert {"task", "attack", "defense", "strength", "batch_size", "seed", "server", "update", "lr"} <= set(d)
