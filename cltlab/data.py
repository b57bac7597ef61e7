"""ActivationData: the LightningDataModule that feeds ``train``, one disjoint part of the DiscBuffer per rank.

A rank only learns its number once the Trainer has set up the process group, so the rank's ``DiscBuffer`` is
opened in ``setup`` (which Lightning runs in every process) rather than before ``fit``. The DiscBuffer already
splits its batches between ranks (``rank``/``world_size``: disjoint parts of equal count), so the Trainer must be
built with ``use_distributed_sampler=False`` (``make_trainer`` does) to keep Lightning from wrapping it again.

What every rank needs before ``fit`` — the shape of the activations and their normalization statistics — is read
from the whole buffer (``source``), so it is identical on all ranks.

Batches come in a seeded permutation per epoch, one endless stream of epochs (``EpochSampler``); the number of
batches consumed is saved in every checkpoint, so a resumed run reads exactly the batches the uninterrupted run
would have read next, and its losses are the same.

A stream (an ``IterableDataset`` such as ``ActivationClient(url).dataset(batch_size)``) is used as it is: every
rank opens its own stream, and the server hands each request the next batch of its shared cursor.

With ``DataConfig.live`` the batches are harvested as they are needed (``LiveActivations``): the model the
harvest folder's manifest names runs in this process, on the training device, over the corpus it names, and its
rows go through a shuffling pool — no folder of training tokens, so a run may train on more tokens than a disc
would hold.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch

from .buffer import DiscBuffer
from .config import DataConfig
from .sites import ActivationBatch, to_storage, torch_dtype
from .store import SITES


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices ``0..n-1`` in a fresh permutation per epoch (seeded by ``seed + epoch``), epoch after epoch without
    end, beginning ``start`` indices into that sequence."""

    def __init__(self, n: int, *, seed: int = 0, start: int = 0):
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self):
        epoch, position = divmod(self.start, self.n)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from order[position:].tolist()
            epoch, position = epoch + 1, 0


class ThreadedBatches:
    """A DiscBuffer's batches in ``sampler`` order, read by a pool of threads straight into reusable (pinned, when a
    GPU will take them) buffers in this process.

    DataLoader workers hand every batch over through shared memory and then copy it once more into pinned memory;
    here the positional reads (which release the GIL) land where the host-to-device copy reads, and nothing else
    touches the bytes. A yielded batch views its buffer, which is refilled only after ``reserve`` further batches
    have been yielded: consume a batch (copy it to the device, or convert it) before asking for ``reserve`` more.
    """

    def __init__(
        self,
        buffer: DiscBuffer,
        sampler,
        *,
        threads: int = 4,
        reserve: int = 3,
        pin_memory: bool = False,
    ):
        if threads < 1 or reserve < 1:
            raise ValueError(f"threads and reserve must be at least 1, not {threads} and {reserve}.")
        self.buffer, self.sampler = buffer, sampler
        self.threads, self.reserve, self.pin_memory = threads, reserve, pin_memory

    def __iter__(self):
        buffer = self.buffer.open()  # every shard opened before the threads share the handles
        rows = max(buffer.batch_rows(i) for i in range(len(buffer)))
        dtype = torch_dtype(buffer.dtype)
        shape = (rows, buffer.n_layers, buffer.d_model)
        slots = [
            tuple(torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory) for _ in SITES)
            for _ in range(self.threads + self.reserve)
        ]
        free = collections.deque(range(len(slots)))
        held: collections.deque[int] = collections.deque()
        pending: collections.deque = collections.deque()
        indices = iter(self.sampler)

        def submit(pool: ThreadPoolExecutor) -> None:
            index = next(indices, None)
            if index is None:
                return
            slot, n = free.popleft(), buffer.batch_rows(index)
            views = tuple(t[:n] for t in slots[slot])
            arrays = tuple(to_storage(v, buffer.dtype).numpy() for v in views)  # views of the slot's memory
            pending.append((pool.submit(buffer.read_batch_into, index, arrays), slot, views, index))

        with ThreadPoolExecutor(self.threads, thread_name_prefix="cltlab-read") as pool:
            for _ in range(self.threads):
                submit(pool)
            while pending:
                future, slot, views, index = pending.popleft()
                future.result()
                held.append(slot)
                if len(held) > self.reserve:  # the batch yielded `reserve` batches ago is done with
                    free.append(held.popleft())
                submit(pool)
                yield ActivationBatch(*views, index=index)


class LiveActivations(torch.utils.data.IterableDataset):
    """Training batches of ``batch_size`` rows taken from a ``LiveSource`` in this process (no server, no folder).

    ``n_layers``, ``d_model``, ``layer_start``, ``stats`` and ``origin`` describe the rows as a DiscBuffer's do, so
    ``train`` takes it; ``stats`` are the source's, from the rows that filled its shuffling pool (waited for here).
    Use with ``num_workers=0``: the source's harvester thread lives in this process. ``close()`` stops it.
    """

    def __init__(self, source, batch_size: int, *, timeout: float = 600.0):
        self.source, self.batch_size, self.timeout = source, batch_size, timeout
        source.check(batch_size)
        info = source.info
        self.n_layers, self.d_model, self.layer_start = info.n_layers, info.d_model, info.layer_start
        self.dtype, self.origin = info.dtype, info.origin
        self.stats = source.wait_ready(timeout)

    @classmethod
    def like(cls, folder: str | Path, config: DataConfig, *, seed: int = 0) -> LiveActivations:
        """Rows harvested live as the harvest ``folder`` was (its manifest's config: model, corpus, sequence
        length, layers, dtypes), the model on the GPU when there is one."""
        from .config import HarvestConfig
        from .models import load_model
        from .precision import model_dtype, resolve_device
        from .server.sources import LiveSource
        from .store import read_manifest

        harvest = HarvestConfig(**json.loads(read_manifest(Path(folder))["config"]))
        device = resolve_device("auto")
        model = load_model(harvest.model, dtype=model_dtype(harvest.model_dtype, device), device=device)
        source = LiveSource.from_config(
            model, harvest, shuffle_rows=config.shuffle_rows, capacity=4 * config.batch_size, seed=seed
        )
        try:
            return cls(source, config.batch_size)
        except BaseException:
            source.close()
            raise

    def __iter__(self) -> Iterator[ActivationBatch]:
        from .server.client import to_batch

        info = self.source.info._asdict()
        while True:
            wire = self.source.take(self.batch_size, timeout=self.timeout)
            yield to_batch(wire.data, wire.rows, wire.index, info)

    def close(self) -> None:
        self.source.close()


class ActivationData(L.LightningDataModule):
    """Training batches from a harvest folder (sharded by rank) or a stream.

    Attributes:
        source: the whole DiscBuffer (rank 0 of 1) or the stream: ``n_layers``, ``d_model``, ``layer_start`` and
            ``stats`` for building the CLT.
        dataset: this rank's batches, set by ``setup``.
    """

    def __init__(
        self, source: str | Path | torch.utils.data.IterableDataset, config: DataConfig, *, seed: int = 0
    ):
        super().__init__()
        self.streamed = isinstance(source, torch.utils.data.IterableDataset)
        self.batch_size, self.seed, self.num_workers = config.batch_size, seed, config.num_workers
        self.reader_threads = 0 if self.streamed else config.reader_threads
        self.source = source if self.streamed else DiscBuffer(source, batch_size=self.batch_size, seed=seed)
        self.dataset: DiscBuffer | torch.utils.data.IterableDataset | None = None
        self.consumed = 0  # batches this rank trained on before a resumed run

    def setup(self, stage: str) -> None:
        if self.streamed:
            self.dataset = self.source
        else:  # this rank's part: disjoint from every other rank's, with the same number of batches
            self.dataset = DiscBuffer(
                self.source.path,
                batch_size=self.batch_size,
                seed=self.seed,
                rank=self.trainer.global_rank,
                world_size=self.trainer.world_size,
            )

    def train_dataloader(self) -> torch.utils.data.DataLoader | ThreadedBatches:
        sampler = (
            None  # a stream comes in the server's order
            if self.streamed
            else EpochSampler(len(self.dataset), seed=self.seed, start=self.consumed)
        )
        if self.reader_threads:
            return ThreadedBatches(
                self.dataset, sampler, threads=self.reader_threads, pin_memory=torch.cuda.is_available()
            )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,  # the dataset's items are whole batches
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def state_dict(self) -> dict:
        """Saved in every checkpoint: how many batches this rank has trained on."""
        steps = self.trainer.global_step if self.trainer is not None else 0
        return {"consumed": steps * (self.trainer.accumulate_grad_batches if self.trainer else 1)}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])

    def teardown(self, stage: str) -> None:
        if isinstance(self.dataset, DiscBuffer):
            self.dataset.close()
