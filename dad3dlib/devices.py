"""Where a run trains: its processes (``trainer.devices``, ``num_nodes``), its params placed on a
device with a number of CPU threads (:func:`on_device`), and one device per concurrent run of a study
(:func:`devices_for`)."""
from __future__ import annotations

from .settings import TrainerSettings


def processes(trainer: TrainerSettings) -> tuple[int, int]:
    """(processes per machine, machines) of a run's trainer section: ``devices`` (a count or a
    list; "auto" counts 1) and ``num_nodes``."""
    devices = trainer.devices
    local = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) and devices > 1 else 1
    return local, int(trainer.num_nodes)


def on_device(params: dict, device: str = "auto", num_threads: int | None = None) -> dict:
    """A copy of params whose trainer runs on ``device`` ("auto", "cpu", "cuda", "cuda:<i>") with
    ``num_threads`` CPU threads. A run over several processes (``trainer.devices`` > 1 or
    ``trainer.num_nodes`` > 1, e.g. strategy ddp) keeps its devices, takes only the kind of device
    ("cpu" or a GPU) from ``device``, and shares ``num_threads`` out among its processes."""
    trainer = dict(params.get("trainer") or {})
    local, nodes = processes(TrainerSettings.parse(trainer))
    several = local * nodes > 1
    if device == "cpu":
        trainer.update(accelerator="cpu", **({} if several else {"devices": 1}))
    elif device.startswith("cuda"):
        trainer.update(accelerator="gpu", **({} if several else
                                             {"devices": [int(device.split(":")[1])] if ":" in device else 1}))
    if num_threads:
        trainer["num_threads"] = max(1, int(num_threads) // local)  # per process, on each machine
    return {**params, "trainer": trainer}


def devices_for(jobs: int) -> list[str]:
    """One device string per concurrent job: a GPU each when there are GPUs, else the CPU."""
    import torch

    n = torch.cuda.device_count()  # 0 without CUDA or with a broken driver (torch warns), never raises
    return [f"cuda:{i % n}" for i in range(jobs)] if n else ["cpu"] * jobs
