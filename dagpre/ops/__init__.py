"""Pure array steps, one module per family, each running on NumPy or CuPy input.

Steps arrive with their issues (background, masks, transforms, detection, alignment,
subtraction, ...); nothing here imports dask, zarr or the pipeline.
"""

__all__: list[str] = []
