"""Run folders, and the main job executing notebooks into a report."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

import cltlab
from cltlab.replacement import ReplacementMetrics
from cltlab.run import MAIN_JOB, find_notebooks, run_notebooks, run_paths


@pytest.fixture(autouse=True)
def _no_run_environment(monkeypatch):
    """`make test` sets CLTLAB_PROFILE / CLTLAB_RUN_DIR for the notebooks; these tests start without them."""
    monkeypatch.delenv("CLTLAB_PROFILE", raising=False)
    monkeypatch.delenv("CLTLAB_RUN_DIR", raising=False)


def test_run_paths_precedence(monkeypatch, tmp_path):
    assert run_paths("ci").root == (Path("runs") / "ci").resolve()
    monkeypatch.setenv("CLTLAB_RUN_DIR", str(tmp_path / "from_env"))
    assert run_paths("ci").root == tmp_path / "from_env"
    assert run_paths("ci", tmp_path / "explicit").root == tmp_path / "explicit"


def test_run_paths_layout(tmp_path):
    paths = run_paths("ci", tmp_path)
    assert paths.buffer == tmp_path / "activations"
    assert paths.clt == tmp_path / "clt"
    assert paths.circuit_tracer == tmp_path / "circuit_tracer"
    assert paths.metrics == tmp_path / "metrics.json"
    assert paths.report == tmp_path / "report"
    assert paths.attribution == tmp_path / "attribution"


def test_save_metrics_writes_json(tmp_path):
    metrics = ReplacementMetrics(3.0, 3.5, 5.0, 0.75, 0.1, 0.9, [0.2, 0.4], [3.0, 5.0], 100)
    path = run_paths("ci", tmp_path / "run").save_metrics(metrics)
    assert path == tmp_path / "run" / "metrics.json"
    data = json.loads(path.read_text())
    assert data["ce_recovered"] == 0.75 and data["nmse"] == [0.2, 0.4] and data["mean_l0"] == 4.0


def test_save_attribution_writes_the_graph_and_its_scores(tmp_path, tiny_gpt2):
    from helpers import make_clt

    from cltlab import AttributionGraph, attribute

    clt = make_clt(tiny_gpt2.n_layers, tiny_gpt2.d_model, 16, threshold_init=0.5)
    graph = attribute(tiny_gpt2, clt, "It was the best of times", progress=False)
    paths = run_paths("ci", tmp_path / "run")
    scores = paths.save_attribution(graph, node_threshold=0.7)
    assert torch.equal(AttributionGraph.load(paths.attribution).adjacency, graph.adjacency)
    assert paths.load_attribution_scores() == scores
    assert (scores.replacement, scores.completeness) == tuple(graph.scores())
    pruned = graph.prune(0.7, 0.98)
    assert scores.pruned_nodes == int(pruned.node_mask.sum()) < scores.n_nodes == graph.n_nodes
    assert scores.pruned_edges == int(pruned.edge_mask.sum()) and scores.node_threshold == 0.7
    saved = json.loads((tmp_path / "run" / "attribution" / "scores.json").read_text())
    assert saved["n_features"] == graph.n_features and saved["prompt"] == "It was the best of times"
    assert f"replacement score {scores.replacement:.3f}" in scores.summary()


def test_main_job_notebooks_exist():
    assert find_notebooks() == Path(__file__).resolve().parents[1] / "notebooks"  # in a checkout
    assert all((find_notebooks() / name).exists() for name in MAIN_JOB)


def test_notebook_takes_profile_and_run_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLTLAB_PROFILE", "ci")
    monkeypatch.setenv("CLTLAB_RUN_DIR", str(tmp_path / "run"))
    profile, paths = cltlab.notebook()
    assert profile == cltlab.config.get_profile("ci") and paths.root == tmp_path / "run"


def test_notebook_defaults_to_the_checkouts_runs_folder(monkeypatch, tmp_path):
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # a kernel's working directory is the notebook's folder
    setup = cltlab.notebook()
    assert setup.profile.name == "default" and setup.paths.root == tmp_path / "runs" / "default"
    assert cltlab.notebook("ci", runs=tmp_path / "elsewhere").paths.root == tmp_path / "elsewhere" / "ci"


def write_notebook(folder: Path, name: str, *sources: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=[new_code_cell(s) for s in sources]), folder / name)


def test_run_notebooks_executes_into_the_report(tmp_path):
    write_notebook(
        tmp_path / "nbs",
        "a.ipynb",
        "import os\nprint(os.environ['CLTLAB_PROFILE'], os.environ['CLTLAB_RUN_DIR'])",
    )
    environ = dict(os.environ)
    paths = run_notebooks("ci", tmp_path / "run", notebooks=("a.ipynb",), notebooks_dir=tmp_path / "nbs")
    assert dict(os.environ) == environ  # the kernel's environment only
    assert paths.root == tmp_path / "run"
    executed = nbformat.read(paths.report / "a.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == f"ci {tmp_path / 'run'}\n"
    assert (paths.report / "a.html").read_text().lstrip().lower().startswith("<!doctype html>")


def test_run_notebooks_passes_the_device_to_the_kernels(tmp_path):
    write_notebook(
        tmp_path / "nbs",
        "a.ipynb",
        "import os, cltlab.precision\nprint(os.environ['CLTLAB_DEVICE'], cltlab.precision.resolve_device())",
    )
    paths = run_notebooks(
        "ci", tmp_path / "run", notebooks=("a.ipynb",), notebooks_dir=tmp_path / "nbs", device="cpu"
    )
    executed = nbformat.read(paths.report / "a.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "cpu cpu\n"


def test_the_report_shows_a_widgets_static_copy(tmp_path):
    code = (
        "import ipywidgets\n"
        "class Shown(ipywidgets.HTML):\n"
        "    def _repr_mimebundle_(self, **kwargs):\n"
        "        return {**super()._repr_mimebundle_(**kwargs), 'text/html': '<b>static copy</b>'}\n"
        "Shown('live')"
    )
    write_notebook(tmp_path / "nbs", "w.ipynb", code)
    paths = run_notebooks("ci", tmp_path / "run", notebooks=("w.ipynb",), notebooks_dir=tmp_path / "nbs")
    executed = nbformat.read(paths.report / "w.ipynb", as_version=4)
    assert "widgets" not in executed.metadata  # no state: the exporter falls back to the copy
    assert "<b>static copy</b>" in (paths.report / "w.html").read_text()


def test_failing_notebook_still_lands_in_the_report(tmp_path):
    from nbclient.exceptions import CellExecutionError

    write_notebook(tmp_path / "nbs", "bad.ipynb", "raise RuntimeError('boom')")
    with pytest.raises(CellExecutionError, match="boom"):
        run_notebooks("ci", tmp_path / "run", notebooks=("bad.ipynb",), notebooks_dir=tmp_path / "nbs")
    executed = nbformat.read(tmp_path / "run" / "report" / "bad.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["ename"] == "RuntimeError"


def test_missing_notebook_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Notebook .*nope\.ipynb not found; pass notebooks_dir="):
        run_notebooks("ci", tmp_path / "run", notebooks=("nope.ipynb",), notebooks_dir=tmp_path)


def test_saved_metrics_load_back_as_the_same_metrics(tmp_path):
    metrics = ReplacementMetrics(3.0, 3.5, 5.0, 0.75, 0.1, 0.9, [0.2, 0.4], [3.0, 5.0], 100)
    paths = run_paths("ci", tmp_path)
    paths.save_metrics(metrics)
    assert paths.load_metrics() == metrics
    assert "CE recovered 0.7500" in paths.load_metrics().summary()


def test_run_notebooks_shows_each_cell_and_its_progress_bars_and_uses_no_tcp(tmp_path, capfd, caplog):
    write_notebook(
        tmp_path / "nbs",
        "bars.ipynb",
        "import cltlab\nfrom cltlab.features import tqdm",
        "for _ in tqdm(range(50), desc='counting'):\n    pass",
    )
    run_notebooks("ci", tmp_path / "run", notebooks=("bars.ipynb",), notebooks_dir=tmp_path / "nbs")
    gc.collect()  # a kernel client left running warns when it is collected
    assert not [r for r in caplog.records if "Could not destroy zmq context" in r.getMessage()]
    err = capfd.readouterr().err
    assert "[bars.ipynb · cell 1/2] import cltlab" in err
    assert "[bars.ipynb · cell 2/2] for _ in tqdm(range(50), desc='counting'):" in err
    assert "counting: 100%" in err and "50/50" in err  # a text bar, passed on as the kernel drew it
    assert "without encryption" not in err  # the kernel talks over Unix sockets, not TCP
    executed = nbformat.read(tmp_path / "run" / "report" / "bars.ipynb", as_version=4)
    assert "50/50" in executed.cells[1].outputs[0]["text"]  # and the report keeps it
