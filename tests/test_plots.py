"""distillzoo plot: the curves drawn are exactly the runs' metrics.jsonl values."""

import json

import pytest

import distillzoo as dz
from distillzoo.cli import main
from distillzoo.compare.plots import plot_runs, read_curves


def fake_run(directory, losses, evals, cut_short=False):
    """A run directory whose metrics.jsonl holds these values (as the trainer writes them)."""
    directory.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": v, "lr": 1e-3, **({"eval/nll": evals[s]} if s in evals else {})})
             for s, v in losses]
    text = "\n".join(lines) + "\n" + ('{"step": 9, "loss": 0.' if cut_short else "")
    (directory / "metrics.jsonl").write_text(text)
    return directory


def test_plot_draws_each_run_s_logged_values_with_labelled_axes(tmp_path, capsys):
    a = fake_run(tmp_path / "a" / "fkl", [(1, 2.0), (2, 1.5), (3, float("nan")), (4, 1.0)], {2: 3.0, 4: 2.5})
    b = fake_run(tmp_path / "b" / "fkl", [(1, 2.2), (2, 1.9)], {2: 3.3}, cut_short=True)
    curves = read_curves([a, b])
    assert list(curves) == ["loss", "eval/nll"]  # loss and every eval/* key, by default
    assert curves["loss"] == {"a/fkl": [(1, 2.0), (2, 1.5), (4, 1.0)], "b/fkl": [(1, 2.2), (2, 1.9)]}  # NaN, torn out
    assert curves["eval/nll"] == {"a/fkl": [(2, 3.0), (4, 2.5)], "b/fkl": [(2, 3.3)]}

    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "eval/nll" in capsys.readouterr().out
    fig = plot_runs([a, b], tmp_path / "again.png")
    loss_ax, nll_ax = fig.axes
    assert (loss_ax.get_xlabel(), loss_ax.get_ylabel()) == ("training step", "training loss (per token or pair)")
    assert nll_ax.get_ylabel() == "held-out NLL (nats/token)"
    drawn = {line.get_label(): [tuple(map(float, xy)) for xy in line.get_xydata()] for line in nll_ax.get_lines()}
    assert drawn == curves["eval/nll"]
    assert [t.get_text() for t in nll_ax.get_legend().get_texts()] == ["a/fkl", "b/fkl"]
    colour = {(ax.get_title(), line.get_label()): line.get_color() for ax in fig.axes for line in ax.get_lines()}
    assert colour["loss", "a/fkl"] == colour["eval/nll", "a/fkl"] != colour["loss", "b/fkl"]  # a run keeps its colour


def test_plot_names_what_is_missing(tmp_path):
    with pytest.raises(dz.DataError, match=r"has no metrics.jsonl"):
        read_curves([tmp_path])
    run = fake_run(tmp_path / "r", [(1, 1.0)], {})
    with pytest.raises(dz.ParameterError, match=r"no run logged \['eval/exact'\]; logged: loss, lr"):
        read_curves([run], ["eval/exact"])
