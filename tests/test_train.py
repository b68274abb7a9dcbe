"""Training: geometry helpers, a smoke run that lowers the loss, resume after a kill, gradient routing."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from conftest import random_3dmm, tiny_flame_assets
from dad3dlib.board import BOARD_DIR
from dad3dlib.config import run_params
from dad3dlib.settings import Settings
from dad3dlib.progress import read_progress
from dad3dlib.flame import FlameLayer, fit_weak_perspective, load_flame_assets, save_flame_assets
from dad3dlib.geometry import crop_to_image
from dad3dlib.model import load_model
from dad3dlib.report import read_metrics
from dad3dlib.lightning_module import DADModule
from dad3dlib.samplers import check_shares
from dad3dlib.train import train


S = 64


class RandomHeads(Dataset):
    """Samples with every batch key, made from random FLAME parameters of a given FLAME layer; the
    image is noise with the landmarks drawn in, so that there is something to learn."""

    def __init__(self, flame: FlameLayer, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        yaw = (torch.rand(n, generator=g) - 0.5) * 1.0
        c, s = torch.cos(yaw), torch.sin(yaw)
        z, o = torch.zeros(n), torch.ones(n)
        R = torch.stack([torch.stack([c, z, s], -1), torch.stack([z, -o, z], -1), torch.stack([s, z, -c], -1)], 1)
        params = random_3dmm(R, g, scale=5.0)
        self.params = params
        with torch.no_grad():
            verts = flame.reproject(params, S)
            lmk = flame.landmarks68(verts)[..., :2]
            model = flame.canonical(params) - torch.tensor([0, 0, 0.05])
        image = torch.randn(n, 3, S, S, generator=g) * 0.3
        cells = lmk.long().clamp(0, S - 1)
        for i in range(n):
            image[i, :, cells[i, :, 1], cells[i, :, 0]] = 2.0
        grid = torch.arange(S // 4) + 0.5
        d2 = (grid[None, None, :, None] - lmk[..., 1, None, None] / 4) ** 2 + \
             (grid[None, None, None, :] - lmk[..., 0, None, None] / 4) ** 2
        self.samples = {
            "image": image, "landmarks_2d": lmk, "visibility": ((lmk > 0) & (lmk < S)).all(-1).float(),
            "heatmaps": torch.exp(-d2 / (2 * (11 / 6) ** 2)), "vertices_crop": verts[..., :2],
            "vertices_model": model, "rotation": R,
            "view_ray": torch.tensor([0.0, 0.0, 1.0]).expand(n, 3), "crop_affine": torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(n, 2, 3),
            "bbox": torch.tensor([0.0, 0, S, S]).expand(n, 4), "landmarks_2d_image": lmk, "index": torch.arange(n)}

    def __len__(self) -> int:
        return len(self.samples["index"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.samples.items()}


def tiny_params(flame_path: Path, **trainer) -> dict:
    """The smoke preset's params on the random data (tiny FLAME, 64 px), one thread."""
    p = run_params("smoke", "baseline", seed=3)
    p["data"].update(root=None, crop_size=S, flame_path=str(flame_path))
    p["model"]["pose_prior_samples"] = 16
    p["trainer"].update(max_epochs=100, log_every_n_steps=1, progress_bar=False, num_threads=1, **trainer)
    return p


@pytest.fixture(scope="module")
def flame_dir(tmp_path_factory) -> Path:
    assets = tiny_flame_assets(n_vertices=60, n_faces=50)
    return save_flame_assets(assets.model, assets.topology, tmp_path_factory.mktemp("flame"))


@pytest.fixture(scope="module")
def datasets(flame_dir):
    flame = FlameLayer(load_flame_assets(flame_dir))
    return {"train": RandomHeads(flame, 32, seed=0), "val": RandomHeads(flame, 8, seed=1)}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def test_crop_to_image_inverts_the_crop_affine():
    A = torch.tensor([[[2.0, 0, -10], [0, 2.0, 5]]])
    pts = torch.tensor([[[3.0, 4.0], [10.0, -2.0]]])
    crop = pts @ A[:, :, :2].transpose(1, 2) + A[:, None, :, 2]
    torch.testing.assert_close(crop_to_image(crop, A), pts)


def test_fit_weak_perspective_recovers_scale_and_translation(datasets):
    data, gt = datasets["train"].samples, datasets["train"].params
    s, t = fit_weak_perspective(data["vertices_model"], data["rotation"], data["vertices_crop"], S)
    torch.testing.assert_close(s, gt[:, -1] + 1)          # scale stored as s - 1
    torch.testing.assert_close(t, gt[:, 409:411], atol=1e-5, rtol=0)


def test_params_defaults_and_unknown_keys():
    s = Settings.parse({"data": {"root": "x"}})
    assert s.trainer.precision == "auto" and s.model.encoder == "resnet50" and s.data.root == "x"
    assert s.to_dict()["model"]["hidden"] == 512 and Settings.parse(s.to_dict()) == s
    with pytest.raises(ValueError, match=r"^params: unknown trainer key\(s\) \['max_epoch'\]"):
        Settings.parse({"trainer": {"max_epoch": 3}})
    with pytest.raises(ValueError, match=r"^mine.yaml: unknown model key\(s\) \['filters'\]"):
        Settings.parse({"model": {"filters": 3}}, "mine.yaml")


# --------------------------------------------------------------------------------------------
# Gradient routing through the whole network
# --------------------------------------------------------------------------------------------
def test_no_gradient_reaches_landmark_head_without_2d_terms(flame_dir, datasets):
    params = tiny_params(flame_dir)
    params["loss"]["lambdas"] = {"l3d": 50.0, "l1": 0.0, "lproj": 0.05, "awing": 0.0}
    module = DADModule(Settings.parse(params))
    batch = {k: v[:4] for k, v in datasets["train"].samples.items()}
    module.training_step(batch, 0).backward()
    assert all(p.grad is None for p in module.model.landmark_head.parameters())
    assert module.model.pose_head[-1].weight.grad.abs().sum() > 0
    params["loss"]["lambdas"] = {"l3d": 50.0, "l1": 0.0, "lproj": 0.0, "awing": 0.0}
    module = DADModule(Settings.parse(params))
    module.training_step(batch, 0).backward()
    pose_grad = module.model.pose_head[-1].weight.grad
    assert pose_grad is None or pose_grad.abs().sum() == 0  # L_3D alone never moves the pose


# --------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------
def test_smoke_training_lowers_the_loss(tmp_path, flame_dir, datasets):
    best = train(tiny_params(flame_dir, max_steps=24, check_val_every_n_epoch=2), tmp_path, datasets)
    assert best.name == "best.ckpt" and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    log = read_metrics(tmp_path)
    loss = log["train/loss_step"].dropna().to_numpy()
    assert len(loss) == 24
    assert loss[-4:].mean() < 0.7 * loss[:4].mean()
    for term in ("l3d", "l1", "lproj", "awing"):
        assert log[f"train/{term}_step"].notna().sum() == 24
    assert log["val/nme"].notna().sum() >= 1 and log["val/angle_error"].notna().sum() >= 1
    model, params = load_model(best)
    assert params["model"]["encoder"] == "resnet18" and params["preset"] == "smoke"
    with torch.no_grad():
        out = model(datasets["val"].samples["image"][:2])
    assert out["params_3dmm"].shape == (2, 413) and out["heatmaps"].shape == (2, 68, S // 4, S // 4)
    ckpt = torch.load(best, weights_only=True)
    assert not any(k.startswith("flame.") for k in ckpt["state_dict"])  # FLAME is not saved
    # the same curves in TensorBoard, and the live progress record at its end
    scalars = board_scalars(tmp_path / BOARD_DIR)
    np.testing.assert_allclose(scalars["train/loss_step"], loss, rtol=1e-6)
    assert len(scalars["val/nme"]) == log["val/nme"].notna().sum()
    progress = read_progress(tmp_path)
    assert progress["step"] == progress["total"] == 24 and progress["loss"] == pytest.approx(loss[-1], rel=1e-6)


def board_scalars(log_dir: Path) -> dict[str, np.ndarray]:
    """Every scalar series of the TensorBoard event files in ``log_dir``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: np.array([e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)])
            for tag in acc.Tags()["scalars"]}


def test_onecycle_schedule_warms_up_then_decays_to_zero(tmp_path, flame_dir, datasets):
    params = tiny_params(flame_dir, max_steps=12)
    params["optim"].update(schedule="onecycle", lr=1e-3, warmup_fraction=0.25)
    train(params, tmp_path, datasets)
    lr = read_metrics(tmp_path)["lr-Adam"].dropna().to_numpy()
    assert len(lr) == 12
    peak = int(lr.argmax())
    assert 2 <= peak <= 4 and lr[peak] == pytest.approx(1e-3, rel=0.05)  # warm-up: 25 % of 12 steps
    assert lr[0] < 0.1 * lr[peak] and lr[-1] < 0.02 * lr[peak]
    assert np.all(np.diff(lr[peak:]) <= 0)


def test_unknown_schedule_is_refused(flame_dir):
    params = tiny_params(flame_dir)
    params["optim"]["schedule"] = "cosine_restarts"
    with pytest.raises(ValueError, match="optim.schedule must be one of onecycle, plateau, got 'cosine_restarts'"):
        Settings.parse(params)


def test_min_epochs_reach_the_trainer(tmp_path, flame_dir):
    """The reference's official configuration trains at least 100 epochs before early stopping may end it."""
    from dad3dlib.train import build_trainer

    settings = Settings.parse(tiny_params(flame_dir, min_epochs=4, early_stopping_patience=1))
    trainer, _ = build_trainer(settings.trainer, tmp_path)
    assert trainer.fit_loop.min_epochs == 4
    assert build_trainer(Settings.parse(tiny_params(flame_dir)).trainer, tmp_path)[0].fit_loop.min_epochs is None


class AugmentedHeads(RandomHeads):
    """RandomHeads with image noise drawn from the global torch generator in ``__getitem__``, as
    the real data set draws its crop margins and photometric augmentation."""

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ()).item()))
        return {**sample, "image": sample["image"] + 0.1 * torch.randn(sample["image"].shape, generator=g)}


def resume_params(flame_dir: Path, **trainer) -> dict:
    """8 steps of 4 per epoch, dropout on, a plateau schedule that steps after every validation."""
    params = tiny_params(flame_dir, max_steps=8, **trainer)
    params["optim"].update(plateau_patience=0, plateau_factor=0.5)
    return params


KILL_SCRIPT = """
import os, signal
import lightning as L
from dad3dlib.flame import FlameLayer, load_flame_assets
from dad3dlib.train import train
from test_train import AugmentedHeads, RandomHeads, resume_params

class Kill(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == {kill_at}:  # one step after the checkpoint to resume from
            os.kill(os.getpid(), signal.SIGKILL)

flame = FlameLayer(load_flame_assets({flame!r}))
data = {{"train": AugmentedHeads(flame, 32, seed=0), "val": RandomHeads(flame, 8, seed=1)}}
train(resume_params({flame!r}, checkpoint_every_n_steps={every}), {out!r}, data, callbacks=[Kill()])
"""


class StartStep(L.Callback):
    """Records the global step at which fit starts (after any checkpoint restore)."""

    start = None

    def on_train_start(self, trainer, module):
        self.start = trainer.global_step


class FinalState(L.Callback):
    """The weights, optimiser and schedule state at the end of training."""

    state = None

    def on_train_end(self, trainer, module):
        self.state = {"weights": {k: v.clone() for k, v in module.state_dict().items()},
                      "optimizer": trainer.optimizers[0].state_dict(),
                      "schedule": trainer.lr_scheduler_configs[0].scheduler.state_dict()}


@pytest.fixture(scope="module")
def augmented(flame_dir):
    flame = FlameLayer(load_flame_assets(flame_dir))
    return {"train": AugmentedHeads(flame, 32, seed=0), "val": RandomHeads(flame, 8, seed=1)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, flame_dir, augmented) -> dict:
    final = FinalState()
    train(resume_params(flame_dir), tmp_path_factory.mktemp("uninterrupted"), augmented, callbacks=[final])
    return final.state


def assert_same_state(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    differ = [k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
    assert not differ, f"{len(differ)} of {len(a['weights'])} tensors differ, e.g. {differ[:3]}"
    assert a["schedule"] == b["schedule"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize("kill_at, every, saved", [(5, None, 4),   # checkpoint at the end of epoch 1
                                                   (7, 2, 6)],     # checkpoint half-way through epoch 2
                         ids=["epoch_end", "mid_epoch"])
def test_killed_run_resumes_exactly(tmp_path, flame_dir, augmented, uninterrupted, kill_at, every, saved):
    """kill -9 one step after a checkpoint, resume in a fresh process: the same final weights,
    optimiser and schedule state as the uninterrupted run (RNG states, sampler order and position,
    plateau steps all restored)."""
    script = KILL_SCRIPT.format(flame=str(flame_dir), out=str(tmp_path), kill_at=kill_at, every=every)
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": path})
    assert proc.returncode == -9, proc.stderr[-2000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == saved
    start, final = StartStep(), FinalState()
    train(resume_params(flame_dir, checkpoint_every_n_steps=every), tmp_path, augmented, callbacks=[start, final])
    assert start.start == saved
    assert torch.load(last, weights_only=True)["global_step"] == 8
    steps = read_metrics(tmp_path)["train/loss_step"].dropna()
    assert len(steps) == 8  # steps before the kill from the killed run, the rest from the resumed one
    assert np.isfinite(steps.to_numpy()).all()
    assert_same_state(final.state, uninterrupted)


def test_unreadable_last_checkpoint_resumes_from_the_previous_good_one(tmp_path, flame_dir, datasets, capfd):
    train(tiny_params(flame_dir, max_steps=4), tmp_path, datasets)
    last, best = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "best.ckpt"
    with open(last, "r+b") as f:  # what a full disk left under the old save
        f.truncate(last.stat().st_size // 2)
    capfd.readouterr()
    start = StartStep()
    train(tiny_params(flame_dir, max_steps=8), tmp_path, datasets, callbacks=[start])
    err = capfd.readouterr().err
    assert f"{last}: unreadable checkpoint" in err and f"resuming from {best}" in err
    assert start.start == 4
    assert torch.load(last, weights_only=True)["global_step"] == 8


def test_full_disk_names_the_checkpoint_and_keeps_the_previous(tmp_path, flame_dir, datasets, monkeypatch):
    train(tiny_params(flame_dir, max_steps=4), tmp_path, datasets)
    ckpts = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"{re.escape(str(ckpts))}/(best|last)\.ckpt: No space left on device"):
        train(tiny_params(flame_dir, max_steps=8), tmp_path, datasets)
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # whole, and no temporary file left


def test_the_last_step_is_checkpointed_when_it_comes_after_the_last_validation(tmp_path, flame_dir, datasets):
    """4 steps an epoch, validation every 2nd epoch, 12 steps: the last validation is at step 8, and
    the one-cycle run is evaluated on step 12."""
    params = tiny_params(flame_dir, max_steps=12, check_val_every_n_epoch=2)
    params["optim"]["schedule"] = "onecycle"
    chosen = train(params, tmp_path, datasets)
    assert chosen.name == "last.ckpt"
    assert torch.load(chosen, weights_only=True)["global_step"] == 12
    assert json.loads((tmp_path / "training.json").read_text())["checkpoint"]["step"] == 12
    assert read_metrics(tmp_path)["val/nme"].notna().sum() == 1  # validated at step 8 only


def test_resuming_with_another_network_or_loss_is_refused(tmp_path, flame_dir, datasets):
    train(tiny_params(flame_dir, max_steps=2), tmp_path, datasets)
    other = tiny_params(flame_dir, max_steps=4)
    other["model"]["hidden"] = 32
    other["loss"]["lambdas"]["lproj"] = 0.5
    with pytest.raises(ValueError, match=r"model.hidden, loss.lambdas differ"):
        train(other, tmp_path, datasets)
    more = tiny_params(flame_dir, max_steps=4)  # more steps, other threads: still a resume
    more["trainer"]["num_threads"] = 2
    train(more, tmp_path, datasets)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4



def test_epoch_sampler_shares_one_order_among_processes():
    """Every process draws the same order, cut to a multiple of the process count, and takes
    every world-th item: equal shares, no sample twice, the remainder left out; a resumed
    process skips the part of its share it had done."""
    from dad3dlib.samplers import EpochSampler

    one = list(EpochSampler(25, seed=7))
    shares = [list(EpochSampler(25, seed=7, rank=r, world=2)) for r in (0, 1)]
    assert [len(s) for s in shares] == [12, 12] == [len(EpochSampler(25, 7, rank=r, world=2)) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(one[:24])
    assert not {i for i, _ in shares[0]} & {i for i, _ in shares[1]}
    resumed = EpochSampler(25, seed=7, rank=1, world=2)
    resumed.skip = 8
    assert list(resumed) == shares[1][8:]


def test_shard_sampler_gives_each_validation_sample_to_one_process():
    from dad3dlib.samplers import ShardSampler

    shares = [list(ShardSampler(7, rank=r, world=2)) for r in (0, 1)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5]] and [len(ShardSampler(7, r, 2)) for r in (0, 1)] == [4, 3]
    assert list(ShardSampler(7)) == list(range(7))  # one process: all, in order


def test_an_interactive_session_trains_a_ddp_run_in_a_child_process(tmp_path, flame_dir, datasets, monkeypatch):
    """Lightning cannot run a Jupyter kernel again to start the other processes: there, a ddp run
    trains through ``python -m dad3dlib train`` in a child, whose failure is raised with its last lines."""
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    params = tiny_params(flame_dir, accelerator="cpu", devices=2, strategy="ddp")
    with pytest.raises(ValueError, match="from the params alone"):
        train(params, tmp_path, datasets)
    params["data"]["root"] = str(tmp_path / "no_data")
    with pytest.raises(RuntimeError, match=r"(?s)python -m dad3dlib train --out .* exit status 2.*"
                                           r"error: .*no_data: data directory not found"):
        train(params, tmp_path / "run")


def test_splits_too_small_for_the_processes_are_refused():
    """Each process needs a full training batch (else it trains nothing) and a validation sample
    (else it skips validation while the others wait for it: a hang)."""
    check_shares({"train": 16, "val": 2}, world=2, batch_size=8)
    with pytest.raises(ValueError, match="15 training samples make no full batch of data.batch_size 8 for each of 2"):
        check_shares({"train": 15, "val": 2}, world=2, batch_size=8)
    with pytest.raises(ValueError, match="1 validation samples for 2 processes"):
        check_shares({"train": 16, "val": 1}, world=2, batch_size=8)
    with pytest.raises(ValueError, match="for each of 1 process"):
        check_shares({"train": 7, "val": 1}, world=1, batch_size=8)


def test_curves_hold_every_term_unweighted_and_the_fit_is_timed_by_part(tmp_path, flame_dir, datasets):
    """metrics.csv: train/<term> is the weighted contribution and train/raw/<term> the term itself
    (active terms, every step); val/raw/<term> holds every term, those weighted 0 included."""
    params = tiny_params(flame_dir, max_steps=6, check_val_every_n_epoch=1)
    params["loss"]["lambdas"] = {"l3d": 0.0, "l1": 100.0, "lproj": 0.05, "awing": 1.0}
    train(params, tmp_path, datasets)
    log = read_metrics(tmp_path)
    assert "train/l3d_step" not in log and "train/raw/l3d_step" not in log
    for term, lam in (("l1", 100.0), ("lproj", 0.05), ("awing", 1.0)):
        np.testing.assert_allclose(log[f"train/{term}_step"].dropna(), lam * log[f"train/raw/{term}_step"].dropna(),
                                   rtol=1e-5)
    for term in ("l3d", "l1", "lproj", "awing"):
        assert log[f"val/raw/{term}"].notna().sum() >= 1
    assert "val/l3d" not in log and log["val/raw/l3d"].dropna().gt(0).all()
    times = json.loads((tmp_path / "training.json").read_text())["fit_time_s"]
    assert set(times) == {"train_steps", "data", "validation", "fit"}
    assert 0 < times["train_steps"] < times["fit"] and times["validation"] > 0
    assert times["train_steps"] + times["data"] + times["validation"] <= times["fit"]
