"""Ground truth for scoring an audit: what a client trained on in one round, sent only when both sides agree.

A client's train function calls :func:`record_training_data` with the samples its update
was computed on (each sample once, in the model's input space). Outside an audit run the
call does nothing. :class:`GroundTruthMod`, a Flower ClientApp mod, attaches the recorded
samples to the train reply **only** when

1. the server asked for them: the train config carries ``"defenda.request-truth": True``
   (:class:`~defenda_flower.audit.LeakageAudit` with ``request_truth=True`` sets it), and
2. the client consented: ``GroundTruthMod(share=True)`` in the client's own code, or, with
   the default ``share=None``, the node's own configuration
   (``flower-supernode --node-config "defenda-share-truth=true"``; the in-process
   runner sets it per node).

Either missing, the reply is left exactly as the ClientApp produced it. The samples travel
in a ``ConfigRecord`` of their own (``"defenda.truth"``, npz bytes), never in the
``ArrayRecord``/``MetricRecord`` that strategies and Flower's DP mods act on; the audit
removes it from the reply before the strategy it wraps sees the reply.
"""

from __future__ import annotations

import contextvars
import io
from collections.abc import Callable
from typing import Any

import numpy as np

#: the train-config key by which the server asks for the ground truth
REQUEST_KEY = "defenda.request-truth"
#: the node-config key by which a client operator consents
CONSENT_KEY = "defenda-share-truth"
#: the reply's record that carries the samples
TRUTH_KEY = "defenda.truth"

_RECORDING: contextvars.ContextVar[list[tuple[np.ndarray, np.ndarray]] | None] = \
    contextvars.ContextVar("defenda_flower_recording", default=None)


def record_training_data(x: Any, y: Any) -> None:
    """Note the samples ``(x, y)`` this round's update is computed on (call once per sample).

    ``x`` in the model's input space (what the model consumes), ``y`` class indices; torch
    tensors or numpy arrays. A no-op unless :class:`GroundTruthMod` is recording this round.
    """
    buf = _RECORDING.get()
    if buf is None:
        return
    buf.append((_as_numpy(x).astype(np.float32), _as_numpy(y).astype(np.int64)))


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def encode_truth(x: np.ndarray, y: np.ndarray) -> bytes:
    """The samples as npz bytes (no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def decode_truth(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as f:
        return f["x"], f["y"]


def requested(msg: Any) -> bool:
    """Did the server ask this train message for the ground truth?"""
    for record in msg.content.config_records.values():
        if record.get(REQUEST_KEY) is True:
            return True
    return False


def pop_truth(reply: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Remove the ground-truth record from ``reply`` and return its samples (None when absent)."""
    if not reply.has_content() or TRUTH_KEY not in reply.content.config_records:
        return None
    record = reply.content.config_records[TRUTH_KEY]
    del reply.content[TRUTH_KEY]
    return decode_truth(record["npz"])


class GroundTruthMod:
    """A Flower ClientApp mod: in an audit run the client opted into, attach what it trained on.

    :param share: the client's consent. ``True``: this client app consents in code (a
        simulation of public data, like the example app); ``False``: never; ``None``
        (default): the node's configuration decides (``node_config["defenda-share-truth"]``);
        a callable ``(Context) -> bool`` decides per run.

    Place it anywhere in ``ClientApp(mods=[...])``: it adds a ``ConfigRecord`` only, which
    Flower's ``LocalDpMod`` and ``fixedclipping_mod`` leave alone.
    """

    def __init__(self, share: bool | None | Callable[[Any], bool] = None) -> None:
        self.share = share

    def consents(self, context: Any) -> bool:
        if callable(self.share):
            return bool(self.share(context))
        if self.share is not None:
            return bool(self.share)
        value = (context.node_config or {}).get(CONSENT_KEY, False)
        return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))

    def __call__(self, msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        from flwr.app import ConfigRecord, MessageType

        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or not requested(msg) \
                or not self.consents(context):
            return call_next(msg, context)
        token = _RECORDING.set([])
        try:
            out = call_next(msg, context)
            batches = _RECORDING.get() or []
        finally:
            _RECORDING.reset(token)
        if out.has_error() or not batches:
            return out
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        out.content[TRUTH_KEY] = ConfigRecord({"npz": encode_truth(x, y)})
        return out
