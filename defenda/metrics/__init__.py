"""How close a reconstruction is to the private batch: matching, PSNR, SSIM, LPIPS, …

These are the core functions behind the built-in metric plugins
(``plugins/defenda_metrics``). Every public name is importable from here
(``from defenda.metrics import psnr, apply_matching``); each module does one job:

==================================  ===============================================================
:mod:`defenda.metrics.spaces`       the space a score is computed in: :func:`unit_images`,
                                    :func:`blank_non_finite`
:mod:`defenda.metrics.matching`     pairing reconstructions with the truth: :func:`pairwise_mse`,
                                    :func:`match`, :func:`apply_matching`, :data:`UNMATCHED_LABEL`
:mod:`defenda.metrics.images`       image scores: :func:`mse`, :func:`psnr`, :func:`ssim` (and their
                                    ``*_per_image`` forms), :data:`PSNR_CAP_DB`
:mod:`defenda.metrics.lpips`        LPIPS: backbone discovery (:func:`lpips_backbone_status`) and
                                    loading (:func:`load_lpips`), :func:`lpips_distance`,
                                    :class:`LPIPSUnavailableWarning`
:mod:`defenda.metrics.labels`       :func:`label_accuracy`
:mod:`defenda.metrics.tabular`      tabular scores: :func:`mae`, :func:`feature_accuracy`
:mod:`defenda.metrics.success`      success rates: :func:`success_rates` (exact, recognisable,
                                    identified among :data:`IDENTIFICATION_CANDIDATES`)
:mod:`defenda.metrics.domain`       the valid input domain: :func:`clip_to_domain`
:mod:`defenda.metrics.baseline`     the prior-only guesses: :func:`prior_guesses`
==================================  ===============================================================

Spaces
    Image scores (PSNR, SSIM, LPIPS, image MSE) are computed in *unit space*:
    images de-normalised with ``TaskData.to_unit`` and clamped to ``[0, 1]``
    (non-finite values are replaced first: NaN → 0, ±inf → 1/0). Tabular
    scores (MAE, tabular MSE) are computed in *model space*, i.e. on
    standardised features, so that every feature weighs the same; the
    discrete-feature accuracy is computed on raw (unit-space) values.

Batch scores
    Every score is computed per sample, then averaged over the batch (PSNR is
    the mean of per-image PSNRs, not the PSNR of the mean MSE).

Matching (:func:`match`, :func:`apply_matching`)
    Attacks return samples in arbitrary order, and possibly a different
    number B̂ of them than the true batch size B. Reconstructions are paired
    one-to-one with ground-truth samples by a Hungarian assignment
    (``scipy.optimize.linear_sum_assignment``) minimising the total MSE.

    * B̂ < B: the truth samples left without a partner are scored against a
      *blank guess*: all zeros in model space (the data mean: the mean colour
      of each channel for images, the mean of each feature for tabular data)
      with label :data:`UNMATCHED_LABEL` (never correct). A missing sample
      therefore scores what guessing the mean would score — a failure, not
      a hole in the average.
    * B̂ > B: the B reconstructions that match best are kept, the rest are
      ignored (an attacker is not penalised for extra guesses).
    * ``Reconstruction.info`` of the matched copy records ``matched_fraction``
      (matched truth samples / B) and ``num_reconstructed`` (B̂).
"""

from __future__ import annotations

from defenda.metrics.baseline import BASELINES, prior_guesses
from defenda.metrics.domain import clip_to_domain
from defenda.metrics.images import (
    PSNR_CAP_DB,
    mse,
    mse_per_image,
    psnr,
    psnr_per_image,
    ssim,
    ssim_per_image,
)
from defenda.metrics.labels import label_accuracy
from defenda.metrics.lpips import (
    ALEXNET_CHECKPOINT,
    ALEXNET_URL,
    LPIPS_BACKBONE_ENV,
    LPIPS_MIN_SIDE,
    LPIPS_UPSAMPLE_SIDE,
    LPIPSUnavailableWarning,
    load_lpips,
    lpips_backbone_status,
    lpips_distance,
    lpips_per_image,
)
from defenda.metrics.matching import UNMATCHED_LABEL, apply_matching, match, pairwise_mse
from defenda.metrics.spaces import blank_non_finite, unit_images
from defenda.metrics.success import (
    EXACT_MSE,
    IDENTIFICATION_CANDIDATES,
    RECOGNISED_MAE,
    RECOGNISED_PSNR_DB,
    distractors,
    success_rates,
)
from defenda.metrics.tabular import feature_accuracy, mae

__all__ = [
    "BASELINES",
    "EXACT_MSE",
    "IDENTIFICATION_CANDIDATES",
    "RECOGNISED_MAE",
    "RECOGNISED_PSNR_DB",
    "clip_to_domain",
    "distractors",
    "prior_guesses",
    "success_rates",
    "ALEXNET_CHECKPOINT",
    "ALEXNET_URL",
    "LPIPS_BACKBONE_ENV",
    "LPIPS_MIN_SIDE",
    "LPIPS_UPSAMPLE_SIDE",
    "PSNR_CAP_DB",
    "UNMATCHED_LABEL",
    "LPIPSUnavailableWarning",
    "apply_matching",
    "blank_non_finite",
    "feature_accuracy",
    "label_accuracy",
    "load_lpips",
    "lpips_backbone_status",
    "lpips_distance",
    "lpips_per_image",
    "mae",
    "match",
    "mse",
    "mse_per_image",
    "pairwise_mse",
    "psnr",
    "psnr_per_image",
    "ssim",
    "ssim_per_image",
    "unit_images",
]
