"""ActivationData: the LightningDataModule that feeds ``train``, one disjoint part of the DiscBuffer per rank.

A rank only learns its number once the Trainer has set up the process group, so the rank's ``DiscBuffer`` is
opened in ``setup`` (which Lightning runs in every process) rather than before ``fit``. The DiscBuffer already
splits its batches between ranks (``rank``/``world_size``: disjoint parts of equal count), so the Trainer must be
built with ``use_distributed_sampler=False`` (``make_trainer`` does) to keep Lightning from wrapping it again.

What every rank needs before ``fit`` — the shape of the activations and their normalization statistics — is read
from the whole buffer (``source``), so it is identical on all ranks.

A stream (an ``IterableDataset`` such as ``ActivationClient(url).dataset(batch_size)``) is used as it is: every
rank opens its own stream, and the server hands each request the next batch of its shared cursor.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from .buffer import DiscBuffer


class ActivationData(L.LightningDataModule):
    """Training batches from a harvest folder (sharded by rank) or a stream.

    Attributes:
        source: the whole DiscBuffer (rank 0 of 1) or the stream: ``n_layers``, ``d_model``, ``layer_start`` and
            ``stats`` for building the CLT.
        dataset: this rank's batches, set by ``setup``.
    """

    def __init__(
        self,
        source: str | Path | torch.utils.data.IterableDataset,
        *,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.streamed = isinstance(source, torch.utils.data.IterableDataset)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.source = source if self.streamed else DiscBuffer(source, batch_size=batch_size, seed=seed)
        self.dataset: DiscBuffer | torch.utils.data.IterableDataset | None = None

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

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,  # the dataset's items are whole batches
            shuffle=not self.streamed,  # a stream comes in the server's order
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def teardown(self, stage: str) -> None:
        if isinstance(self.dataset, DiscBuffer):
            self.dataset.close()
