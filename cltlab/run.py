"""A run's folder layout, and the main job: the ordered notebooks executed headlessly as the run's report."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .config import PROFILES, Profile, get_profile

if TYPE_CHECKING:
    from .attribution import AttributionGraph

log = logging.getLogger("cltlab")

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
    def dashboard(self) -> Path:
        """The static feature dashboard (``index.html``; ``cltlab dashboard``)."""
        return self.root / "dashboard"

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
    """The run folder: ``run_dir`` if given, else ``$CLTLAB_RUN_DIR``, else ``runs/<profile>`` (for a profile saved
    as YAML, ``runs/<its file name without .yaml>``)."""
    root = run_dir or os.environ.get("CLTLAB_RUN_DIR") or Path("runs") / Path(profile).stem
    return RunPaths(Path(root).resolve())


class NotebookSetup(NamedTuple):
    """What the first cell of every notebook needs: ``profile, paths = cltlab.notebook()``."""

    profile: Profile
    """The profile named by ``$CLTLAB_PROFILE`` (a copy the notebook may edit)."""
    paths: RunPaths
    """The run folder: ``$CLTLAB_RUN_DIR``, else ``<runs>/<profile>``."""


def notebook(default_profile: str = "default", *, runs: str | Path = "../runs") -> NotebookSetup:
    """The profile and run folder of a notebook, chosen by ``$CLTLAB_PROFILE`` and ``$CLTLAB_RUN_DIR``.

    ``cltlab run`` and ``make test`` set both; a notebook opened by hand in ``notebooks/`` gets
    ``default_profile`` and ``runs/<profile>`` of the checkout (``runs`` is relative to the notebook's folder).
    """
    name = os.environ.get("CLTLAB_PROFILE") or default_profile
    run_dir = os.environ.get("CLTLAB_RUN_DIR") or Path(runs) / Path(name).stem
    return NotebookSetup(get_profile(name), run_paths(name, run_dir))


def find_notebooks() -> Path:
    """Where ``cltlab run`` finds its notebooks: the checkout's ``notebooks/`` beside the package, else the copy
    an installed wheel keeps in ``<prefix>/share/cltlab/notebooks`` (pyproject's data-files)."""
    checkout = Path(__file__).resolve().parents[1] / "notebooks"
    if (checkout / MAIN_JOB[0]).exists():
        return checkout
    for file in metadata.files("cltlab") or ():
        if file.name == MAIN_JOB[0] and file.parent.name == "notebooks":
            return Path(file.locate()).resolve().parent
    return checkout  # _execute says it is missing


def run_notebooks(
    profile: str,
    run_dir: str | Path | None = None,
    *,
    notebooks: tuple[str, ...] = MAIN_JOB,
    notebooks_dir: Path | None = None,
    timeout: int = 3600,
    device: str = "auto",
) -> RunPaths:
    """Execute the ordered notebooks for ``profile``; keep executed copies (ipynb + HTML) in ``<run>/report``.

    The notebooks come from ``notebooks_dir``, by default the checkout's or the installed wheel's
    (``find_notebooks()``). Their kernels get the profile and run folder in their own environment; this process's
    ``os.environ`` is left as it was. ``device`` is where their models, CLTs and training run (``auto``: the GPU
    when there is one; see ``precision.resolve_device``).
    """
    paths = run_paths(profile, run_dir)
    paths.report.mkdir(parents=True, exist_ok=True)
    folder = notebooks_dir or find_notebooks()
    # Plotly's "notebook" renderer also embeds plotly.js as HTML, so the plots show in the HTML copies of the
    # report (offline) as well as in JupyterLab.
    profile = (
        profile if profile in PROFILES else str(Path(profile).resolve())
    )  # a YAML file, seen from notebooks/
    env = os.environ | dict(
        CLTLAB_PROFILE=profile,
        CLTLAB_RUN_DIR=str(paths.root),
        PLOTLY_RENDERER="plotly_mimetype+notebook",
        CLTLAB_PROGRESS="text",  # progress bars as text on stderr, which _execute passes on to this terminal
        TQDM_MININTERVAL="1",  # one redraw a second: the executed notebooks keep every redraw
    )
    if device != "auto":  # else $CLTLAB_DEVICE, where set, still decides
        env["CLTLAB_DEVICE"] = device
    for name in notebooks:
        _execute(Path(folder) / name, paths.report / name, timeout, env)
    return paths


def _execute(source: Path, target: Path, timeout: int, env: dict[str, str]) -> None:
    import nbformat
    from jupyter_client import KernelManager
    from nbconvert import HTMLExporter

    if not source.exists():
        raise FileNotFoundError(
            f"Notebook {source} not found; pass notebooks_dir= the repository's notebooks/."
        )
    nb = nbformat.read(source, as_version=4)
    start = time.perf_counter()
    log.info("executing %s ...", source.name)
    with tempfile.TemporaryDirectory(prefix="cltlab-kernel-") as sockets:
        # The kernel talks over Unix sockets in a private folder: no TCP port, nothing in plain text on the network.
        km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
        client = _client(source, nb, km, timeout)
        try:
            client.execute(env=env)  # the kernel's environment
        finally:  # keep the executed copy, error included
            if client.kc is not None:  # nbclient leaves a client of a kernel manager it was given running
                client.kc.stop_channels()  # (else jupyter_client warns at exit: "Could not destroy zmq context")
            if km.has_kernel:
                km.shutdown_kernel(now=True)
            nbformat.write(nb, target)
            target.with_suffix(".html").write_text(HTMLExporter().from_notebook_node(nb)[0])
    log.info("%s done in %.0f s", source.name, time.perf_counter() - start)


def _client(source: Path, nb, km, timeout: int):
    """A NotebookClient of ``source`` that says which cell runs and passes on the cells' text output (the progress
    bars of harvest, training, statistics and evaluation) as it arrives."""
    from nbclient import NotebookClient

    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]

    def started(cell, cell_index: int) -> None:
        if cell.cell_type != "code":
            return
        first = next((line for line in cell.source.splitlines() if line.strip()), "")
        where = f"{source.name} · cell {code.index(cell_index) + 1}/{len(code)}"
        print(f"\n[{where}] {first[:90]}", file=sys.stderr, flush=True)

    class Echoing(NotebookClient):
        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "stream":
                stream = sys.stderr if msg["content"]["name"] == "stderr" else sys.stdout
                stream.write(msg["content"]["text"])
                stream.flush()
            return super().output(outs, msg, display_id, cell_index)

    return Echoing(
        nb, km=km, timeout=timeout, kernel_name="python3", coalesce_streams=True,
        resources={"metadata": {"path": str(source.parent)}}, on_cell_start=started,
        # No widget state: the HTML report then shows each widget's static copy (its text/html, e.g. the
        # FeatureBrowser's snapshot) instead of a view that needs the widget scripts from a CDN.
        store_widget_state=False,
    )  # fmt: skip


def write_dashboard(profile: Profile, paths: RunPaths, *, out=None, device: str = "auto") -> Path:
    """The run's static feature dashboard, and circuit-tracer's feature files beside its graph files (when the
    run has them), from the saved statistics (computed first if need be)."""
    from .buffer import DiscBuffer
    from .clt import CrossLayerTranscoder
    from .dashboard import export_dashboard
    from .features import feature_statistics
    from .interop import export_feature_files
    from .models import load_model

    clt = CrossLayerTranscoder.load(paths.clt, device=device)
    model = load_model(profile.harvest.model, device=device)
    buffer = DiscBuffer(paths.buffer, batch_size=1)  # read in blocks, not batches
    stats = feature_statistics(clt, buffer, model=model, save_dir=paths.clt / "feature_stats")
    index = export_dashboard(stats, clt, model, out or paths.dashboard)
    graphs = paths.attribution / "graph_files" / "graph-metadata.json"
    if graphs.exists() and clt.config.layer_offset == 0:
        for scan in {g["scan"] for g in json.loads(graphs.read_text())["graphs"]}:
            export_feature_files(stats, clt, model, graphs.parent, scan=scan)
    return index
