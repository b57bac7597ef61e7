"""A run's folder layout, and the main job: the ordered notebooks executed headlessly as the run's report."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .attribution import AttributionGraph

log = logging.getLogger("cltlab")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
MAIN_JOB = (
    "01_harvest.ipynb",
    "02_train.ipynb",
    "03_features.ipynb",
    "04_replacement.ipynb",
    "06_attribution.ipynb",
)
"""The notebooks ``cltlab run`` executes, in order (05_server is a demo, not a step of the job)."""


class AttributionScores(NamedTuple):
    """What a run records about its attribution graph (``<run>/attribution/scores.json``)."""

    prompt: str
    replacement: float
    """Replacement score: share of the token → logit influence not passing through error nodes."""
    completeness: float
    """Completeness score: influence-weighted share of node inputs from features and tokens, not errors."""
    n_nodes: int
    """Nodes of the whole graph (features, errors, tokens, logits)."""
    n_features: int
    """Feature nodes of the whole graph."""
    pruned_nodes: int
    """Nodes kept by pruning at ``node_threshold`` / ``edge_threshold``."""
    pruned_features: int
    """Feature nodes kept by pruning."""
    pruned_edges: int
    """Edges kept by pruning."""
    node_threshold: float
    edge_threshold: float

    @classmethod
    def of(
        cls, graph: AttributionGraph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98
    ) -> AttributionScores:
        scores, pruned = graph.scores(), graph.prune(node_threshold, edge_threshold)
        return cls(
            graph.prompt,
            scores.replacement,
            scores.completeness,
            graph.n_nodes,
            graph.n_features,
            int(pruned.node_mask.sum()),
            int(pruned.node_mask[: graph.n_features].sum()),
            int(pruned.edge_mask.sum()),
            node_threshold,
            edge_threshold,
        )

    def summary(self) -> str:
        return (
            f"attribution of {self.prompt!r}: replacement score {self.replacement:.3f}, completeness score "
            f"{self.completeness:.3f}; pruned to {self.pruned_nodes} of {self.n_nodes} nodes "
            f"({self.pruned_features} of {self.n_features} features) and {self.pruned_edges} edges"
        )


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps each artifact."""

    root: Path
    """The run folder, e.g. ``runs/default``."""

    @property
    def buffer(self) -> Path:
        """Harvested activations (a folder of HDF5 shards and a manifest)."""
        return self.root / "activations"

    @property
    def clt(self) -> Path:
        """The trained CLT (safetensors + config.json)."""
        return self.root / "clt"

    @property
    def circuit_tracer(self) -> Path:
        """The CLT in circuit-tracer's layout."""
        return self.root / "circuit_tracer"

    @property
    def metrics(self) -> Path:
        """Replacement-model metrics (JSON)."""
        return self.root / "metrics.json"

    @property
    def attribution(self) -> Path:
        """The attribution graph of the run's prompt (graph.json + graph.safetensors) and its scores.json."""
        return self.root / "attribution"

    @property
    def report(self) -> Path:
        """Executed notebooks with their outputs."""
        return self.root / "report"

    def save_metrics(self, metrics) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.metrics.write_text(json.dumps(metrics.to_dict(), indent=2))
        return self.metrics

    def load_metrics(self):
        """The ``ReplacementMetrics`` that ``save_metrics`` wrote."""
        from .replacement import ReplacementMetrics

        saved = json.loads(self.metrics.read_text())
        return ReplacementMetrics(**{name: saved[name] for name in ReplacementMetrics._fields})

    def save_attribution(
        self, graph: AttributionGraph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98
    ) -> AttributionScores:
        """Save ``graph`` in ``attribution`` and its scores (pruned at the thresholds) in ``scores.json``."""
        graph.save(self.attribution)
        scores = AttributionScores.of(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
        (self.attribution / "scores.json").write_text(json.dumps(scores._asdict(), indent=2))
        return scores

    def load_attribution_scores(self) -> AttributionScores:
        """The ``AttributionScores`` that ``save_attribution`` wrote."""
        saved = json.loads((self.attribution / "scores.json").read_text())
        return AttributionScores(**{name: saved[name] for name in AttributionScores._fields})


def run_paths(profile: str, run_dir: str | Path | None = None) -> RunPaths:
    """The run folder: ``run_dir`` if given, else ``$CLTLAB_RUN_DIR``, else ``runs/<profile>``."""
    root = run_dir or os.environ.get("CLTLAB_RUN_DIR") or Path("runs") / profile
    return RunPaths(Path(root).resolve())


def run_notebooks(
    profile: str,
    run_dir: str | Path | None = None,
    *,
    notebooks: tuple[str, ...] = MAIN_JOB,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    timeout: int = 3600,
) -> RunPaths:
    """Execute the ordered notebooks for ``profile``; keep executed copies (ipynb + HTML) in ``<run>/report``."""
    paths = run_paths(profile, run_dir)
    paths.report.mkdir(parents=True, exist_ok=True)
    # The kernels inherit these. Plotly's "notebook" renderer also embeds plotly.js as HTML, so the plots
    # show in the HTML copies of the report (offline) as well as in JupyterLab.
    env = dict(
        CLTLAB_PROFILE=profile, CLTLAB_RUN_DIR=str(paths.root), PLOTLY_RENDERER="plotly_mimetype+notebook"
    )
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        for name in notebooks:
            _execute(notebooks_dir / name, paths.report / name, timeout)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return paths


def _execute(source: Path, target: Path, timeout: int) -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    if not source.exists():
        raise FileNotFoundError(
            f"Notebook {source} not found; pass notebooks_dir= the repository's notebooks/."
        )
    nb = nbformat.read(source, as_version=4)
    start = time.perf_counter()
    log.info("executing %s ...", source.name)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(source.parent)}}
    )
    try:
        client.execute()
    finally:  # keep the executed copy, error included
        nbformat.write(nb, target)
        target.with_suffix(".html").write_text(HTMLExporter().from_notebook_node(nb)[0])
    log.info("%s done in %.0f s", source.name, time.perf_counter() - start)
