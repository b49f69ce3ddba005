"""The Python API: one attack on your own model and gradients, or a whole study as a DataFrame."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defenda.errors import DefendaError
from defenda.records import InputSpace, Knowledge, Reconstruction, SharedUpdate


def reconstruct(
    attack_name: str,
    model: nn.Module,
    gradients: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    batch_size: int | None = None,
    labels: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    mean: float | torch.Tensor = 0.0,
    std: float | torch.Tensor = 1.0,
    image: bool = True,
    update_kind: str = "gradient",
    lr: float | None = None,
    local_steps: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
    **params: Any,
) -> Reconstruction:
    """Reconstruct a batch from the gradients (or weight delta) you observed for ``model``.

    :param attack_name: a registered attack (``defenda attacks`` lists them), e.g. ``"geiping"``.
    :param gradients: one tensor per ``model.parameters()`` entry, or a ``{name: tensor}`` dict.
    :param batch_size: the client's batch size if known (else the attack estimates it).
    :param labels: the batch's labels if known, shape ``(B,)``.
    :param input_shape: one sample's shape, e.g. ``(1, 8, 8)`` or ``(30,)``; may be left out when the
        model's first layer states it (a first ``nn.Linear`` takes ``(in_features,)``).
    :param num_classes: the model's number of outputs (default: the last layer's out_features).
    :param mean, std: your input normalisation (``x_model = (x - mean) / std``); with
        ``image=True`` attacks keep reconstructions inside the [0, 1] image box.
    :param params: the attack's parameters (``defenda attacks`` lists them).
    :returns: :class:`defenda.Reconstruction` with ``inputs`` ``(B̂, *input_shape)``
        in your model's input space and ``labels`` when the attack recovers them.
    """
    from defenda.grants import visible_update
    from defenda.plugins import get_plugins

    attack = get_plugins().registry.get("attack", attack_name).cls(**params)
    names = [n for n, _ in model.named_parameters()]
    tensors = _align(model, gradients, names)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if num_classes is None:
        num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else infer_input_shape(model)
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    if image and len(shape) == 3 and mean_t.ndim == 1:
        mean_t, std_t = mean_t.view(-1, 1, 1), std_t.view(-1, 1, 1)
    space = InputSpace("image" if image else "tabular", shape, num_classes, mean_t, std_t)
    knowledge = Knowledge(space=space, batch_size=batch_size, labels=None if labels is None else labels.to(dev),
                          lr=lr, device=dev, seed=seed)
    update = SharedUpdate(tensors=[t.detach().to(dev) for t in tensors], names=names, kind=update_kind,  # type: ignore[arg-type]
                          batch_size=batch_size or 0, local_steps=local_steps, lr=lr)
    torch.manual_seed(seed)
    model.eval()
    return attack.reconstruct(visible_update(update, knowledge), model, knowledge)


def infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    """One sample's shape when the model's first parameterised layer states it (``nn.Linear``: ``(in_features,)``)."""
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    what = type(first).__name__ if first is not None else "no parameterised layer"
    raise DefendaError(f"reconstruct() needs input_shape=(C, H, W) or (features,): the model's first layer "
                       f"({what}) does not state it")


def _align(model: nn.Module, gradients: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
           names: list[str]) -> list[torch.Tensor]:
    params = list(model.parameters())
    if isinstance(gradients, Mapping):
        missing = [n for n in names if n not in gradients]
        if missing:
            raise DefendaError(f"gradients dict lacks parameters {missing[:3]}; give one tensor per model parameter")
        tensors = [gradients[n] for n in names]
    else:
        tensors = list(gradients)
    if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
        raise DefendaError(f"gradients must match model.parameters(): {len(params)} tensors of the same shapes, "
                           f"got {len(tensors)}")
    return tensors


def run_study(study: str | Path | Mapping[str, Any] | None = None, out: str | Path = "runs/study", *,
              workers: int = 1, device: str = "cpu", progress: bool = False) -> Any:
    """Run a study (a TOML path, a dict shaped like one, or None for the default) and return its rows.

    Resumes when ``out`` already holds some of the trials. Returns a pandas DataFrame.
    """
    from defenda.harness import runner
    from defenda.harness.store import Store
    from defenda.harness.study import default_study_path, load_study, parse_study
    from defenda.plugins import get_plugins

    registry = get_plugins().registry
    if study is None or isinstance(study, (str, Path)):
        parsed = load_study(study or default_study_path(), registry)
    else:
        parsed = parse_study(dict(study), registry)
    runner.run_study(parsed, out, workers=workers, device=device, progress=progress)
    with Store(out, write=False) as store:
        return store.dataframe()
