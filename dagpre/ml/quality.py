"""Frame quality from a convolutional autoencoder and learnt patch statistics.

:class:`QualityModel` learns what the patches of known-good frames look like and scores a
frame patch by patch: a frame is bad when too large a share of its area looks unlike any
good frame (the seed's "drop frames with too much bad area"), and :meth:`~QualityModel.
validate` raises a :class:`QualityAlert` when known-good frames start failing (the seed's
periodic "mode-val").

Normalisation
-------------
Every frame becomes two gray-scale channels in [0, 1], both made by
:func:`dagpre.ops.transforms.stretch` (``"asinh"`` stretch, ``a = 0.01``, manual limits):

* ``relative``: limits ``sky - 5 sigma`` to ``sky + 1000 sigma`` with the frame's own sky
  (median of the usable pixels) and noise (``sigma``: 1.4826 x the MAD of horizontal pixel
  differences / sqrt(2), insensitive to stars and gradients). The sky always sits at the
  same gray level and the noise has the same amplitude, whatever the sky brightness, so
  star shapes and local sky offsets (a shutter shadow is a drop of 5-10 sigma) are
  compared like with like. A per-frame zscale would do the same for the shapes but also
  stretch a shadow to the full range.
* ``absolute``: the same limits anchored at the faintest training sky and the median
  training noise (learnt at fit time, ADU): the absolute sky level stays visible, so a
  sky brightened by clouds is not normalised away.

Masked and non-finite pixels are replaced by the frame's sky before the stretch and never
count in an error or a statistic. Patches are ``patch x patch`` tiles on a grid starting
at pixel (0, 0) (stride = size); the partial tiles at the top and right edges are padded
with sky and scored on their own pixels; a tile with less than ``min_valid`` usable pixels
is not scored (NaN).

Architecture
------------
A convolutional autoencoder over 2-channel patches: three 3x3 stride-2 convolutions
(``width``, ``2 width``, ``4 width`` channels, ReLU) and a 1x1 convolution to a
``latent x patch/8 x patch/8`` code, mirrored by a 1x1 convolution and three 4x4 stride-2
transposed convolutions with a sigmoid output (66,058 weights for the defaults).
It is trained with Adam on random crops of the training frames (random 90-degree rotations
and flips) to minimise the masked mean squared error.

Patch statistics
----------------
Reconstruction error alone does not flag the bad frames of interest: a defocused or
trailed star, a cloud-dimmed field or a shutter shadow is *easier* to reconstruct than a
good patch with sharp bright stars, and the error of good patches is dominated by how much
bright star light they hold. Measured on the held-apart nights of
``tests/test_ml_quality.py`` (40 stars on 128 x 128 px, trained on 20 other nights): the
error alone flags 27 % of the bad frames (clouds 40 %, shutter shadows 0 %, defocus 60 %,
trailing 7 %), and dropping it from the checks below loses no detection (false alarms
0.8 % instead of 2.5 %). So every tile is described by five numbers, of which the
autoencoder gives the first (it stays for structure the statistics do not describe); the
others are the statistics that separate the planted defects:

=================  ======================================================  =======  =========
feature            definition                                              checked  catches
=================  ======================================================  =======  =========
``recon``          log10 of the masked mean squared reconstruction error   upper    unusual
                   (gray levels squared, both channels)                             structure
``sky_offset``     median of ``(image - sky) / sigma`` over the tile's     both     shutter
                   pixels at least 3 px from any star light                         shadows
``sky_level``      ``sky + sigma * sky_offset`` (ADU): the tile's sky      upper    clouds
``psf_size``       log of the major-axis width (px) of the stars, median   upper    defocus,
                   over the tiles within ``psf_radius`` tiles                       trailing
``contrast``       log10 of the frame's star light per usable pixel over   lower    clouds
                   its sky (one value for the frame)
=================  ======================================================  =======  =========

Star light is the pixels above ``star_threshold`` sigma with an above-threshold
4-neighbour (hot pixels and single-pixel hits drop out). A tile's star is its brightest
local maximum of star light at least ``star_window`` px from a masked pixel; its width is
the square root of the largest eigenvalue of its Gaussian-windowed second moments (window
sigma ``star_window / 2``, radius ``star_window`` px, about the windowed centroid). Stars
with less than ``star_min_flux`` (noise units x px) in the window, or whose centroid is
more than 1.5 px from the maximum (the slope of a neighbour's halo), are not used. The
PSF changes slowly across a frame, so the tile's ``psf_size`` is the median over the stars
of the tiles around it: one blend does not make a tile bad. The sides checked are the
ones that mean trouble: better seeing or a darker sky than in training is not a defect.

Clouds are the hard case: this simulator's clouds brighten the sky 1.3-2x and dim the
stars to 30-90 %, so a cloud frame whose sky stays within the clear skies of training and
whose field is rich in stars looks like a clear frame of a sparser field; frame by frame
(:meth:`QualityModel.classify`) 10-27 % of them passed in the tests. Against the other
frames of its field it does not: :meth:`QualityModel.classify_night` also compares every
frame's star light with the night's median frame
(:func:`~dagpre.ops.transmission.relative_transmission`) and flags those below
``min_transmission`` (0.8); that found every cloud frame tested. The other defects are
found in all frames tested, frame by frame.

Thresholds
----------
At fit time every feature's bounds are learnt from the training tiles (the
reconstruction error's from held-out training frames, every ``holdout``-th): the
``1 - quantile`` and ``quantile`` quantiles, widened by ``margin`` times their distance
from the median. A tile's anomaly on a feature is its distance from the training median
in units of the distance from the median to the bound on that side (1 = on the bound, 0
on the side not checked), and the tile's score is the largest over its features. A tile
is bad when its score exceeds ``threshold`` (1 by default); a frame is bad when its bad
tiles are more than ``max_bad_fraction`` of its scored tiles
(:data:`DEFAULT_MAX_BAD_FRACTION`). The training frames should be of one camera, filter
and exposure time, and their fields as rich in stars as those scored (the sky level and
the contrast are absolute).

Everything learnt is in :attr:`QualityModel.learnt` (JSON) and the autoencoder's state
dict; :meth:`QualityModel.save` writes the two, :meth:`QualityModel.load` reads them back
with ``torch.load(weights_only=True)``.

CPU and GPU
-----------
A CuPy frame is normalised on its GPU by :func:`~dagpre.ops.transforms.stretch` and handed
to torch through DLPack (no copy, no host round trip) when the model is on CUDA; a NumPy
frame goes to torch with ``torch.from_numpy``. Patches go through the network in batches
of ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from dagpre.backend import DEVICE_ENV_VAR, is_cupy_array, to_host, xp_of
from dagpre.types import BackendError, Frame, InputError

try:  # torch is the ``ml`` extra: this module imports without it and says so when used
    import torch
except ImportError:  # pragma: no cover - torch is installed where the tests run
    torch = None

__all__ = [
    "DEFAULT_MAX_BAD_FRACTION",
    "DEFAULT_MIN_TRANSMISSION",
    "FEATURES",
    "QualityAlert",
    "QualityConfig",
    "QualityModel",
    "QualityResult",
    "QualityScore",
    "ValidationReport",
    "score_frame",
]

#: Per-tile features, in the order of :attr:`QualityScore.features`.
FEATURES = ("recon", "sky_offset", "sky_level", "psf_size", "contrast")
# which side of each feature's training range is checked: (lower, upper); read-only
_SIDES = MappingProxyType(
    {
        "recon": (False, True),
        "sky_offset": (True, True),
        "sky_level": (False, True),
        "psf_size": (False, True),
        "contrast": (True, False),
    }
)
#: Default least light of a frame over the night's median frame (clouds: below it). Clear
#: frames of the simulator vary by 0.9-1.0 in transmission; measured on 256 x 256 px,
#: 160-star nights: clear frames 0.95-1.11 of the median, cloudy ones 0.55-0.73.
DEFAULT_MIN_TRANSMISSION = 0.8
#: Default share of a frame's scored area that may be bad before the frame is (10 %).
#: The seed dropped frames above 70 % for its survey, but a shutter shadow covers only
#: 15-35 % of a frame, so 70 % would pass every shadowed frame; a good frame's bad area
#: is almost always 0 (one odd tile of 16 is 6 %).
DEFAULT_MAX_BAD_FRACTION = 0.1
_FORMAT = "dagpre.QualityModel/1"
_STATE_FILE = "model.pt"
_CONFIG_FILE = "config.json"


class QualityAlert(UserWarning):
    """Known-good frames are failing the quality model (see :meth:`QualityModel.validate`)."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class QualityConfig:
    """Architecture and normalisation of a :class:`QualityModel` (what is not learnt).

    Attributes
    ----------
    patch : int
        Tile size in pixels (a multiple of 8, >= 16).
    width : int
        Channels of the first encoder layer (then 2x and 4x).
    latent : int
        Channels of the code (``patch / 8`` x ``patch / 8`` cells each).
    sky_low, sky_high : float
        Stretch limits below and above the sky, in units of the noise (5 and 1000).
    asinh_a : float
        The ``asinh`` stretch's ``a`` (0.01).
    star_threshold : float
        Star light threshold, in units of the noise (5).
    star_min_flux : float
        Least star light of a tile's star (sum over its window, noise units x px) for its
        width to be used (3000: bright stars, whose shapes are precise; the sum, unlike the
        peak, does not fall when the star is blurred).
    star_window : int
        Radius in px of the window in which a star's second moments are measured (5; the
        Gaussian weight has sigma = half of it). Larger windows take in more neighbours.
    psf_radius : int
        ``psf_size`` is the median over the tiles within this many tiles (4, i.e. 9 x 9
        tiles; 0 uses each tile's own star).
    min_valid : float
        Least share of usable pixels for a tile to be scored (0.25).
    quantile : float
        Training quantile of each feature's bounds (0.99 and 0.01).
    margin : float
        Bounds widened by this fraction of their distance from the median (0.25).
    holdout : int
        Every ``holdout``-th training frame is held out of training to bound the
        reconstruction error (3; with fewer than ``2 * holdout`` frames none is held out
        and the bound comes from the training frames themselves).
    patches_per_frame : int
        Random training crops drawn from each frame, once (64).
    batch_size : int
        Patches per network batch, in training and scoring (256).
    learning_rate : float
        Adam's step size (2e-3).
    seed : int
        Seeds the weights, the crops and their order (0).
    """

    patch: int = 32
    width: int = 16
    latent: int = 8
    sky_low: float = 5.0
    sky_high: float = 1000.0
    asinh_a: float = 0.01
    star_threshold: float = 5.0
    star_min_flux: float = 3000.0
    star_window: int = 5
    psf_radius: int = 4
    min_valid: float = 0.25
    quantile: float = 0.99
    margin: float = 0.25
    holdout: int = 3
    patches_per_frame: int = 64
    batch_size: int = 256
    learning_rate: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        ints = ("patch", "width", "latent", "star_window", "psf_radius", "holdout",
                "patches_per_frame", "batch_size", "seed")  # fmt: skip
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise InputError(name, f"expected an integer, got {value!r}")
            if name not in ("seed", "psf_radius") and value < 1:
                raise InputError(name, f"expected an integer >= 1, got {value!r}")
        if self.psf_radius < 0:
            raise InputError("psf_radius", f"expected an integer >= 0, got {self.psf_radius}")
        if self.patch < 16 or self.patch % 8:
            raise InputError("patch", f"expected a multiple of 8 >= 16, got {self.patch}")
        for name in ("sky_low", "sky_high", "asinh_a", "star_threshold", "star_min_flux",
                     "learning_rate"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise InputError(name, f"expected a finite number, got {value!r}")
            if value <= 0:
                raise InputError(name, f"expected a number > 0, got {value!r}")
        for name, lo, hi in (("min_valid", 0.0, 1.0), ("quantile", 0.5, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.number)) or not lo < value <= hi:
                raise InputError(name, f"expected a number in ({lo}, {hi}], got {value!r}")
        if not isinstance(self.margin, (int, float, np.number)) or not self.margin >= 0:
            raise InputError("margin", f"expected a number >= 0, got {self.margin!r}")


@dataclass(frozen=True)
class QualityScore:
    """Per-tile scores of one frame (:meth:`QualityModel.score`).

    Attributes
    ----------
    anomaly : ndarray (ty, tx) float32
        Each tile's score: the largest of its feature anomalies, 1 on a learnt bound, NaN
        for a tile not scored. Tile ``[i, j]`` covers rows ``i * patch`` to
        ``(i + 1) * patch`` and columns ``j * patch`` to ``(j + 1) * patch`` (NumPy
        ``[y, x]`` order; edge tiles may be partial).
    error : ndarray (ty, tx) float32
        Masked mean squared reconstruction error of each tile, in gray levels squared.
    features : dict of str to ndarray (ty, tx) float32
        The raw value of every feature of :data:`FEATURES`.
    anomalies : dict of str to ndarray (ty, tx) float32
        Every feature's anomaly: its distance from the training median over the distance
        from the median to the bound on that side (0 at the median and on a side that is
        not checked, 1 on the bound).
    score : float
        Frame score: mean tile score over the scored tiles, each capped at 10 (NaN when
        none is scored). Higher is worse; about 0.2-0.5 for good frames.
    sky, noise : float
        The frame's sky level and noise (ADU) used to normalise it.
    patch : int
        Tile size in pixels.
    """

    anomaly: np.ndarray
    error: np.ndarray
    features: dict
    anomalies: dict
    score: float
    sky: float
    noise: float
    patch: int


@dataclass(frozen=True)
class QualityResult:
    """A frame's verdict (:meth:`QualityModel.classify`).

    Attributes
    ----------
    good : bool
        ``bad_fraction <= max_bad_fraction`` (and at least one tile was scored).
    bad_fraction : float
        Bad tiles / scored tiles, in [0, 1] (NaN when no tile was scored).
    score : float
        The frame score (:attr:`QualityScore.score`).
    error_map : ndarray (ty, tx) float32
        Tile scores (:attr:`QualityScore.anomaly`); bad where above ``threshold``.
    threshold, max_bad_fraction : float
        The limits applied.
    worst : str
        The feature that most often made a tile bad ("" when none is bad), or
        ``"transmission"`` when :meth:`QualityModel.classify_night` found the frame's light
        below the night's by more than allowed (and no tile was bad).
    transmission : float
        The frame's light over the night's median frame
        (:func:`~dagpre.ops.transmission.relative_transmission`); NaN from
        :meth:`QualityModel.classify`, which sees one frame.
    """

    good: bool
    bad_fraction: float
    score: float
    error_map: np.ndarray
    threshold: float
    max_bad_fraction: float
    worst: str
    transmission: float = math.nan


@dataclass(frozen=True)
class ValidationReport:
    """How a set of known-good frames fared (:meth:`QualityModel.validate`).

    Attributes
    ----------
    n_frames, n_failed : int
        Frames checked and frames classified bad.
    fail_fraction : float
        ``n_failed / n_frames``.
    max_fail_fraction : float
        The limit: :attr:`alert` when ``fail_fraction`` exceeds it.
    alert : bool
        Whether the :class:`QualityAlert` was issued.
    failed : tuple of int
        Positions (in the input order) of the frames that failed.
    results : tuple of QualityResult
        Every frame's verdict, in input order.
    """

    n_frames: int
    n_failed: int
    fail_fraction: float
    max_fail_fraction: float
    alert: bool
    failed: tuple
    results: tuple


# --------------------------------------------------------------------------- inputs


def _require_torch() -> None:
    if torch is None:  # pragma: no cover - torch is installed where the tests run
        raise InputError("torch", "QualityModel needs torch: pip install 'dagpre[ml]'")


def _torch_device(device: Any) -> Any:
    """``torch.device`` for ``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``"auto"`` honours ``$DAGPRE_DEVICE`` (``cpu`` / ``gpu``) like
    :func:`dagpre.backend.resolve_device`, else takes CUDA when torch sees a GPU.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise InputError("device", f"expected 'auto', 'cpu', 'gpu' or 'cuda[:N]', got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        env = os.environ.get(DEVICE_ENV_VAR, "").strip().lower()
        if env in ("cpu", "gpu"):
            return _torch_device(env)
        if env not in ("", "auto"):
            raise BackendError(f"${DEVICE_ENV_VAR}", f"expected cpu or gpu, got {env!r}")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "gpu":
        name = "cuda"
    index = name[5:] if name.startswith("cuda:") else ""
    if name != "cuda" and not (name.startswith("cuda:") and index.isdigit()):
        raise InputError("device", f"expected 'auto', 'cpu', 'gpu' or 'cuda[:N]', got {device!r}")
    if not torch.cuda.is_available():
        raise BackendError("device", f"{device!r} was requested but torch sees no CUDA GPU")
    if index and int(index) >= torch.cuda.device_count():
        raise BackendError("device", f"{device!r}: torch sees {torch.cuda.device_count()} GPUs")
    return torch.device(name)


def _is_store(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).is_dir()


def _as_image(frame: Any, mask: Any, source: str, on_gpu: bool) -> tuple[Any, Any]:
    """``(data, bad)``: a 2-D float32 image and a boolean mask of unusable pixels.

    ``frame``: a :class:`~dagpre.types.Frame` or any object with ``data`` (and optionally
    ``mask``), a 2-D NumPy / CuPy array, or a FITS path. ``mask``: non-zero excluded, OR-ed
    with the frame's own.
    """
    if isinstance(frame, (str, os.PathLike)):
        from dagpre.io.fits import read_fits

        if Path(frame).is_dir():
            raise InputError(frame, "a store (folder) can be given to fit() only")
        frame = read_fits(frame, device="gpu" if on_gpu and _cupy_usable() else "cpu")
        source = str(frame.meta.get("path", source))
    own = None
    if not (isinstance(frame, np.ndarray) or is_cupy_array(frame)) and hasattr(frame, "data"):
        own = getattr(frame, "mask", None)  # a Frame, or any object with data (and mask)
        frame = frame.data
    xp = xp_of(frame)
    if not (isinstance(frame, np.ndarray) or is_cupy_array(frame)):
        try:
            frame = np.asarray(frame)
        except Exception:
            raise InputError(source, f"expected an image, got {type(frame).__name__}") from None
        xp = np
    if frame.ndim != 2:
        raise InputError(source, f"expected a 2-D image, got shape {tuple(frame.shape)}")
    if frame.dtype.kind not in "iuf":
        raise InputError(source, f"expected real pixel values, got dtype {frame.dtype}")
    if frame.size == 0:
        raise InputError(source, f"the image is empty (shape {tuple(frame.shape)})")
    data = xp.asarray(frame, dtype=xp.float32)
    bad = ~xp.isfinite(data)
    for m in (own, mask):
        if m is None:
            continue
        m = np.asarray(to_host(m)) if xp is np else xp.asarray(m)
        if m.shape != data.shape:
            raise InputError(f"{source} mask", f"shape {m.shape} differs from image {data.shape}")
        bad |= m != 0
    return data, bad


def _cupy_usable() -> bool:
    from dagpre.backend import gpu_available

    return gpu_available()


def _to_torch(x: Any, device: Any) -> Any:
    """NumPy -> ``torch.from_numpy``; CuPy -> ``torch.from_dlpack`` (same GPU memory)."""
    t = torch.from_dlpack(x) if is_cupy_array(x) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device)


# --------------------------------------------------------------------------- normalisation


def _sky_noise(data: Any, bad: Any, xp: Any, source: str) -> tuple[float, float]:
    """Median of the usable pixels and the noise from horizontal pixel differences (ADU)."""
    good = ~bad
    values = data[good]
    if int(values.size) < 16:
        raise InputError(source, f"only {int(values.size)} usable pixels (finite, unmasked)")
    sky = float(xp.median(values))
    pair = good[:, 1:] & good[:, :-1]
    diff = (data[:, 1:] - data[:, :-1])[pair]
    noise = 0.0
    if int(diff.size) >= 16:
        noise = 1.4826 * float(xp.median(xp.abs(diff - xp.median(diff)))) / math.sqrt(2.0)
    if not noise > 0:  # quantised or constant images: fall back on the spread of the values
        noise = float(xp.std(values))
    if not noise > 0:
        noise = 1e-6 * max(abs(sky), 1.0)
    return sky, noise


# --------------------------------------------------------------------------- the network


def _build_autoencoder(channels: int, width: int, latent: int) -> Any:
    nn = torch.nn
    encoder = nn.Sequential(
        nn.Conv2d(channels, width, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(4 * width, latent, 1),
    )  # fmt: skip
    decoder = nn.Sequential(
        nn.Conv2d(latent, 4 * width, 1), nn.ReLU(),
        nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Sigmoid(),
    )  # fmt: skip
    return nn.Sequential(encoder, decoder)


_CHANNELS = 2  # relative, absolute


def _neighbourhood_median(x: Any, radius: int) -> Any:
    """NaN-ignoring median of every tile and its neighbours within ``radius`` tiles.

    The PSF changes slowly across a frame, so the median over the stars of
    ``(2 radius + 1)^2`` tiles keeps its local value while a blend or a cosmic ray in one
    tile is outvoted.
    """
    ty, tx = x.shape
    k = 2 * radius + 1
    padded = torch.nn.functional.pad(x[None, None], (radius,) * 4, value=float("nan"))
    cells = torch.nn.functional.unfold(padded, k)[0]  # (k * k, ty * tx)
    return torch.nanmedian(cells, dim=0).values.reshape(ty, tx)


def _tile_sum(x: Any, p: int) -> Any:
    """Sum over ``p x p`` tiles of a ``(H, W)`` tensor (H, W multiples of p)."""
    h, w = x.shape
    return x.reshape(h // p, p, w // p, p).sum(dim=(1, 3))


def _tiles(x: Any, p: int) -> Any:
    """``(C, H, W)`` -> ``(ty * tx, C, p, p)`` in row-major tile order."""
    c, h, w = x.shape
    return x.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c, p, p)


# --------------------------------------------------------------------------- the model


class QualityModel:
    """Frame-quality model: a patch autoencoder plus learnt patch statistics.

    See the module docstring for the normalisation, the network, the features and how the
    thresholds are learnt.

    Parameters
    ----------
    config : QualityConfig, optional
        Architecture and normalisation (defaults: 32 px tiles, ~55k parameters).
    **kwargs
        Fields of :class:`QualityConfig` to change, e.g. ``QualityModel(patch=64)``.

    Attributes
    ----------
    config : QualityConfig
    learnt : dict or None
        What :meth:`fit` learnt (JSON-safe): the absolute channel's limits, every
        feature's ``[lower bound, median, upper bound]``, training counts.
    device : torch.device
        Where the network lives.

    Examples
    --------
    >>> import dagpre as dp
    >>> from dagpre.ml.quality import QualityModel
    >>> frames = [
    ...     dp.Frame(f.data, dp.mask_saturation(f.data, 50000.0))
    ...     for f in dp.simulate.night(n_frames=6, shape=(128, 128), n_stars=40, seed=1).frames
    ... ]
    >>> model = QualityModel().fit(frames, epochs=1, device="cpu")
    >>> model.score(frames[0]).anomaly.shape
    (4, 4)
    >>> model.classify(frames[0]).good
    True
    """

    def __init__(self, config: QualityConfig | None = None, **kwargs: Any) -> None:
        _require_torch()
        if config is None:
            config = QualityConfig(**kwargs)
        elif kwargs:
            config = QualityConfig(**{**asdict(config), **kwargs})
        if not isinstance(config, QualityConfig):
            raise InputError("config", f"expected a QualityConfig, got {type(config).__name__}")
        self.config = config
        self.learnt: dict | None = None
        self.device = torch.device("cpu")
        with torch.random.fork_rng(devices=[]):  # seeded weights, global RNG untouched
            torch.manual_seed(config.seed)
            self.network = _build_autoencoder(_CHANNELS, config.width, config.latent)

    # ------------------------------------------------------------------ info

    @property
    def n_parameters(self) -> int:
        """Number of trainable weights of the autoencoder."""
        return int(sum(p.numel() for p in self.network.parameters()))

    def __repr__(self) -> str:
        state = "fitted" if self.learnt else "not fitted"
        return (
            f"QualityModel(patch={self.config.patch}, parameters={self.n_parameters}, "
            f"{state}, device={self.device})"
        )

    def _check_fitted(self) -> None:
        if self.learnt is None:
            raise InputError("QualityModel", "not fitted: call fit() or QualityModel.load()")

    # ------------------------------------------------------------------ normalisation

    def _load(self, frame: Any, mask: Any, source: str) -> tuple[Any, Any]:
        """``(data, bad)`` of a frame, checked to hold at least one patch."""
        p = self.config.patch
        data, bad = _as_image(frame, mask, source, self.device.type == "cuda")
        ny, nx = data.shape
        if ny < p or nx < p:
            raise InputError(source, f"image {ny}x{nx} is smaller than one {p} px patch")
        return data, bad

    def _normalise(
        self, data: Any, bad: Any, sky: float, noise: float, abs_limits: tuple[float, float]
    ) -> tuple[Any, Any, Any, tuple[int, int]]:
        """A frame as torch tensors on the model's device, padded to whole tiles.

        Returns ``(x, s, valid, shape)``: ``x`` (2, H, W) gray levels, ``s`` (H, W)
        ``(image - sky) / noise`` (0 where unusable), ``valid`` (H, W) bool.
        """
        from dagpre.ops.transforms import stretch

        cfg = self.config
        xp = xp_of(data)
        ny, nx = data.shape
        rel_limits = (sky - cfg.sky_low * noise, sky + cfg.sky_high * noise)
        filled = xp.where(bad, xp.float32(sky), data)
        rel = stretch(filled, "asinh", a=cfg.asinh_a, vmin=rel_limits[0], vmax=rel_limits[1])
        absolute = stretch(filled, "asinh", a=cfg.asinh_a, vmin=abs_limits[0], vmax=abs_limits[1])
        scaled = ((filled - xp.float32(sky)) / xp.float32(noise)).astype(xp.float32)
        chans = _to_torch(xp.stack([rel, absolute]), self.device)
        s = _to_torch(scaled, self.device)
        valid = _to_torch(bad.astype(xp.uint8), self.device) == 0  # (bool DLPack is newer)
        p = cfg.patch
        py, px = (-ny) % p, (-nx) % p
        if py or px:  # pad with the sky's gray level (as masked pixels) and no validity
            gray = torch.tensor(
                [self._gray_at(sky, *rel_limits), self._gray_at(sky, *abs_limits)],
                dtype=chans.dtype, device=chans.device,
            )  # fmt: skip
            padded = gray[:, None, None].expand(2, ny + py, nx + px).clone()
            padded[:, :ny, :nx] = chans
            chans = padded
            s = torch.nn.functional.pad(s, (0, px, 0, py))
            valid = torch.nn.functional.pad(valid, (0, px, 0, py), value=False)
        s = torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=s.device))
        return chans.contiguous(), s, valid, (ny, nx)

    def _gray_at(self, value: float, vmin: float, vmax: float) -> float:
        """Gray level the stretch gives ``value`` (for padding)."""
        from dagpre.ops.transforms import stretch

        one = np.array([value], dtype=np.float32)
        return float(stretch(one, "asinh", a=self.config.asinh_a, vmin=vmin, vmax=vmax)[0])

    # ------------------------------------------------------------------ features

    def _errors(self, tiles: Any, valid_tiles: Any) -> Any:
        """Masked mean squared reconstruction error of each tile (gray levels squared)."""
        out = []
        w_all = valid_tiles.to(tiles.dtype)[:, None]
        with torch.no_grad():
            for start in range(0, tiles.shape[0], self.config.batch_size):
                x = tiles[start : start + self.config.batch_size]
                w = w_all[start : start + self.config.batch_size]
                r = self.network(x)
                num = (((r - x) ** 2) * w).sum(dim=(1, 2, 3))
                den = w.sum(dim=(1, 2, 3)) * x.shape[1]
                out.append(num / den.clamp(min=1.0))
        return torch.cat(out)

    def _features(
        self, chans: Any, s: Any, valid: Any, sky: float, noise: float, recon: bool = True
    ) -> tuple[dict, Any]:
        """Every feature of every tile, as ``(ty, tx)`` float32 tensors (NaN: not scored),
        and the reconstruction error map (``recon=False``: NaN, the network is not run)."""
        cfg = self.config
        p = cfg.patch
        h, w = s.shape
        ty, tx = h // p, w // p
        nan = torch.tensor(float("nan"), device=s.device)
        vfrac = _tile_sum(valid.to(torch.float32), p) / float(p * p)
        scored = vfrac >= cfg.min_valid

        if recon:
            vt = valid.reshape(ty, p, tx, p).permute(0, 2, 1, 3).reshape(-1, p, p)
            err = self._errors(_tiles(chans, p), vt).reshape(ty, tx)
        else:
            err = torch.full((ty, tx), float("nan"), device=s.device)
        log_err = torch.log10(err.clamp(min=1e-12))

        light = self._star_light(s, valid)
        # the tile's sky: median of its usable pixels at least 3 px from any star light
        near_star = torch.nn.functional.max_pool2d(
            (light > 0).to(s.dtype)[None, None], 7, stride=1, padding=3
        )[0, 0] > 0  # fmt: skip
        sky_px = valid & ~near_star
        st = s.reshape(ty, p, tx, p).permute(0, 2, 1, 3).reshape(ty, tx, p * p)
        vv = sky_px.reshape(ty, p, tx, p).permute(0, 2, 1, 3).reshape(ty, tx, p * p)
        offset = torch.nanmedian(torch.where(vv, st, nan), dim=-1).values
        enough = vv.sum(dim=-1) >= max(16, int(0.05 * p * p))
        offset = torch.where(enough, offset, nan)
        level = sky + noise * offset

        size = self._psf_features(s, valid, light)
        # the frame's star light per usable pixel (ADU): clouds dim it (frame-level)
        per_pixel = noise * float(light.sum()) / max(float(valid.sum()), 1.0)
        ratio = math.log10(max(per_pixel, 1e-6) / sky) if sky > 0 else math.nan
        contrast = torch.full((ty, tx), ratio, device=s.device)
        feats = {
            "recon": log_err,
            "sky_offset": offset,
            "sky_level": level,
            "psf_size": size,
            "contrast": contrast,
        }
        return {k: torch.where(scored, v, nan).to(torch.float32) for k, v in feats.items()}, err

    def _star_light(self, s: Any, valid: Any) -> Any:
        """Star light in noise units: usable pixels above ``star_threshold`` with an
        above-threshold 4-neighbour (hot pixels and single-pixel hits drop out), else 0."""
        above = (s > self.config.star_threshold) & valid
        a = torch.nn.functional.pad(above, (1, 1, 1, 1))
        support = a[:-2, 1:-1] | a[2:, 1:-1] | a[1:-1, :-2] | a[1:-1, 2:]
        return torch.where(above & support, s, torch.zeros((), dtype=s.dtype, device=s.device))

    def _psf_features(self, s: Any, valid: Any, light: Any) -> Any:
        """``psf_size`` of every tile: log of the major-axis width (px) of its star, as the
        median over the tiles within ``psf_radius`` tiles (see the module docstring).

        A tile's star is its brightest local maximum of star light ``light`` at least
        ``star_window`` px from a masked pixel or the edge; its window must be usable, hold
        ``star_min_flux`` and have its windowed centroid within 1.5 px of the maximum.
        """
        cfg = self.config
        p = cfg.patch
        r = cfg.star_window
        fn = torch.nn.functional
        h, w = s.shape
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        # pixels within r of a masked pixel (or outside the image) cannot hold the star
        near_bad = fn.max_pool2d(
            fn.pad((~valid).to(s.dtype)[None, None], (r, r, r, r), value=1.0),
            2 * r + 1, stride=1,
        )[0, 0] > 0  # fmt: skip
        t = torch.where(near_bad, zero, light)
        # candidate stars: local maxima of the star light (a tile's brightest pixel may be
        # on the slope of a star centred in the next tile)
        peaks = fn.max_pool2d(t[None, None], 3, stride=1, padding=1)[0, 0]
        t = torch.where((t >= peaks) & (t > 0), t, zero)
        ty, tx = h // p, w // p
        tiles = t.reshape(ty, p, tx, p).permute(0, 2, 1, 3).reshape(ty * tx, p * p)
        peak, where = tiles.max(dim=1)
        yy = (torch.arange(ty, device=s.device).repeat_interleave(tx)) * p + where // p
        xx = (torch.arange(tx, device=s.device).repeat(ty)) * p + where % p
        # the (2r+1)^2 window around every tile's star, from the map padded by r
        offs = torch.arange(-r, r + 1, device=s.device)
        rows = (yy[:, None] + offs[None, :] + r)[:, :, None]
        cols = (xx[:, None] + offs[None, :] + r)[:, None, :]
        sp = fn.pad(s, (r, r, r, r))
        vp = fn.pad(valid, (r, r, r, r), value=False)
        win = sp[rows, cols]
        ok = vp[rows, cols].all(dim=(1, 2))
        dy, dx = torch.meshgrid(offs.to(s.dtype), offs.to(s.dtype), indexing="ij")
        sig = 0.5 * r
        weight = torch.exp(-(dx * dx + dy * dy) / (2.0 * sig * sig))
        f = win.clamp(min=0.0) * weight
        total = f.sum(dim=(1, 2)).clamp(min=1e-30)
        mx = (f * dx).sum(dim=(1, 2)) / total
        my = (f * dy).sum(dim=(1, 2)) / total
        ex = dx[None] - mx[:, None, None]
        ey = dy[None] - my[:, None, None]
        mxx = (f * ex * ex).sum(dim=(1, 2)) / total
        myy = (f * ey * ey).sum(dim=(1, 2)) / total
        mxy = (f * ex * ey).sum(dim=(1, 2)) / total
        # log of the major-axis width (px): defocus widens both axes, trailing one
        major = 0.5 * (mxx + myy) + torch.sqrt((0.5 * (mxx - myy)) ** 2 + mxy * mxy)
        size = 0.5 * torch.log(major.clamp(min=1e-4))
        flux = win.clamp(min=0.0).sum(dim=(1, 2))
        # a star, not a bump on the slope of a bright neighbour's halo: the windowed
        # centroid stays close to the maximum
        centred = mx * mx + my * my < 1.5**2
        keep = (peak > 0) & (flux >= cfg.star_min_flux) & ok & centred
        nan = torch.tensor(float("nan"), device=s.device)
        return _neighbourhood_median(torch.where(keep, size, nan).reshape(ty, tx), cfg.psf_radius)

    def _anomalies(self, feats: dict) -> dict:
        """Each feature's anomaly: distance from the training median in units of the
        distance to the bound on that side (0 on the unchecked side)."""
        out = {}
        for name in FEATURES:
            lo, med, hi = self.learnt["bounds"][name]
            low_side, high_side = _SIDES[name]
            v = feats[name]
            z = torch.zeros_like(v)
            if high_side:
                z = torch.where(v > med, (v - med) / max(hi - med, 1e-12), z)
            if low_side:
                z = torch.where(v < med, (med - v) / max(med - lo, 1e-12), z)
            out[name] = torch.where(torch.isnan(v), v, z)
        return out

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        frames: Any,
        epochs: int = 30,
        device: str = "auto",
        *,
        progress: Callable[[int, float], Any] | None = None,
    ) -> QualityModel:
        """Train on known-good frames and learn every feature's bounds.

        Parameters
        ----------
        frames : sequence or str or PathLike
            Known-good frames: each a :class:`~dagpre.types.Frame` (its ``mask`` excludes
            pixels; mask saturated stars and bleed trails, as :func:`dagpre.mask_saturation`
            does, or they count as structure), an object with ``data`` (and ``mask``), a
            2-D NumPy / CuPy array or a FITS path. Or the folder of a pipeline store: its
            ``aligned`` cube's frames whose ``frames/status`` is ``"done"``, with the
            store's ``mask`` cube and the frame's ``frames/background`` added back (the
            pipeline subtracts it, and the sky level is one of the features). All frames
            should share one camera, filter and exposure time (the sky level is in ADU).
        epochs : int
            Passes over the training crops (30).
        device : {"auto", "cpu", "gpu", "cuda", "cuda:N"}
            Where to train; the model stays there.
        progress : callable, optional
            Called as ``progress(epoch, mean_loss)`` after every epoch (1-based). Nothing
            is printed.

        Returns
        -------
        QualityModel
            ``self``, fitted.

        Raises
        ------
        InputError
            No frames, a frame that is not 2-D, smaller than a patch or without usable
            pixels, a store with no done frame, a bad ``epochs``; ``BackendError`` for a
            GPU that is not there.
        """
        if not isinstance(epochs, (int, np.integer)) or isinstance(epochs, bool) or epochs < 1:
            raise InputError("epochs", f"expected an integer >= 1, got {epochs!r}")
        if progress is not None and not callable(progress):
            raise InputError("progress", f"expected a callable, got {type(progress).__name__}")
        self.device = _torch_device(device)
        self.network.to(self.device)
        cfg = self.config
        items = self._training_items(frames)
        if not items:
            raise InputError("frames", "no training frames (empty list or no done frame)")

        # pass 1: every frame's sky and noise; they fix the absolute channel's limits
        stats = []
        for item in items:
            data, bad = self._load_item(item)
            stats.append(_sky_noise(data, bad, xp_of(data), item[2]))
            del data, bad
        skies = np.array([sky for sky, _ in stats])
        noise_ref = float(np.median([noise for _, noise in stats]))
        a_lo = float(skies.min()) - cfg.sky_low * noise_ref
        abs_limits = (a_lo, a_lo + (cfg.sky_low + cfg.sky_high) * noise_ref)
        n = len(items)
        held = set(range(0, n, cfg.holdout)) if n >= 2 * cfg.holdout else set()

        # pass 2: training crops, and the statistics that do not need the network
        gen = torch.Generator().manual_seed(cfg.seed)
        crops, weights = [], []
        values = {name: [] for name in FEATURES}
        for k, item in enumerate(items):
            x, s, valid, shape = self._normalised_item(item, stats[k], abs_limits)
            if k not in held:
                c, w = self._crops(x, valid, shape, gen)
                crops.append(c)
                weights.append(w)
            feats, _ = self._features(x, s, valid, *stats[k], recon=False)
            for name in FEATURES:
                if name != "recon":
                    values[name].append(feats[name].reshape(-1).cpu())
            del x, s, valid
        crops, weights = torch.cat(crops), torch.cat(weights)
        loss_curve = self._train(crops, weights, epochs, gen, progress)

        # pass 3: the reconstruction error of the held-out frames (all without a hold-out)
        for k in sorted(held) or range(n):
            x, s, valid, _ = self._normalised_item(items[k], stats[k], abs_limits)
            feats, _ = self._features(x, s, valid, *stats[k], recon=True)
            values["recon"].append(feats["recon"].reshape(-1).cpu())
            del x, s, valid

        bounds = {}
        for name in FEATURES:
            v = torch.cat(values[name]).numpy().astype(np.float64)
            v = v[np.isfinite(v)]
            if v.size < 20:
                raise InputError(
                    "frames",
                    f"only {v.size} training tiles have a {name!r} value (need >= 20): "
                    "give more or larger frames",
                )
            q_lo, med, q_hi = np.quantile(v, [1.0 - cfg.quantile, 0.5, cfg.quantile])
            lo = q_lo - cfg.margin * (med - q_lo)
            hi = q_hi + cfg.margin * (q_hi - med)
            bounds[name] = [float(lo), float(med), float(hi)]
        self.learnt = {
            "abs_limits": [float(v) for v in abs_limits],
            "bounds": bounds,
            "sky_range": [float(skies.min()), float(skies.max())],
            "noise_median": noise_ref,
            "n_frames": n,
            "n_holdout": len(held),
            "n_crops": int(crops.shape[0]),
            "epochs": int(epochs),
            "final_loss": float(loss_curve[-1]),
        }
        return self

    def _load_item(self, item: tuple) -> tuple[Any, Any]:
        """``(data, bad)`` of a training item (a store frame is read only now)."""
        frame, mask, source = item
        if callable(frame):  # a store frame's reader
            frame, mask = frame()
        return self._load(frame, mask, source)

    def _normalised_item(self, item: tuple, stat: tuple, abs_limits: tuple) -> tuple:
        data, bad = self._load_item(item)
        return self._normalise(data, bad, *stat, abs_limits)

    def _training_items(self, frames: Any) -> list[tuple[Any, Any, str]]:
        """``(frame, mask, source)`` of every training frame (a store is read here)."""
        if _is_store(frames):
            return self._store_items(frames)
        if isinstance(frames, (str, os.PathLike)):
            raise InputError(frames, "not a store folder: give a store or a list of frames")
        if isinstance(frames, np.ndarray) or is_cupy_array(frames) or hasattr(frames, "data"):
            raise InputError(
                "frames", "expected a sequence of frames or a store path, not one image"
            )
        if not isinstance(frames, Sequence) and not hasattr(frames, "__iter__"):
            raise InputError("frames", f"expected a sequence of frames, got {type(frames)}")
        return [(f, None, f"frames[{k}]") for k, f in enumerate(frames)]

    def _store_items(self, path: Any) -> list[tuple[Any, Any, str]]:
        from dagpre.io.store import done_frames, open_store

        root = open_store(path, mode="r")
        if "aligned" not in root:
            raise InputError(path, "the store has no 'aligned' cube to train on")
        frames = root["frames"]
        background = frames["background"][:] if "background" in frames else None

        def reader(i: int) -> Callable[[], tuple[Any, Any]]:
            def read() -> tuple[Any, Any]:
                image = np.asarray(root["aligned"][i], dtype=np.float32)
                if background is not None and np.isfinite(background[i]):
                    image = image + np.float32(background[i])
                mask = np.asarray(root["mask"][i]) if "mask" in root else None
                return image, mask

            return read

        return [(reader(int(i)), None, f"{path}[aligned {int(i)}]") for i in done_frames(root)]

    def _crops(self, x: Any, valid: Any, shape: tuple, gen: Any) -> tuple[Any, Any]:
        """``patches_per_frame`` random ``patch x patch`` crops of one frame and their
        validity, inside the ``shape`` of the frame (the padding is never drawn)."""
        p = self.config.patch
        m = self.config.patches_per_frame
        ny, nx = shape
        ys = torch.randint(0, ny - p + 1, (m,), generator=gen).tolist()
        xs = torch.randint(0, nx - p + 1, (m,), generator=gen).tolist()
        cx = torch.stack([x[:, y0 : y0 + p, x0 : x0 + p] for y0, x0 in zip(ys, xs, strict=True)])
        cw = torch.stack([valid[y0 : y0 + p, x0 : x0 + p] for y0, x0 in zip(ys, xs, strict=True)])
        return cx, cw.to(torch.float32)[:, None]

    def _train(self, crops: Any, weights: Any, epochs: int, gen: Any, progress: Any) -> list:
        cfg = self.config
        net = self.network
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
        n = crops.shape[0]
        curve = []
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).to(self.device)
            total = 0.0
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                x, w = crops[idx], weights[idx]
                k = int(torch.randint(0, 4, (1,), generator=gen))
                flip = bool(torch.randint(0, 2, (1,), generator=gen))
                x, w = torch.rot90(x, k, (2, 3)), torch.rot90(w, k, (2, 3))
                if flip:
                    x, w = x.flip(3), w.flip(3)
                loss = (((net(x) - x) ** 2) * w).sum() / (w.sum() * x.shape[1]).clamp(min=1.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * x.shape[0]
            curve.append(total / n)
            if progress is not None:
                progress(epoch + 1, curve[-1])
        net.eval()
        return curve

    # ------------------------------------------------------------------ scoring

    def score(self, frame: Any, mask: Any = None) -> QualityScore:
        """Per-tile scores of one frame.

        Parameters
        ----------
        frame : Frame, ndarray (ny, nx) or str
            A :class:`~dagpre.types.Frame` (or object with ``data`` and ``mask``), a 2-D
            NumPy or CuPy array (ADU, sky not subtracted) or a FITS path. At least one
            patch in each dimension.
        mask : ndarray (ny, nx), optional
            Non-zero pixels are excluded (OR-ed with the frame's own mask).

        Returns
        -------
        QualityScore
        """
        self._check_fitted()
        data, bad = self._load(frame, mask, "frame")
        sky, noise = _sky_noise(data, bad, xp_of(data), "frame")
        x, s, valid, _ = self._normalise(data, bad, sky, noise, tuple(self.learnt["abs_limits"]))
        feats, err = self._features(x, s, valid, sky, noise, recon=True)
        anom = self._anomalies(feats)
        stacked = torch.stack([anom[k] for k in FEATURES])
        # the tile score ignores missing features (NaN) but stays NaN when all are missing
        filled = torch.where(torch.isnan(stacked), torch.full_like(stacked, -math.inf), stacked)
        tile = filled.amax(dim=0)
        tile = torch.where(torch.isinf(tile), torch.full_like(tile, math.nan), tile)
        host = tile.cpu().numpy().astype(np.float32)
        finite = host[np.isfinite(host)]
        frame_score = float(np.minimum(finite, 10.0).mean()) if finite.size else math.nan
        nan_err = torch.where(torch.isnan(feats["recon"]), feats["recon"], err)
        return QualityScore(
            anomaly=host,
            error=nan_err.cpu().numpy().astype(np.float32),
            features={k: v.cpu().numpy() for k, v in feats.items()},
            anomalies={k: v.cpu().numpy() for k, v in anom.items()},
            score=frame_score,
            sky=float(sky),
            noise=float(noise),
            patch=self.config.patch,
        )

    def classify(
        self,
        frame: Any,
        threshold: float | None = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        *,
        mask: Any = None,
    ) -> QualityResult:
        """Good or bad: the share of the frame's scored tiles whose score exceeds ``threshold``.

        Parameters
        ----------
        frame : Frame, ndarray or str
            As for :meth:`score`.
        threshold : float, optional
            Tile score above which a tile is bad; ``None`` is 1, the learnt bounds.
        max_bad_fraction : float
            Largest bad share of the scored area for a good frame
            (:data:`DEFAULT_MAX_BAD_FRACTION`, 0.1).
        mask : ndarray, optional
            As for :meth:`score`.

        Returns
        -------
        QualityResult
        """
        threshold = 1.0 if threshold is None else threshold
        for name, value in (("threshold", threshold), ("max_bad_fraction", max_bad_fraction)):
            if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise InputError(name, f"expected a finite number, got {value!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise InputError("max_bad_fraction", f"expected a fraction, got {max_bad_fraction}")
        sc = self.score(frame, mask=mask)
        scored = np.isfinite(sc.anomaly)
        bad = scored & (sc.anomaly > threshold)
        n = int(scored.sum())
        fraction = float(bad.sum()) / n if n else math.nan
        worst = ""
        if bad.any():
            counts = {k: int((sc.anomalies[k][bad] > threshold).sum()) for k in FEATURES}
            worst = max(FEATURES, key=lambda k: counts[k])
        return QualityResult(
            good=bool(n) and fraction <= max_bad_fraction,
            bad_fraction=fraction,
            score=sc.score,
            error_map=sc.anomaly,
            threshold=float(threshold),
            max_bad_fraction=float(max_bad_fraction),
            worst=worst,
        )

    def classify_night(
        self,
        frames: Sequence,
        threshold: float | None = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        *,
        masks: Sequence | None = None,
        min_transmission: float = DEFAULT_MIN_TRANSMISSION,
        transmission: dict | None = None,
    ) -> tuple:
        """Classify the frames of one field, each also against the others' light.

        Every frame is classified alone (:meth:`classify`), then the frames' light is
        compared (:func:`~dagpre.ops.transmission.relative_transmission`): a frame holding
        less than ``min_transmission`` of the night's median frame's light is bad too.
        That is what finds clouds: alone, a cloud-dimmed frame of a rich field looks like a
        clear frame of a sparser one (the module docstring), against its own field it does
        not.

        Parameters
        ----------
        frames : sequence of Frame, ndarray or str
            At least 3 frames of one field and filter, as for :meth:`score`, of one shape
            (FITS paths are read once).
        threshold, max_bad_fraction : optional
            As for :meth:`classify`.
        masks : sequence of ndarray, optional
            Per frame, non-zero pixels excluded (OR-ed with the frames' own masks).
        min_transmission : float
            Least light over the night's median frame for a good frame
            (:data:`DEFAULT_MIN_TRANSMISSION`, 0.8). A frame whose light could not be
            compared (no shift found, too little overlap) is judged by its tiles alone.
        transmission : dict, optional
            Keyword arguments of :func:`~dagpre.ops.transmission.relative_transmission`
            (e.g. ``box`` for small frames).

        Returns
        -------
        tuple of QualityResult
            In the order of ``frames``, each with its ``transmission``.
        """
        from dagpre.ops.transmission import relative_transmission

        if not isinstance(min_transmission, (int, float, np.number)) or not (
            0.0 <= min_transmission <= 1.0
        ):
            raise InputError("min_transmission", f"expected a fraction, got {min_transmission!r}")
        frames = list(frames)
        if masks is not None and len(masks) != len(frames):
            raise InputError("masks", f"expected {len(frames)} masks, got {len(masks)}")
        loaded = []
        for k, f in enumerate(frames):
            data, bad = self._load(f, None if masks is None else masks[k], f"frames[{k}]")
            loaded.append(Frame(data, bad.astype(xp_of(data).uint8)))
        light = relative_transmission(loaded, **(transmission or {}))
        out = []
        for k, frame in enumerate(loaded):
            r = self.classify(frame, threshold=threshold, max_bad_fraction=max_bad_fraction)
            t = float(light.relative[k])
            dimmed = t < min_transmission  # NaN: not compared, the tiles decide
            out.append(dataclasses.replace(
                r, good=r.good and not dimmed, transmission=t,
                worst=r.worst or ("transmission" if dimmed else ""),
            ))  # fmt: skip
        return tuple(out)

    def validate(
        self,
        good_frames: Sequence,
        max_fail_fraction: float = 0.2,
        *,
        threshold: float | None = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ) -> ValidationReport:
        """Check that known-good frames still pass; warn :class:`QualityAlert` if not.

        The seed's periodic "mode-val": frames known to be good (a standard field, the
        last nights' accepted frames) are classified; when more than ``max_fail_fraction``
        of them fail, the telescope, the camera or the model has drifted.

        Parameters
        ----------
        good_frames : sequence
            Frames as accepted by :meth:`classify` (at least one).
        max_fail_fraction : float
            Failing share above which the alert is raised (0.2; on held-apart good frames
            about 0-5 % fail).
        threshold, max_bad_fraction : optional
            Passed to :meth:`classify`.

        Returns
        -------
        ValidationReport

        Warns
        -----
        QualityAlert
            When ``fail_fraction > max_fail_fraction``.
        """
        if not isinstance(max_fail_fraction, (int, float, np.number)) or not (
            0.0 <= max_fail_fraction <= 1.0
        ):
            raise InputError("max_fail_fraction", f"expected a fraction, got {max_fail_fraction!r}")
        if isinstance(good_frames, (np.ndarray, str, os.PathLike)) or hasattr(good_frames, "data"):
            good_frames = [good_frames]
        frames = list(good_frames)
        if not frames:
            raise InputError("good_frames", "no frames to validate")
        results = tuple(
            self.classify(f, threshold=threshold, max_bad_fraction=max_bad_fraction) for f in frames
        )
        failed = tuple(k for k, r in enumerate(results) if not r.good)
        fraction = len(failed) / len(frames)
        alert = fraction > max_fail_fraction
        if alert:
            warnings.warn(
                f"{len(failed)} of {len(frames)} known-good frames fail the quality model "
                f"({fraction:.0%} > {max_fail_fraction:.0%}): check the instrument, or refit",
                QualityAlert,
                stacklevel=2,
            )
        return ValidationReport(
            n_frames=len(frames),
            n_failed=len(failed),
            fail_fraction=fraction,
            max_fail_fraction=float(max_fail_fraction),
            alert=alert,
            failed=failed,
            results=results,
        )

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to the folder ``path`` (created): ``model.pt``, ``config.json``.

        ``model.pt`` is ``torch.save`` of the network's state dict (tensors only);
        ``config.json`` holds the :class:`QualityConfig` and what :meth:`fit` learnt.

        Returns
        -------
        pathlib.Path
            The folder.
        """
        self._check_fitted()
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise InputError(folder, "exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        torch.save(state, folder / _STATE_FILE)
        doc = {"format": _FORMAT, "config": asdict(self.config), "learnt": self.learnt}
        (folder / _CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> QualityModel:
        """Read a model written by :meth:`save` (``torch.load(..., weights_only=True)``).

        Parameters
        ----------
        path : str or PathLike
            The folder.
        device : {"auto", "cpu", "gpu", "cuda", "cuda:N"}
            Where to put the network.
        """
        _require_torch()
        folder = Path(path)
        cfg_file, state_file = folder / _CONFIG_FILE, folder / _STATE_FILE
        if not cfg_file.is_file() or not state_file.is_file():
            raise InputError(
                folder, f"not a saved QualityModel (needs {_CONFIG_FILE}, {_STATE_FILE})"
            )
        try:
            doc = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise InputError(cfg_file, f"not JSON: {err}") from None
        if doc.get("format") != _FORMAT:
            raise InputError(cfg_file, f"format {doc.get('format')!r}, expected {_FORMAT!r}")
        try:
            config = QualityConfig(**doc["config"])
            learnt = doc["learnt"]
            missing = set(FEATURES) - set(learnt["bounds"])
        except (KeyError, TypeError) as err:
            raise InputError(cfg_file, f"incomplete or unknown configuration: {err}") from None
        if missing:
            raise InputError(cfg_file, f"no bounds for {sorted(missing)}")
        model = cls(config)
        target = _torch_device(device)
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        model.network.load_state_dict(state)
        model.network.to(target).eval()
        model.device = target
        model.learnt = learnt
        return model


def score_frame(
    model: QualityModel,
    image: Any,
    mask: Any = None,
    *,
    threshold: float | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> dict:
    """One frame's quality as plain numbers, for the pipeline's frames table.

    Parameters
    ----------
    model : QualityModel
        A fitted model.
    image : ndarray (ny, nx) or Frame
        Pixels in ADU (sky not subtracted), NumPy or CuPy.
    mask : ndarray (ny, nx), optional
        Non-zero pixels excluded.
    threshold, max_bad_fraction : optional
        As for :meth:`QualityModel.classify`.

    Returns
    -------
    dict
        ``quality`` (float, the frame score: higher is worse), ``bad_fraction`` (float in
        [0, 1]) and ``good`` (bool).
    """
    if not isinstance(model, QualityModel):
        raise InputError("model", f"expected a QualityModel, got {type(model).__name__}")
    result = model.classify(image, threshold=threshold, max_bad_fraction=max_bad_fraction,
                            mask=mask)  # fmt: skip
    return {
        "quality": float(result.score),
        "bad_fraction": float(result.bad_fraction),
        "good": bool(result.good),
    }
