"""Input and output: FITS frames in (and out); the Zarr store layout arrives with the pipeline."""

from dagpre.io.fits import read_fits, write_fits

__all__ = ["read_fits", "write_fits"]
