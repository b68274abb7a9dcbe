"""TensorBoard records: a run's params and final metrics as an HParams session."""
from __future__ import annotations

from dad3dlib.board import HPARAM_METRIC_PREFIX, flat_hparams, record_hparams
from dad3dlib.config import run_params


def test_flat_hparams_keeps_every_leaf_as_a_tensorboard_value():
    flat = flat_hparams({"loss": {"lambdas": {"l3d": 50.0}}, "model": {"pretrained_path": None}, "seed": 2,
                         "trainer": {"devices": [0, 1]}})
    assert flat == {"loss.lambdas.l3d": 50.0, "model.pretrained_path": "None", "seed": 2, "trainer.devices": "[0, 1]"}


def test_run_params_and_metrics_are_one_hparams_session(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    params = run_params("smoke", "no_l3d", seed=2)
    record_hparams(tmp_path, params, {"nme_reprojection": 4.5, "angle_error_deg": 9.25, "split": "test"})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    experiment = next(d.experiment for d in data.values() if d.HasField("experiment"))
    session = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
    assert {m.name.tag for m in experiment.metric_infos} == {f"{HPARAM_METRIC_PREFIX}nme_reprojection",
                                                              f"{HPARAM_METRIC_PREFIX}angle_error_deg"}
    assert session.hparams["loss.lambdas.l3d"].number_value == 0.0
    assert session.hparams["seed"].number_value == 2 and session.hparams["ablation"].string_value == "no_l3d"
    assert acc.Scalars(f"{HPARAM_METRIC_PREFIX}angle_error_deg")[0].value == 9.25


def test_eval_scalars_are_at_the_final_training_step(tmp_path):
    """Beside the end of the training curves (TensorBoard draws a lone point at step 0 as an empty
    chart), also when the run is evaluated again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tensorboard")) as w:  # what training logged
        for step in (0, 10, 837):
            w.add_scalar("train/loss_step", 1.0, global_step=step)
    params = run_params("smoke")
    for value in (9.25, 9.5):
        record_hparams(tmp_path, params, {"angle_error_deg": value})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars(f"{HPARAM_METRIC_PREFIX}angle_error_deg")] == [(837, 9.25),
                                                                                                  (837, 9.5)]
