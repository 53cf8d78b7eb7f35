"""psf_photometry: exact on noise-free stars, honest errors on noisy ones, and transients
injected into simulated pairs measured on the difference image (with and without the
subtraction kernel)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

import dagpre.simulate as sim
from dagpre.backend import to_host
from dagpre.ops.psfphot import PSF_ALLMASKED, PSF_HASMASKED, PSF_TRUNC, psf_photometry
from dagpre.ops.subtract import subtract
from dagpre.types import InputError

GAIN = 2.0


def _stamp(fwhm, psf="moffat", half=15):
    return sim.render_sources(
        (2 * half + 1,) * 2, [half], [half], [1.0], [fwhm], psf=psf, radius=half
    )


def _grid(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    g = np.linspace(lo, hi, n)
    xx, yy = np.meshgrid(g, g)
    return xx.ravel() + rng.uniform(-0.5, 0.5, xx.size), yy.ravel() + rng.uniform(
        -0.5, 0.5, xx.size
    )


@pytest.mark.parametrize("psf", ["moffat", "gaussian"])
def test_noise_free_fluxes_are_exact_at_any_subpixel_position(xp, psf):
    x, y = _grid(7, 20, 170)
    flux = np.linspace(500, 5000, x.size)
    image = sim.render_sources((192, 192), x, y, flux, [3.2], psf=psf, radius=15)
    res = psf_photometry(xp.asarray(image), xp.asarray(_stamp(3.2, psf)), x, y)
    np.testing.assert_allclose(to_host(res.flux), flux, rtol=5e-4)
    assert not to_host(res.flag).any()


def test_errors_match_the_scatter_of_repeated_noise():
    x, y = _grid(6, 20, 170, seed=1)
    image = sim.render_sources((192, 192), x, y, [800.0], [3.5], radius=15)
    rng = np.random.default_rng(2)
    var = np.full(image.shape, 100.0)
    fluxes, errs = [], []
    for _ in range(40):
        res = psf_photometry(
            image + rng.normal(0, 10, image.shape), _stamp(3.5), x, y, variance=var
        )
        fluxes.append(res.flux)
        errs.append(res.fluxerr)
    pull = (np.array(fluxes) - 800.0) / np.array(errs)
    assert abs(pull.mean()) < 0.05
    assert 0.93 < pull.std() < 1.07
    # without a variance map the error comes from the residuals and agrees
    res = psf_photometry(image + rng.normal(0, 10, image.shape), _stamp(3.5), x, y)
    np.testing.assert_allclose(np.median(res.fluxerr), np.median(errs), rtol=0.1)


def test_kernel_convolution_and_background_fit():
    from scipy.signal import fftconvolve

    x, y = _grid(5, 30, 160, seed=3)
    kernel = sim.render_sources((11, 11), [5.3], [4.8], [1.2], [2.0], psf="gaussian", radius=5)
    image = sim.render_sources((192, 192), x, y, [1000.0], [3.0], radius=15)
    image = fftconvolve(image, kernel, mode="same") + 7.0
    res = psf_photometry(image, _stamp(3.0), x, y, kernel=kernel, fit_background=True)
    np.testing.assert_allclose(res.flux, 1000.0, rtol=2e-3)  # units of the convolved image
    np.testing.assert_allclose(res.background, 7.0, atol=0.05)
    per_star = np.broadcast_to(kernel, (x.size, 11, 11))
    res2 = psf_photometry(image - 7.0, _stamp(3.0), x, y, kernel=per_star)
    np.testing.assert_allclose(res2.flux, res.flux, rtol=1e-3)
    res3 = psf_photometry(image - 7.0, _stamp(3.0), x, y, kernel=lambda xq, yq: per_star[: xq.size])
    np.testing.assert_allclose(res3.flux, res2.flux, rtol=1e-12)


def test_a_psf_model_callable_plugs_in():
    x, y = _grid(4, 30, 160, seed=4)
    image = sim.render_sources((192, 192), x, y, [1500.0], [3.0], psf="gaussian", radius=12)

    def model(xq, yq):  # shifted stamps about the nearest pixel, as the protocol says
        ix, iy = np.floor(xq + 0.5), np.floor(yq + 0.5)
        return np.stack(
            [sim.render_sources((25, 25), [12 + a - i], [12 + b - j], [1.0], [3.0],
                                psf="gaussian", radius=12)
             for a, b, i, j in zip(xq, yq, ix, iy, strict=True)]
        )  # fmt: skip

    res = psf_photometry(image, model, x, y)
    np.testing.assert_allclose(res.flux, 1500.0, rtol=1e-4)


def test_flags_for_edges_and_masks():
    image = sim.render_sources((64, 64), [1.0, 30.0, 50.0], [30.0, 30.0, 50.0], [900.0], [3.0])
    mask = np.zeros(image.shape, np.uint8)
    mask[30, 30] = 1
    mask[44:57, 44:57] = 1
    res = psf_photometry(
        image, _stamp(3.0, half=7), [1.0, 30.0, 50.0], [30.0, 30.0, 50.0], mask=mask
    )
    flag = res.flag
    assert flag[0] & PSF_TRUNC and flag[1] & PSF_HASMASKED and flag[2] & PSF_ALLMASKED
    assert np.isnan(res.flux[2]) and np.isfinite(res.flux[:2]).all()
    flux, fluxerr = res  # unpacks as flux, fluxerr
    assert flux.shape == fluxerr.shape == (3,)


def test_input_errors():
    image = np.zeros((32, 32))
    with pytest.raises(InputError, match="psf"):
        psf_photometry(image, np.ones((4, 4)), [10.0], [10.0])
    with pytest.raises(InputError, match="psf"):
        psf_photometry(image, np.zeros((5, 5)), [10.0], [10.0])
    with pytest.raises(InputError, match="y"):
        psf_photometry(image, np.ones((5, 5)), [10.0, 11.0], [10.0])
    with pytest.raises(InputError, match="kernel"):
        psf_photometry(image, np.ones((5, 5)), [10.0], [10.0], kernel=np.ones((4, 4)))
    with pytest.raises(InputError, match="variance"):
        psf_photometry(image, np.ones((5, 5)), [10.0], [10.0], variance=np.ones((3, 3)))
    with pytest.raises(InputError, match="radius"):
        psf_photometry(image, np.ones((5, 5)), [10.0], [10.0], radius=-1.0)


# --------------------------------------------------------------------------- transients


@pytest.fixture(scope="module")
def injected():
    """A simulated pair (Moffat PSFs, same pointing), the sharper frame as the reference,
    with point sources of known flux injected into the science frame (Poisson noise on
    their light too), and the subtraction."""
    night = sim.night(
        n_frames=2, shape=(448, 448), n_stars=260, seed=21, psf_variation=0.0,
        max_offset=0.0, max_rotation=0.0, n_transients=0, variable_fraction=0.0,
        cosmic_rate=0.0, n_saturated=0, seeing_fwhm=(2.6, 3.8),
    )  # fmt: skip
    seeing = np.asarray(night.frames_table["seeing_fwhm"])
    k_ref = int(np.argmin(seeing))
    k_sci = 1 - k_ref
    ep = night.epochs[night.epochs["frame"] == k_sci]
    tree = cKDTree(np.column_stack([ep["x"], ep["y"]]))
    x, y = _grid(16, 24, 423, seed=7)
    far = tree.query(np.column_stack([x, y]))[0] > 12.0
    x, y = x[far], y[far]
    bright = np.arange(x.size) % 3 == 0
    flux = np.where(bright, 40000.0, 880.0)
    rng = np.random.default_rng(8)
    light = sim.render_sources((448, 448), x, y, flux, [seeing[k_sci]], radius=15)
    science = night.frames[k_sci].data + rng.poisson(light * GAIN) / GAIN
    reference = night.frames[k_ref].data
    sub = subtract(science.astype(np.float32), reference, gain=GAIN, rdnoise=5.0,
                   saturation=50000.0)  # fmt: skip
    return {"sub": sub, "x": x, "y": y, "flux": flux, "bright": bright, "seeing": seeing,
            "k_sci": k_sci, "k_ref": k_ref}  # fmt: skip


def test_injected_transients_with_the_science_psf(injected):
    d = injected
    sub = d["sub"]
    assert sub.convolved == "reference"
    psf = _stamp(d["seeing"][d["k_sci"]])
    res = psf_photometry(sub, psf, d["x"], d["y"])
    assert not (res.flag & PSF_ALLMASKED).any()
    b, f = d["bright"], d["flux"]
    snr = f / res.fluxerr
    assert snr[b].min() > 150  # 2 % is then 3 sigma or more
    np.testing.assert_allclose(res.flux[b], f[b], rtol=0.02)
    faint = ~b
    assert 7 < np.median(snr[faint]) < 13
    pull = (res.flux[faint] - f[faint]) / res.fluxerr[faint]
    assert abs(pull.mean()) < 0.35
    # the errors carry the covariance the kernel gave the reference's noise (a single
    # exposure here, as noisy as the science): measured pull std 1.07 on these 90
    # (1.04 over 1,629 injections on four nights, 1.00 with fit_background)
    assert 0.85 < pull.std() < 1.2
    # per-pixel variance alone counts the convolved noise as independent: 1.31 here
    flat = psf_photometry(sub, psf, d["x"], d["y"], covariance=False)
    flat_pull = (flat.flux[faint] - f[faint]) / flat.fluxerr[faint]
    assert flat_pull.std() > pull.std() + 0.15
    np.testing.assert_array_equal(flat.flux, res.flux)


def test_injected_transients_with_the_reference_psf_and_kernel(injected):
    d = injected
    sub = d["sub"]
    psf = _stamp(d["seeing"][d["k_ref"]])
    res = psf_photometry(sub, psf, d["x"], d["y"], kernel=sub)
    # flux in reference units: times the photometric scale gives the science flux
    flux = res.flux * sub.scale_at(d["x"], d["y"])
    b = d["bright"]
    np.testing.assert_allclose(flux[b], d["flux"][b], rtol=0.02)
    err = res.fluxerr * sub.scale_at(d["x"], d["y"])
    pull = (flux[~b] - d["flux"][~b]) / err[~b]
    assert abs(pull.mean()) < 0.35
    assert 0.85 < pull.std() < 1.2  # measured 1.07, see above


def test_convolved_noise_weights_follow_the_subtraction_convolution():
    # the covariance term weighs the convolved image's pixel j by (a ⋆ K)_j; build those
    # weights instead from poly_convolve itself (the response to each unit impulse) with a
    # lopsided kernel, so a flipped convention would fail
    from dagpre.ops._kernels import poly_convolve
    from dagpre.ops.psfphot import _convolved_noise_excess

    rng = np.random.default_rng(4)
    k, L, n = 5, 7, 21
    r, h = k // 2, L // 2
    kern = rng.random((k, k))
    kern[0, :] += 2.0  # most weight on one side
    a = rng.normal(size=(L, L))
    c = n // 2  # the window's centre pixel
    win = slice(c - h, c + h + 1)
    grown = slice(c - h - r, c + h + r + 1)
    g = np.zeros((n, n))
    for j in range(n * n):
        impulse = np.zeros((n, n), dtype=np.float32)
        impulse.flat[j] = 1.0
        resp = poly_convolve(impulse, kern[None].astype(np.float32), [(0, 0)], (0, 1, 0, 1))
        g.flat[j] = (a * resp[win, win]).sum()
    var_c = rng.uniform(1.0, 3.0, size=(n, n))
    diag = poly_convolve(var_c.astype(np.float32), (kern * kern)[None].astype(np.float32),
                         [(0, 0)], (0, 1, 0, 1))[win, win]  # fmt: skip
    expected = (var_c * g * g).sum() - (a * a * diag).sum()
    got = _convolved_noise_excess(np, a[None], kern[None], var_c[None, grown, grown])[0]
    assert abs(g).sum() == pytest.approx(abs(g[grown, grown]).sum())  # all inside the grid
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_covariance_needs_the_convolved_variance(injected):
    import dataclasses

    sub = dataclasses.replace(injected["sub"], convolved_variance=None)
    psf = _stamp(injected["seeing"][injected["k_sci"]])
    with pytest.raises(InputError, match="convolved_variance"):
        psf_photometry(sub, psf, [100.0], [100.0])
    assert np.isfinite(psf_photometry(sub, psf, [100.0], [100.0], covariance=False).fluxerr[0])


@pytest.mark.gpu
def test_gpu_matches_numpy():
    import cupy

    x, y = _grid(5, 20, 170, seed=9)
    image = sim.render_sources((192, 192), x, y, [1200.0], [3.1], radius=15)
    image = image + np.random.default_rng(3).normal(0, 5, image.shape)
    var = np.full(image.shape, 25.0)
    kernel = sim.render_sources((9, 9), [4.2], [3.9], [1.1], [2.0], psf="gaussian", radius=4)
    cpu = psf_photometry(image, _stamp(3.1), x, y, variance=var, kernel=kernel)
    gpu = psf_photometry(cupy.asarray(image), cupy.asarray(_stamp(3.1)), x, y,
                         variance=cupy.asarray(var), kernel=cupy.asarray(kernel))  # fmt: skip
    np.testing.assert_allclose(to_host(gpu.flux), cpu.flux, rtol=1e-6)
    np.testing.assert_allclose(to_host(gpu.fluxerr), cpu.fluxerr, rtol=1e-6)
