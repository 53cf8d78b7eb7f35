"""Pipeline mode: a YAML workflow turned into a Dask graph that writes a Zarr store.

``ops/`` holds the array-level steps; this package owns execution (graph, cluster, store),
so a step never knows whether it runs in a notebook or on a cluster.
"""

from dagpre.pipeline.workflow import STEP_ORDER, Workflow, load_workflow, parse_workflow

__all__ = ["STEP_ORDER", "Workflow", "load_workflow", "parse_workflow"]
