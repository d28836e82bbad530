"""Built-in experiment trackers: what they write is read back and equals metrics.jsonl."""

import json
from pathlib import Path

import pytest

import distillzoo as dz
from distillzoo import train
from helpers import write_jsonl


def chat(n=8):
    return [{"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                         {"role": "assistant", "content": str(a + 1)}]} for a in range(n)]


def config(tmp_path, callbacks, **train_kw):
    data = write_jsonl(tmp_path / "train.jsonl", chat())
    return {"objectives": [{"name": "ce", "weight": 0.5}, {"name": "fkl", "weight": 0.5}],
            "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "seed": 0}},
            "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 1}},
            "data": {"streams": [{"name": "s", "path": str(data), "format": "chat", "repeat": 1}], "system": None,
                     "eval": {"name": "held", "path": str(data), "format": "chat"}},
            "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_every": 2, "progress": False,
                      **train_kw},
            "callbacks": callbacks, "output_dir": str(tmp_path / "run"), "resume": "auto"}


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def from_metrics(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r if k != "step"}
    return {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}


def assert_same(logged, expected):
    assert set(logged) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag  # each step once
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_tensorboard_logs_every_metrics_record_at_its_step(tmp_path):
    train(dz.load_config(config(tmp_path, [{"name": "tensorboard"}])))
    run = tmp_path / "run"
    expected = from_metrics(run)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "loss/ce", "loss/fkl", "eval/nll"} <= set(expected)
    assert_same(scalars(run / "tensorboard"), expected)


class StopAtStep3(dz.Callback):
    def on_log(self, step, record):
        if step == 3:
            raise RuntimeError("killed after step 3")


class Stopper:
    @dz.hookimpl
    def register_trainer_callbacks(self, register):
        register("stop-at-3", StopAtStep3)


def test_a_resumed_run_logs_each_step_once(tmp_path, register_plugin):
    register_plugin(Stopper(), "stopper")
    log_dir = tmp_path / "tb"
    with pytest.raises(RuntimeError, match="killed after step 3"):  # after checkpoint 2 and step 3's record
        train(dz.load_config(config(tmp_path, [{"name": "tensorboard", "log_dir": str(log_dir)},
                                               {"name": "stop-at-3"}], checkpoint_every=2)))
    assert [s for s, _ in scalars(log_dir)["loss"]] == [1, 2, 3]
    train(dz.load_config(config(tmp_path, [{"name": "tensorboard", "log_dir": str(log_dir)}], checkpoint_every=2)))
    assert_same(scalars(log_dir), from_metrics(tmp_path / "run"))  # step 3 of the killed run was purged


def test_a_resume_never_rerun_replaces_the_old_run_s_events(tmp_path):
    cfg = config(tmp_path, [{"name": "tensorboard"}])
    train(dz.load_config(cfg))
    run = tmp_path / "run"
    first = from_metrics(run)
    train(dz.load_config({**cfg, "resume": "never", "train": {**cfg["train"], "lr": 3e-3}}))
    second = from_metrics(run)
    assert [v for _, v in second["lr"]] != pytest.approx([v for _, v in first["lr"]])  # two different runs
    assert_same(scalars(run / "tensorboard"), second)  # steps 1 to 4 once each, the rerun's values
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file: the rerun's


def test_a_run_killed_before_its_first_checkpoint_and_started_over_logs_each_step_once(tmp_path, register_plugin):
    from torch.utils.tensorboard import SummaryWriter

    register_plugin(Stopper(), "stopper")
    log_dir = tmp_path / "tb"  # the user's own directory: what else is in it stays
    log_dir.mkdir()
    (log_dir / "notes.txt").write_text("mine\n")
    other = SummaryWriter(str(log_dir))  # another tool's event file beside the tracker's
    for step, value in ((1, 0.5), (2, 0.75)):
        other.add_scalar("other/accuracy", value, global_step=step)
    other.close()
    tracker = {"name": "tensorboard", "log_dir": str(log_dir)}
    with pytest.raises(RuntimeError, match="killed after step 3"):  # no checkpoint: the rerun starts over
        train(dz.load_config(config(tmp_path, [tracker, {"name": "stop-at-3"}])))
    assert [s for s, _ in scalars(log_dir)["loss"]] == [1, 2, 3]
    killed = from_metrics(tmp_path / "run")
    train(dz.load_config(config(tmp_path, [tracker])))
    logged, expected = scalars(log_dir), from_metrics(tmp_path / "run")
    assert [v for _, v in expected["tokens_per_s"][:3]] != pytest.approx([v for _, v in killed["tokens_per_s"]])
    assert logged.pop("other/accuracy") == [(1, 0.5), (2, 0.75)]
    assert_same(logged, expected)  # steps 1 to 4 once each, the second run's values (its own tokens/s)
    assert (log_dir / "notes.txt").read_text() == "mine\n"


def test_an_unknown_tracker_parameter_is_refused_before_any_model(tmp_path, no_models):
    with pytest.raises(dz.ConfigError, match=r"callbacks\[0\]: callback 'tensorboard' \(package 'distillzoo'\) does "
                                             r"not take these params"):
        train(dz.load_config(config(tmp_path, [{"name": "tensorboard", "logdir": "x"}])))


def mlflow_metrics(uri, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    keys = client.get_run(run_id).data.metrics
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in keys}


def test_mlflow_logs_every_metrics_record_at_its_step_and_the_config_as_params(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = config(tmp_path, [{"name": "mlflow", "experiment": "tests"}])
    cfg["objectives"].append({"name": "fkl", "weight": 0.25})  # a second fkl term: logged as loss/fkl#2
    train(dz.load_config(cfg))
    run = tmp_path / "run"
    recorded = json.loads((run / "mlflow_run.json").read_text())
    assert recorded["tracking_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"  # local, under output_dir
    expected = from_metrics(run)
    assert {"loss", "lr", "grad_norm", "loss/ce", "loss/fkl", "loss/fkl#2", "eval/nll"} <= set(expected)
    expected["loss/fkl_2"] = expected.pop("loss/fkl#2")  # '#' is not allowed in an MLflow metric name
    assert_same(mlflow_metrics(recorded["tracking_uri"], recorded["run_id"]), expected)
    got = MlflowClient(tracking_uri=recorded["tracking_uri"]).get_run(recorded["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert got.data.params["objectives.2.name"] == "fkl" and float(got.data.params["train.lr"]) == 1e-3
    assert got.data.params["student.tiny.hidden_size"] == "32"


def test_a_resumed_run_continues_in_one_mlflow_run_with_each_step_once(tmp_path, register_plugin):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    register_plugin(Stopper(), "stopper")
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    tracker = {"name": "mlflow", "tracking_uri": uri, "experiment": "resume"}
    with pytest.raises(RuntimeError, match="killed after step 3"):  # after checkpoint 2 and step 3's record
        train(dz.load_config(config(tmp_path, [tracker, {"name": "stop-at-3"}], checkpoint_every=2)))
    killed = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert [s for s, _ in mlflow_metrics(uri, killed)["loss"]] == [1, 2, 3]
    train(dz.load_config(config(tmp_path, [tracker], checkpoint_every=2)))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("resume").experiment_id
    active = client.search_runs([experiment], run_view_type=ViewType.ACTIVE_ONLY)
    assert len(active) == 1 and active[0].info.run_id != killed
    assert active[0].data.tags["distillzoo.resumed_from_run"] == killed
    assert client.get_run(killed).info.lifecycle_stage == "deleted"
    assert_same(mlflow_metrics(uri, active[0].info.run_id), from_metrics(tmp_path / "run"))  # step 3 once
