"""Workflows: a YAML file that says which frames, which steps with which parameters, where.

A workflow names its inputs (paths or globs, grouped into nights or fields), how the
reference is chosen, each step's keyword arguments (the eager functions' own names, so
``steps.background.box`` is ``dp.estimate_background(box=...)``), the products to keep, the
output store, the cluster and the retries. :func:`load_workflow` reads and validates one;
every problem is an :class:`~dagpre.types.InputError` whose message names the key's path,
what was expected, what was found and the file and line::

    steps.background.box: expected a positive integer, got 'big' (night.yaml, line 14)
    steps.backgorund: unknown key; did you mean 'background'? (night.yaml, line 12)

A step present in ``steps`` runs (an empty entry runs it with its defaults); a step left
out does not. Steps always run in the pipeline's order, whatever their order in the file:
read, quality, mask, background, align, subtract, detect, photometry, candidates, write.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dagpre.types import InputError

__all__ = ["STEP_ORDER", "Workflow", "load_workflow", "parse_workflow"]

#: The steps a workflow may name, in the order the pipeline runs them.
STEP_ORDER = (
    "read",
    "quality",
    "mask",
    "background",
    "align",
    "subtract",
    "detect",
    "photometry",
    "candidates",
    "write",
)

#: Products a workflow may keep in its store.
PRODUCTS = ("aligned", "difference", "variance", "mask", "catalogs", "lightcurves", "candidates")


class _Bad(Exception):
    """A value check failed; :func:`_check` adds the key path and the file position."""

    def __init__(self, reason: str, path: tuple = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


# --------------------------------------------------------------------------- value checks
# Each check takes a value and returns it normalised, or raises _Bad with what it expected.


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, Mapping) else "a mapping"


def _int(minimum: int) -> Callable:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def check(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise _Bad(f"expected {what}, got {_show(value)}")
        return int(value)

    return check


def _odd_int(value):
    value = _int(1)(value)
    if value % 2 == 0:
        raise _Bad(f"expected an odd positive integer, got {value!r}")
    return value


def _float(low: float | None = None, high: float | None = None, strict: bool = True) -> Callable:
    """A real number; above ``low`` (strictly, or not), or in ``[low, high]`` when both."""
    if high is not None:
        what = f"a number in [{low:g}, {high:g}]"
    elif low is None:
        what = "a number"
    elif low == 0:
        what = "a positive number" if strict else "a number >= 0"
    else:
        what = f"a number {'>' if strict else '>='} {low:g}"

    def check(value):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value
        if ok and high is not None:
            ok = low <= value <= high
        elif ok and low is not None:
            ok = value > low if strict else value >= low
        if not ok:
            raise _Bad(f"expected {what}, got {_show(value)}")
        return float(value)

    return check


def _bool(value):
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_show(value)}")
    return value


def _str(value):
    if not isinstance(value, str) or not value:
        raise _Bad(f"expected a non-empty string, got {_show(value)}")
    return value


def _choice(*allowed: Any) -> Callable:
    def check(value):
        if isinstance(value, bool) or value not in allowed:
            shown = ", ".join("null" if a is None else repr(a) for a in allowed)
            raise _Bad(f"expected one of {shown}, got {_show(value)}")
        return value

    return check


def _optional(inner: Callable) -> Callable:
    def check(value):
        return None if value is None else inner(value)

    return check


def _either(*checks: Callable, what: str) -> Callable:
    def check(value):
        for inner in checks:
            try:
                return inner(value)
            except _Bad:
                continue
        raise _Bad(f"expected {what}, got {_show(value)}")

    return check


def _list_of(inner: Callable, *, min_len: int = 1, single: bool = False) -> Callable:
    """A list of values (or one value, when ``single``), each checked by ``inner``."""

    def check(value):
        if single and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list) or len(value) < min_len:
            raise _Bad(f"expected a list of at least {min_len} item(s), got {_show(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(inner(item))
            except _Bad as bad:
                raise _Bad(bad.reason, (i, *bad.path)) from None
        return out

    return check


def _pair_of(inner: Callable) -> Callable:
    def check(value):
        if not isinstance(value, list) or len(value) != 2:
            raise _Bad(f"expected a list of two numbers, got {_show(value)}")
        return [inner(v) for v in value]

    return check


def _section(spec: Mapping[str, Callable]) -> Callable:
    """A mapping whose keys are all in ``spec``; missing keys take no value (the default)."""

    def check(value):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _Bad(f"expected a mapping of {', '.join(spec)}, got {_show(value)}")
        out = {}
        for key, item in value.items():
            if key not in spec:
                raise _Bad(_unknown(key, spec), (key,))
            try:
                out[key] = spec[key](item)
            except _Bad as bad:
                raise _Bad(bad.reason, (key, *bad.path)) from None
        return out

    return check


def _unknown(key: Any, allowed: Mapping | tuple) -> str:
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of {', '.join(str(a) for a in allowed)}"


# --------------------------------------------------------------------------- the schema
# Step parameters are the eager functions' keyword arguments (same names, same meaning).

_FILTER_KERNEL = _either(
    _choice("default", None), _float(0), what="'default', null or a FWHM in pixels"
)

STEP_PARAMETERS: dict[str, dict[str, Callable]] = {
    "read": {"hdu": _optional(_either(_int(0), _str, what="an HDU index or name"))},
    "quality": {
        "model": _optional(_str),
        "threshold": _float(0),
        "max_bad_fraction": _float(0.0, 1.0),
        "exclude": _bool,
    },
    "mask": {
        "saturate": _optional(_float(0)),
        "grow": _float(0, strict=False),
        "bleed": _bool,
        "bleed_threshold": _float(0),
        "bleed_window": _int(1),
        "max_radius": _float(0),
    },
    "background": {
        "box": _int(1),
        "filter_size": _int(1),
        "estimator": _choice("sextractor", "median", "mean", "sigma_clip"),
        "sigma": _float(0),
        "maxiters": _int(1),
        "interpolation": _choice("sextractor", "zoom"),
        "filter_edges": _choice("shrink", "truncate"),
    },
    "align": {
        "method": _choice("wcs", "stars", "xcorr"),
        "order": _choice("nearest", "bilinear", "bicubic", "lanczos3"),
    },
    "subtract": {
        "basis": _choice("gaussian", "delta", "modified_delta"),
        "kernel_size": _odd_int,
        "kernel_order": _int(0),
        "scale_order": _int(0),
        "bg_order": _int(0),
        "convolve": _choice("auto", "reference", "science"),
    },
    "detect": {
        "thresh": _float(0),
        "minarea": _int(1),
        "filter_kernel": _FILTER_KERNEL,
        "filter_type": _choice("matched", "conv"),
        "deblend_nthresh": _int(1),
        "deblend_cont": _float(0.0, 1.0),
        "clean": _bool,
        "clean_param": _float(0),
        "auto_columns": _bool,
    },
    "photometry": {
        "radii": _list_of(_float(0), single=True),
        "bkgann": _optional(_pair_of(_float(0))),
        "kron": _bool,
        "zero_point": _optional(_float()),
        "false_alarm": _float(0.0, 1.0),
        "min_chi2_dof": _float(0, strict=False),
        "error_floor": _float(0, strict=False),
    },
    "candidates": {
        "thresh": _float(0),
        "minarea": _int(1),
        "negative": _bool,
        "min_snr": _float(0),
        "min_fwhm_ratio": _float(0, strict=False),
        "min_detections": _int(1),
        "radius": _float(0),
        "source_radius": _float(0),
        "residual_radius": _float(0),
        "residual_ratio": _float(0),
    },
    "write": {"quicklook": _bool},
}

_TOP = {
    "name": _str,
    "inputs": _section(
        {
            "paths": _list_of(_str, single=True),
            "group_by": _choice("none", "night", "field"),
            "hdu": _optional(_either(_int(0), _str, what="an HDU index or name")),
        }
    ),
    "reference": _section(
        {
            "select": _choice("best", "first", "frames"),
            "n_best": _int(1),
            "frames": _list_of(_str, single=True),
            "combine": _choice("median", "mean_clip"),
            "catalog": _optional(_str),
        }
    ),
    "steps": _section({name: _section(spec) for name, spec in STEP_PARAMETERS.items()}),
    "products": _list_of(_choice(*PRODUCTS), min_len=0, single=True),
    "store": _section(
        {
            "path": _str,
            "overwrite": _bool,
            "sharding": _bool,
            "chunks": _optional(_pair_of(_int(1))),
        }
    ),
    "cluster": _section(
        {
            "kind": _choice("auto", "local", "local_cuda", "address"),
            "address": _optional(_str),
            "n_workers": _optional(_int(1)),
            "threads_per_worker": _int(1),
            "memory_limit": _optional(_either(_str, _int(1), what="a size like '4GB'")),
            "host": _str,
            "dashboard_address": _optional(_str),
            "rmm_pool_size": _optional(_str),
            "device_memory_limit": _optional(
                _either(_float(0.0, 1.0), _str, what="a fraction of GPU memory or a size")
            ),
            "tls": _optional(_section({"ca_file": _str, "cert": _str, "key": _str})),
        }
    ),
    "retries": _int(0),
    "batch_size": _int(1),
}

#: What a workflow gets for the sections and settings it leaves out.
DEFAULTS: dict[str, Any] = {
    "inputs": {"group_by": "none", "hdu": None},
    "reference": {"select": "best", "n_best": 5, "combine": "median"},
    "products": ["aligned", "difference", "variance", "mask", "catalogs", "lightcurves"],
    "store": {"overwrite": False, "sharding": False, "chunks": None},
    "cluster": {
        "kind": "auto",
        "address": None,
        "n_workers": None,
        "threads_per_worker": 1,
        "memory_limit": None,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:8787",
        "rmm_pool_size": None,
        "device_memory_limit": None,
        "tls": None,
    },
    "retries": 2,
    "batch_size": 64,
}


@dataclass(frozen=True)
class Workflow:
    """A validated workflow.

    Attributes
    ----------
    name : str
        The workflow's name (the file's stem when it has none).
    paths : list of str
        Input paths or glob patterns, absolute (relative ones are taken from the file's
        folder).
    group_by : {"none", "night", "field"}
        How frames are grouped into stores: one store, one per night (MJD), one per field
        (OBJECT header card).
    hdu : int, str or None
        The HDU holding the pixels (None: the first with an image).
    reference : dict
        ``select`` ("best", "first" or "frames"), ``n_best``, ``frames``, ``combine``.
    steps : dict
        Step name -> keyword arguments, in :data:`STEP_ORDER`; only the steps that run.
    products : tuple of str
        Products kept in the store.
    store : dict
        ``path`` (absolute), ``overwrite``, ``sharding``, ``chunks``.
    cluster : dict
        Where to run: ``kind``, ``address``, ``n_workers``, ``threads_per_worker``,
        ``memory_limit``, ``host``, ``dashboard_address``, ``rmm_pool_size``,
        ``device_memory_limit``, ``tls``.
    retries : int
        Retries of a task whose worker was lost.
    batch_size : int
        Frames per graph; longer seasons are streamed in batches of this size.
    text : str
        The YAML as read (kept in the store's provenance).
    source : str
        Where it came from (a path or ``"<string>"``).
    """

    name: str
    paths: list
    group_by: str
    hdu: Any
    reference: dict
    steps: dict
    products: tuple
    store: dict
    cluster: dict
    retries: int
    batch_size: int
    text: str = field(repr=False)
    source: str = "<string>"


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow file.

    Parameters
    ----------
    path : str or Path
        A YAML file (see ``workflows/`` for commented examples).

    Returns
    -------
    Workflow

    Raises
    ------
    InputError
        The file is missing or unreadable, is not YAML, or a key or value is wrong; the
        message names the key's path, what was expected, and the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(str(path), f"cannot read the workflow: {err.strerror or err}") from None
    return parse_workflow(text, source=str(path), base_dir=path.resolve().parent)


def parse_workflow(text: str, source: str = "<string>", base_dir: str | Path | None = None):
    """Validate a workflow given as YAML text; relative paths are taken from ``base_dir``.

    Examples
    --------
    >>> wf = parse_workflow('''
    ... inputs: {paths: /data/night1/*.fits}
    ... steps: {background: {box: 128}, detect: {}}
    ... store: {path: /out/night1.zarr}
    ... ''')
    >>> list(wf.steps), wf.steps["background"]
    (['background', 'detect'], {'box': 128})
    >>> parse_workflow('steps: {background: {box: big}}')
    Traceback (most recent call last):
    ...
    dagpre.types.InputError: steps.background.box: expected a positive integer, got 'big' (<string>, line 1)
    """  # noqa: E501
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(source, f"not valid YAML: {problem}{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InputError(source, f"expected a mapping of {', '.join(_TOP)} at the top level")
    lines = _key_lines(node)
    try:
        checked = _section(_TOP)(raw)
    except _Bad as bad:
        dotted = ".".join(str(p) for p in bad.path) or "(top level)"
        line = _nearest_line(lines, bad.path)
        where = f" ({Path(source).name}, line {line})" if line else f" ({Path(source).name})"
        raise InputError(dotted, bad.reason + where) from None
    return _complete(checked, text, source, base_dir)


def _complete(checked: dict, text: str, source: str, base_dir) -> Workflow:
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def absolute(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else base / q)

    where = f" ({Path(source).name})"
    inputs = {**DEFAULTS["inputs"], **checked.get("inputs", {})}
    if "paths" not in inputs:
        raise InputError("inputs.paths", "missing: list the frames (paths or globs)" + where)
    store = {**DEFAULTS["store"], **checked.get("store", {})}
    if "path" not in store:
        raise InputError("store.path", "missing: where the Zarr store goes" + where)
    reference = {**DEFAULTS["reference"], **checked.get("reference", {})}
    if reference["select"] == "frames" and not reference.get("frames"):
        raise InputError(
            "reference.frames", "missing: select is 'frames' but no frames are named" + where
        )
    reference["frames"] = [absolute(p) for p in reference.get("frames", [])]
    reference["catalog"] = absolute(reference["catalog"]) if reference.get("catalog") else None
    quality = checked.get("steps", {}).get("quality") or {}
    if quality.get("model"):
        quality["model"] = absolute(quality["model"])
    cluster = {**DEFAULTS["cluster"], **checked.get("cluster", {})}
    if cluster["kind"] == "address" and not cluster["address"]:
        raise InputError("cluster.address", "missing: kind is 'address' but none is given" + where)
    if cluster["address"] and cluster["kind"] == "auto":
        cluster["kind"] = "address"
    steps_in = checked.get("steps", {})
    steps = {name: dict(steps_in[name]) for name in STEP_ORDER if name in steps_in}
    name = checked.get("name") or (Path(source).stem if source != "<string>" else "workflow")
    return Workflow(
        name=name,
        paths=[absolute(p) for p in inputs["paths"]],
        group_by=inputs["group_by"],
        hdu=inputs["hdu"],
        reference=reference,
        steps=steps,
        products=tuple(checked.get("products", DEFAULTS["products"])),
        store={**store, "path": absolute(store["path"])},
        cluster=cluster,
        retries=checked.get("retries", DEFAULTS["retries"]),
        batch_size=checked.get("batch_size", DEFAULTS["batch_size"]),
        text=text,
        source=source,
    )


def _key_lines(node) -> dict[tuple, int]:
    """1-based line of every key path in a composed YAML node tree."""
    lines: dict[tuple, int] = {}

    def walk(n, path):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                lines[(*path, key)] = k.start_mark.line + 1
                walk(v, (*path, key))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[(*path, i)] = v.start_mark.line + 1
                walk(v, (*path, i))

    if node is not None:
        walk(node, ())
    return lines


def _nearest_line(lines: dict[tuple, int], path: tuple) -> int | None:
    """The line of ``path``, or of its closest ancestor that has one."""
    keys = tuple(str(p) if not isinstance(p, int) else p for p in path)
    for end in range(len(keys), 0, -1):
        line = lines.get(keys[:end])
        if line is not None:
            return line
    return None
