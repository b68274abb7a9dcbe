"""Which samples each training process draws, and in what order: the loaders of a fit.

Each epoch, every process takes its share ``order[rank::P]`` of the same seeded random order, cut
to a multiple of P first, so that all step alike (:class:`EpochSampler`); a sample's random draws
(crop margins, photometric augmentation) are seeded by its epoch and position alone
(:class:`SeededSamples`); validation takes samples ``r, r+P, ...`` on process r, no padding, no
repeats (:class:`ShardSampler`). Nothing here draws from the global torch generator or imports
Lightning. Shapes: n samples, P processes.
"""
from __future__ import annotations

import torch

from .data import DAD3DHeadsDataset, collate
from .errors import ParamsError
from .settings import DataSettings


def make_loaders(datasets: dict, d: DataSettings, seed: int) -> dict[str, torch.utils.data.DataLoader]:
    """Train (shuffled by an :class:`EpochSampler` seeded from the run's ``seed``, samples drawn
    through :class:`SeededSamples`) and val (in order, :class:`ShardSampler`) loaders of the data
    section's batch size and workers, each taking this process's share of the samples. Neither draws
    from the global torch generator. Each batch is made at once (:func:`dad3dlib.data.collate`)."""
    common = {"batch_size": d.batch_size, "num_workers": d.num_workers, "collate_fn": collate,
              "persistent_workers": d.num_workers > 0, "pin_memory": torch.cuda.is_available()}
    private = lambda: torch.Generator().manual_seed(seed)  # noqa: E731 (worker base seeds only)
    return {"train": torch.utils.data.DataLoader(SeededSamples(datasets["train"]), drop_last=True,
                                                 sampler=EpochSampler(len(datasets["train"]), seed),
                                                 generator=private(), **common),
            "val": torch.utils.data.DataLoader(datasets["val"], sampler=ShardSampler(len(datasets["val"])),
                                               generator=private(), **common)}


def check_shares(sizes: dict[str, int], world: int, batch_size: int) -> None:
    """Refuse splits too small for ``world`` processes: each process needs a full training batch
    (incomplete ones are dropped: it would train nothing) and a validation sample (one without would
    skip validation while the others wait for it in the reduction of the means). sizes: {"train":
    samples, "val": samples}."""
    if sizes["train"] // world < batch_size:
        raise ParamsError(f"params: {sizes['train']} training samples make no full batch of data.batch_size "
                          f"{batch_size} for each of {world} process(es)")
    if sizes["val"] < world:
        raise ParamsError(f"params: {sizes['val']} validation samples for {world} processes: each needs at least "
                          "one (use fewer processes)")


def process_rank(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, number of processes): the given values, else those of the default process group
    (several training processes), else (0, 1)."""
    if rank is None or world is None:
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if group else (0, 1)
    return rank, world


class ShardSampler(torch.utils.data.Sampler):
    """Samples ``rank, rank + world, ...`` of ``n``, in order: each sample on exactly one process,
    none repeated (shares differ by at most one). rank, world None: :func:`process_rank`'s."""

    def __init__(self, n: int, rank: int | None = None, world: int | None = None):
        self.n, self.rank, self.world = n, rank, world

    def __len__(self) -> int:
        rank, world = process_rank(self.rank, self.world)
        return len(range(rank, self.n, world))

    def __iter__(self):
        rank, world = process_rank(self.rank, self.world)
        return iter(range(rank, self.n, world))


class EpochSampler(torch.utils.data.Sampler):
    """A random order of ``n`` samples per epoch, from its own generator, with a seed per position
    for the sample's random draws: yields (index, seed). On several processes (rank, world; None:
    :func:`process_rank`'s) every process draws the same order, cuts it to a multiple of world and
    takes ``order[rank::world]``, so all have n // world items. ``skip`` items of this process's
    next epoch are left out (a run resumed within an epoch); ``epoch_start`` is the generator's
    state before the current epoch was drawn."""

    def __init__(self, n: int, seed: int, rank: int | None = None, world: int | None = None):
        self.n, self.skip, self.rank, self.world = n, 0, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start = self.generator.get_state()

    def __len__(self) -> int:
        return self.n // process_rank(self.rank, self.world)[1]

    def __iter__(self):
        rank, world = process_rank(self.rank, self.world)
        self.epoch_start = self.generator.get_state()
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, 2 ** 62, (self.n,), generator=self.generator).tolist()
        end = self.n - self.n % world
        skip, self.skip = self.skip, 0
        yield from list(zip(order[:end], seeds[:end]))[rank::world][skip:]


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[index]`` for an (index, seed) item, with the global torch generator seeded by
    ``seed`` for the call and restored after: a sample's random draws (crop margins, photometric
    augmentation) depend on its epoch and position only, not on the worker that drew it nor on
    what ran before (prefetching, dropout)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        with torch.random.fork_rng(devices=()):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]

    def __getitems__(self, items: list[tuple[int, int]]):
        """The items of a batch: made together when the data set (under any ``Subset``) is a
        :class:`dad3dlib.data.DAD3DHeadsDataset` (:meth:`~dad3dlib.data.DAD3DHeadsDataset.samples`),
        each sample's generator drawn from its own seed as :meth:`__getitem__` would; else one by one."""
        dataset, indices = self.dataset, [index for index, _ in items]
        while isinstance(dataset, torch.utils.data.Subset):
            dataset, indices = dataset.dataset, [dataset.indices[i] for i in indices]
        if not isinstance(dataset, DAD3DHeadsDataset):
            return [self[item] for item in items]
        with torch.random.fork_rng(devices=()):
            rngs = []
            for _, seed in items:
                torch.default_generator.manual_seed(seed)
                rngs.append(dataset.draw())
        return dataset.samples(indices, rngs)
