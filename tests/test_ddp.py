"""One run over two CPU processes (DDP, gloo) with the smoke preset: the data cache built once,
the pose prior fitted once and the same everywhere, each sample trained at most once and validated
exactly once per epoch, validation means equal to one process's, one set of outputs, resume under
torchrun, and the study (its notebook trains in a child process and evaluates once)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import dad3dlib
from dad3dlib.config import read_yaml, resolve, run_params, save_params
from dad3dlib.synthetic_data import make_data

SPLITS = {"train": 25, "val": 7, "test": 4}  # odd: shares of 12 (+1 left out) and of 4 and 3
DDP = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "num_threads": 1}
STEPS_PER_EPOCH = 3  # 25 // 2 = 12 samples per process, batches of 4

PROBE = '''
import json, sys, time
from pathlib import Path
import lightning as L
from dad3dlib import data
from dad3dlib.config import load_params
from dad3dlib.train import train

params_file, out, builds = sys.argv[1:]
write = data._write_cache

def counted_write(cache_dir, *args):  # and slow: a process starting meanwhile must wait, not build too
    with open(builds, "a") as f:
        f.write(f"{cache_dir}\\n")
    time.sleep(1.0)
    write(cache_dir, *args)

data._write_cache = counted_write


class Probe(L.Callback):
    """What each process saw: the pose head once set up, the step it started at, its samples."""

    def __init__(self):
        self.record = {"train": [], "val": []}

    def setup(self, trainer, module, stage):
        self.record["pose_bias"] = module.model.pose_head[-1].bias.tolist()

    def on_train_start(self, trainer, module):
        self.record.update(start=trainer.global_step, rank=trainer.global_rank, world=trainer.world_size)

    def on_train_batch_start(self, trainer, module, batch, i):
        self.record["train"] += batch["index"].tolist()

    def on_validation_batch_start(self, trainer, module, batch, i, dataloader_idx=0):
        self.record["val"] += batch["index"].tolist()

    def on_train_end(self, trainer, module):
        Path(out, f"probe_{trainer.global_rank}.json").write_text(json.dumps(self.record))


train(load_params(params_file), out, callbacks=[Probe()])
'''


def _run(cmd: list, env: dict, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _probes(out: Path) -> list[dict]:
    return [json.loads((out / f"probe_{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Train one epoch with Lightning's launcher (``python probe.py``: it runs the command again for
    rank 1), then resume for a second epoch under torchrun with a fresh data cache location (both
    processes open the data at once)."""
    tmp = tmp_path_factory.mktemp("ddp")
    make_data(tmp / "data", {**read_yaml(resolve("presets", "smoke"))["data"]["synthetic"], "splits": SPLITS}, workers=1)
    params = run_params("smoke", "baseline", 1, {"data": {"root": str(tmp / "data"), "batch_size": 4},
                                                 "trainer": {**DDP, "max_epochs": 1, "precision": "32-true"}})
    save_params(params, tmp / "one_epoch.yaml")
    params["trainer"]["max_epochs"] = 2
    save_params(params, tmp / "two_epochs.yaml")
    (tmp / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(dad3dlib.REPO_ROOT), "DAD3D_OUTPUTS": str(tmp / "outputs")}
    out = tmp / "run"
    first = _run([sys.executable, tmp / "probe.py", tmp / "one_epoch.yaml", out, tmp / "builds_first.txt"], env,
                 "training on two processes")
    first_probes = _probes(out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    training = json.loads((out / "training.json").read_text())
    second = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   tmp / "probe.py", tmp / "two_epochs.yaml", out, tmp / "builds_second.txt"],
                  {**env, "DAD3D_OUTPUTS": str(tmp / "outputs_second")}, "resuming under torchrun")
    return SimpleNamespace(tmp=tmp, out=out, params=params, first=first, first_probes=first_probes, files=files,
                           training=training, second=second, second_probes=_probes(out))


@pytest.mark.slow
def test_the_pose_prior_is_fitted_once_and_the_same_on_every_process(ddp):
    assert ddp.first.stdout.count("pose prior from data") == 1
    a, b = ddp.first_probes
    assert (a["rank"], b["rank"], a["world"], b["world"]) == (0, 1, 2, 2)
    assert a["pose_bias"] == b["pose_bias"]
    prior = json.loads(ddp.first.stdout.split("pose prior from data: ")[1].splitlines()[0].replace("'", '"'))
    assert a["pose_bias"][-1] == pytest.approx(prior["scale"] - 1) and a["pose_bias"][6:8] == pytest.approx(
        [prior["tx"], prior["ty"]])


@pytest.mark.slow
def test_each_sample_is_trained_at_most_once_and_validated_exactly_once_per_epoch(ddp):
    for probes in (ddp.first_probes, ddp.second_probes):
        train = [p["train"] for p in probes]
        assert [len(t) for t in train] == [12, 12]
        assert len(set(train[0] + train[1])) == 24 and set(train[0] + train[1]) <= set(range(SPLITS["train"]))
        assert sorted(probes[0]["val"] + probes[1]["val"]) == list(range(SPLITS["val"]))


@pytest.mark.slow
def test_validation_means_equal_one_process_validating_the_same_checkpoint(ddp, tmp_path):
    """The logged validation means (val/nme picks best.ckpt) of the two processes, whose shares
    of the 7 samples are unequal, equal one process validating last.ckpt in batches of another size."""
    from dad3dlib.data import DAD3DHeadsDataset
    from dad3dlib.flame import load_flame_assets
    from dad3dlib.synthetic_head import default_flame_dir
    from dad3dlib.report import read_metrics
    from dad3dlib.lightning_module import DADModule
    from dad3dlib.train import build_trainer

    from dad3dlib.settings import Settings

    settings = Settings.parse(run_params("smoke", "baseline", 1, {
        "data": {"root": str(ddp.tmp / "data")},
        "trainer": {"precision": "32-true", "accelerator": "cpu", "devices": 1, "num_threads": 2}}))
    flame = load_flame_assets(default_flame_dir())
    val = DAD3DHeadsDataset(ddp.tmp / "data", "val", settings.data.crop_size, flame, cache_dir=tmp_path / "cache")
    trainer, _ = build_trainer(settings.trainer, tmp_path)
    one = trainer.validate(DADModule(settings, flame), torch.utils.data.DataLoader(val, batch_size=7),
                           ckpt_path=ddp.out / "checkpoints" / "last.ckpt", verbose=False)[0]
    logged = read_metrics(ddp.out).filter(like="val/").dropna().iloc[-1]  # the last validation: of last.ckpt
    assert set(one) == set(logged.index) and "val/nme" in one
    assert {k: one[k] for k in one} == pytest.approx(logged.to_dict(), rel=1e-5)


@pytest.mark.slow
def test_one_process_writes_the_outputs(ddp):
    events = [f for f in ddp.files if f.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 1  # one TensorBoard writer
    assert [f for f in ddp.files if f not in events] == [
        "checkpoints/best.ckpt", "checkpoints/last.ckpt", "logs/version_0/hparams.yaml",
        "logs/version_0/metrics.csv", "params.yaml", "probe_0.json", "probe_1.json", "progress.json",
        "tensorboard/hparams.yaml", "training.json"]
    assert ddp.training["processes"] == 2 and ddp.training["checkpoint"]["step"] == STEPS_PER_EPOCH


@pytest.mark.slow
def test_a_run_resumes_under_torchrun_and_its_processes_build_the_data_cache_once(ddp):
    assert "pose prior from data" not in ddp.second.stdout  # resumed: the prior is in the checkpoint
    assert [p["start"] for p in ddp.second_probes] == [STEPS_PER_EPOCH] * 2
    assert torch.load(ddp.out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * STEPS_PER_EPOCH
    builds = (ddp.tmp / "builds_second.txt").read_text().splitlines()
    assert len(builds) == 2 and len(set(builds)) == 2  # train and val, each by one process


@pytest.mark.slow
def test_the_study_trains_a_multi_process_run_in_a_child_and_evaluates_it_once(ddp):
    """In the study, the notebook (a Jupyter kernel, which Lightning cannot run again) trains the
    run with ``python -m dad3dlib train`` in a child process, then evaluates once: one metrics.json."""
    preset = yaml.safe_load((dad3dlib.REPO_ROOT / "params" / "presets" / "smoke.yaml").read_text())
    preset.update(name="smoke_ddp")
    preset["data"]["synthetic"] = None
    preset["trainer"].update(DDP)
    (ddp.tmp / "smoke_ddp.yaml").write_text(yaml.safe_dump(preset))
    out = ddp.tmp / "study"
    env = {**os.environ, "PYTHONPATH": str(dad3dlib.REPO_ROOT), "DAD3D_OUTPUTS": str(ddp.tmp / "outputs")}
    _run([sys.executable, "-m", "dad3dlib", "study", "--preset", ddp.tmp / "smoke_ddp.yaml", "--out", out,
          "--ablations", "baseline", "--data", ddp.tmp / "data"], env, "the study")
    assert [p.relative_to(out) for p in out.glob("runs/**/metrics.json")] == [Path("runs/baseline_s1/metrics.json")]
    metrics = json.loads((out / "runs" / "baseline_s1" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["n_samples"] == SPLITS["test"]
    notebook = (out / "runs" / "baseline_s1" / "ablation.ipynb").read_text()
    assert notebook.count("pose prior from data") == 1 and notebook.count("GLOBAL_RANK: 1") == 1
    assert (out / "report.html").is_file()
