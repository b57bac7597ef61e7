"""Plotly figures: the data they show is the data they were given."""

from __future__ import annotations

import pytest
import torch

from cltlab import DiscBuffer, plots
from cltlab.features import LayerStatistics
from cltlab.replacement import ReplacementMetrics


def write_version(log_dir, n, text):
    (log_dir / f"version_{n}").mkdir(parents=True)
    (log_dir / f"version_{n}" / "metrics.csv").write_text(text)


def test_read_metrics_skips_empty_cells(tmp_path):
    write_version(tmp_path, 0, "epoch,loss,nmse,step\n0,2.5,,0\n0,,0.5,0\n0,1.5,0.25,1\n")
    assert plots.read_metrics(tmp_path) == {"loss": [(0, 2.5), (1, 1.5)], "nmse": [(0, 0.5), (1, 0.25)]}


def test_read_metrics_joins_versions_from_their_first_step(tmp_path):
    write_version(tmp_path, 0, "loss,step\n4.0,0\n3.0,1\n2.0,2\n")
    write_version(tmp_path, 1, "loss,step\n2.5,2\n1.0,3\n")  # resumed from step 2
    assert plots.read_metrics(tmp_path)["loss"] == [(0, 4.0), (1, 3.0), (2, 2.5), (3, 1.0)]
    write_version(tmp_path, 10, "loss,step\n9.0,0\n")  # a fresh run replaces the curve (10 sorts after 1)
    assert plots.read_metrics(tmp_path)["loss"] == [(0, 9.0)]


def test_read_metrics_without_logs_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="has this run been trained"):
        plots.read_metrics(tmp_path)


def test_training_curves_plot_each_metric(tmp_path):
    write_version(tmp_path, 0, "loss,l0,step\n3.0,10,0\n2.0,8,5\n")
    fig = plots.training_curves(tmp_path, metrics=("loss", "l0", "nmse"))
    assert [t.name for t in fig.data] == ["loss", "l0", "nmse"]
    assert list(fig.data[0].x) == [0, 5] and list(fig.data[0].y) == [3.0, 2.0]
    assert list(fig.data[2].x) == []  # a metric that was never logged is an empty panel


def test_layer_metrics_use_model_layer_numbers():
    metrics = ReplacementMetrics(3.0, 3.5, 5.0, 0.75, 0.1, 0.9, [0.2, 0.4], [3.0, 5.0], 100)
    fig = plots.layer_metrics(metrics, layer_offset=2)
    assert list(fig.data[0].x) == [2, 3] and list(fig.data[0].y) == [0.2, 0.4]
    assert list(fig.data[1].y) == [3.0, 5.0]


def test_activation_scales_show_the_buffer_stats(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=100)
    fig = plots.activation_scales(buffer)
    assert list(fig.data[0].x) == [0, 1, 2, 3]
    assert list(fig.data[0].y) == buffer.stats.input_scale.flatten().tolist()
    assert list(fig.data[1].y) == buffer.stats.output_scale.flatten().tolist()


def test_feature_frequencies_histogram_of_live_features():
    frequency = torch.tensor([0.0, 0.1, 0.01, 0.0])
    stats = LayerStatistics(1, frequency, frequency, frequency, torch.zeros(4, 1), torch.zeros(4, 1), 100)
    fig = plots.feature_frequencies(stats)
    assert list(fig.data[0].x) == torch.tensor([0.1, 0.01]).log10().tolist()
    assert "2 live features, 50.0% dead" in fig.layout.title.text


def test_training_curves_draw_the_held_out_figures_where_the_run_validated(tmp_path):
    write_version(
        tmp_path,
        0,
        "loss,nmse,val/nmse,val/kl,val/top1,step\n3.0,0.9,,,,0\n2.0,0.5,,,,5\n,,0.7,2.5,0.3,5\n,,0.6,2.0,0.4,10\n",
    )
    fig = plots.training_curves(tmp_path, metrics=("loss", "nmse"))
    assert [t.name for t in fig.data] == ["loss", "nmse", "val/nmse", "val/kl", "val/top1"]
    assert list(fig.data[2].x) == [5, 10] and list(fig.data[2].y) == [0.7, 0.6]  # over the training NMSE
    assert list(fig.data[3].y) == [2.5, 2.0] and list(fig.data[4].y) == [0.3, 0.4]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["loss", "nmse", "held-out kl", "held-out top1"]  # no CE recovered was logged
