"""Split a train split's indices among N clients: IID, Dirichlet label skew, or label-sorted shards.

Every scheme returns N sorted ``int64`` index arrays that together hold each index exactly once
(no sample is dropped), and :func:`partition_hash` fingerprints the result for the run record.

Schemes (``docs`` reference: ``federation.md`` §2):

* ``"iid"`` — permute all indices, :func:`numpy.array_split` into N near-equal parts (sizes differ
  by at most one): NIID-Bench's ``"homo"`` partition (Xtra-Computing/NIID-Bench ``utils.py``
  ``partition_data``).
* ``"dirichlet"`` — class-wise label skew (Yurochkin et al. 2019), exactly as NIID-Bench's
  ``"noniid-labeldir"`` and Flower Datasets' ``DirichletPartitioner`` (with NIID-Bench's balancing
  always on): for each class in sorted order, shuffle its indices, draw client shares
  p ~ Dir(α·1_N), give nothing to clients already holding ≥ n/N samples, renormalise, and cut the
  class at ⌊cumsum(p)·|I_c|⌋. Client sizes are random. When some client ends with fewer than
  ``min_size`` samples the whole partition is redrawn (at most :data:`MAX_ATTEMPTS` times, as
  Flower bounds its retries; NIID-Bench loops forever), so the result is the Dirichlet
  partition *conditioned* on min size ≥ ``min_size`` (reference §2.5, policy 1). Small α gives
  few classes per client, large α (10⁴) client label histograms close to the global one.
* ``"shards"`` — McMahan et al. 2017's pathological non-IID split as Flower's ``ShardPartitioner``:
  stable sort by label, cut into N·``shards_per_client`` consecutive near-equal shards, hand a
  random permutation of the shards out, ``shards_per_client`` per client. A shard may straddle
  two classes, so two shards are not always two classes.

Determinism (reference §2.6): the only randomness is one :class:`numpy.random.Generator` derived
from ``SeedSequence([seed, PARTITION_KEY])`` — never the global NumPy RNG or :mod:`random` — and
labels are visited in sorted order with stable sorts, so a seed fixes the partition.

With one client every scheme returns ``[np.arange(n)]``: the whole split, in its order.
"""

from __future__ import annotations

import hashlib

import numpy as np

SCHEMES = ("iid", "dirichlet", "shards")
#: SeedSequence key of the partition's generator ("partition" purpose of reference §2.6)
PARTITION_KEY = 0x9A57
#: redraws of a Dirichlet partition before giving up on ``min_size``
MAX_ATTEMPTS = 100


def partition(labels: np.ndarray, clients: int, scheme: str, *, seed: int, alpha: float = 0.5,
              shards_per_client: int = 2, min_size: int = 1) -> list[np.ndarray]:
    """The indices of ``labels`` split among ``clients`` clients by ``scheme`` (see the module docstring).

    :param labels: one label per sample of the train split (1-D; any sortable dtype).
    :param clients: N ≥ 1, at most ``len(labels)``.
    :param scheme: ``"iid"``, ``"dirichlet"`` or ``"shards"``.
    :param seed: root seed (≥ 0); the generator is ``SeedSequence([seed, PARTITION_KEY])``.
    :param alpha: Dirichlet concentration per client (``dirichlet`` only), > 0.
    :param shards_per_client: shards per client (``shards`` only), ≥ 1.
    :param min_size: smallest client size accepted by ``dirichlet`` before it redraws, ≥ 0.
    :returns: N sorted ``int64`` arrays; each index of ``labels`` is in exactly one of them.
    """
    labels = np.asarray(labels)
    _check(labels, clients, scheme, seed, alpha, shards_per_client, min_size)
    n = len(labels)
    if clients == 1:
        # one client holds the whole split in its original order, whatever the scheme
        return [np.arange(n, dtype=np.int64)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, PARTITION_KEY]))
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, clients, alpha, min_size, rng)
    else:
        parts = _shards(labels, clients, shards_per_client, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_hash(parts: list[np.ndarray]) -> str:
    """SHA-256 (hex) of a partition: per client in order, its length then its indices, little-endian int64.

    Reference §2.6 hashes the concatenated int64 indices; the lengths are added so that the client
    boundaries count too (``[[0, 1], [2]]`` and ``[[0], [1, 2]]`` concatenate alike).
    """
    digest = hashlib.sha256()
    for part in parts:
        indices = np.ascontiguousarray(np.asarray(part), dtype="<i8")
        digest.update(np.array([indices.size], dtype="<i8").tobytes())
        digest.update(indices.tobytes())
    return digest.hexdigest()


def _check(labels: np.ndarray, clients: int, scheme: str, seed: int, alpha: float, shards_per_client: int,
           min_size: int) -> None:
    """Raise a one-line ValueError for arguments no scheme can honour."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per sample), got shape {labels.shape}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; use one of {list(SCHEMES)}")
    if int(clients) != clients or clients < 1:
        raise ValueError(f"clients must be an integer ≥ 1, got {clients!r}")
    if clients > len(labels):
        raise ValueError(f"{clients} clients cannot share {len(labels)} samples; lower clients to at most "
                         f"{len(labels)}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer ≥ 0 (a SeedSequence entropy), got {seed!r}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0 (larger is closer to IID), got {alpha!r}")
    if int(shards_per_client) != shards_per_client or shards_per_client < 1:
        raise ValueError(f"shards_per_client must be an integer ≥ 1, got {shards_per_client!r}")
    if scheme == "shards" and clients * shards_per_client > len(labels):
        raise ValueError(f"{clients}·{shards_per_client} shards cannot be cut from {len(labels)} samples; "
                         "lower clients or shards_per_client")
    if int(min_size) != min_size or min_size < 0:
        raise ValueError(f"min_size must be an integer ≥ 0, got {min_size!r}")
    if scheme == "dirichlet" and clients * min_size > len(labels):
        raise ValueError(f"{clients} clients of at least {min_size} samples need more than {len(labels)} "
                         "samples; lower clients or min_size")


def _dirichlet(labels: np.ndarray, clients: int, alpha: float, min_size: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-Bench's "noniid-labeldir", redrawn while a client holds fewer than ``min_size`` samples."""
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]  # np.unique sorts
    cap = len(labels) / clients
    for _ in range(MAX_ATTEMPTS):
        held: list[list[np.ndarray]] = [[] for _ in range(clients)]
        sizes = np.zeros(clients, dtype=np.int64)
        for members in classes:
            members = rng.permutation(members)
            # NIID-Bench's balancing: clients already holding ≥ n/N samples get none of this class
            open_ = np.flatnonzero(sizes < cap)
            # Drawing Dir(α·1) over the open clients only is the same law as drawing over all N,
            # zeroing the full ones and renormalising (a Dirichlet's renormalised sub-vector is
            # Dirichlet), but cannot end in 0/0 when a tiny α puts all mass on a full client.
            shares = rng.dirichlet(np.full(len(open_), alpha))
            cuts = (np.cumsum(shares) * len(members)).astype(np.int64)[:-1]
            for client, piece in zip(open_, np.split(members, cuts)):
                held[client].append(piece)
                sizes[client] += len(piece)
        if sizes.min() >= min_size:
            return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in held]
    raise ValueError(f"no dirichlet partition gives all {clients} clients ≥ {min_size} samples in {MAX_ATTEMPTS} "
                     f"draws at alpha={alpha:g}; raise alpha or lower clients")


def _shards(labels: np.ndarray, clients: int, shards_per_client: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    """Label-sorted consecutive shards, a random permutation of them dealt ``shards_per_client`` per client."""
    # stable: ties keep index order, so shards do not depend on NumPy's sort implementation
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, clients * shards_per_client)
    dealt = rng.permutation(len(shards)).reshape(clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]
