"""Small configuration dataclasses and the named profiles built from them.

A profile is data: which model and corpus, how many tokens, how big a CLT, how long to train. The notebooks pick
one from the ``CLTLAB_PROFILE`` environment variable (``ci`` for CI's tiny run, ``default`` for the embedded
SmolLM2-135M) so the same notebook runs in a minute on a laptop-sized toy or for real.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .activations import ACTIVATIONS


@dataclass
class HarvestConfig:
    """What to harvest and how much."""

    model: str = "smollm2-135m"
    """Model registry name (``smollm2-135m``, ``tiny-gpt2``) or any Hugging Face id."""
    corpus: str = "shakespeare"
    """Corpus registry name, ``hf:<dataset id>`` for streaming, or a path to a text file / folder of ``.txt``."""
    n_tokens: int = 60_000
    """Number of activation rows (tokens) to store; BOS positions are not stored."""
    seq_len: int = 128
    """Tokens per sequence, BOS included."""
    batch_size: int = 16
    """Sequences per forward pass."""
    layers: tuple[int, int] | None = None
    """Half-open range ``(start, stop)`` of layers to harvest; ``None`` means every layer."""
    dtype: str = "float16"
    """Storage dtype of the activations: ``float16`` or ``bfloat16``."""
    model_dtype: str = "float32"
    """Dtype the language model runs in while harvesting."""
    shard_tokens: int | None = None
    """Rows per HDF5 shard (rounded down to whole forward batches); None: about 2 GiB per shard."""
    split: str = "train"
    """Corpus split: ``train`` or ``eval`` (every tenth document is held out for evaluation)."""

    def __post_init__(self) -> None:
        if self.n_tokens <= 0 or self.seq_len < 2 or self.batch_size <= 0:
            raise ValueError("n_tokens and batch_size must be positive and seq_len at least 2.")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, not {self.dtype!r}.")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if len(self.layers) != 2 or not 0 <= self.layers[0] < self.layers[1]:
                raise ValueError(
                    f"layers must be a range (start, stop) with 0 <= start < stop, not {self.layers}."
                )


@dataclass
class CLTConfig:
    """Shape and activation function of a cross-layer transcoder."""

    n_layers: int
    """Number of transformer layers the transcoder covers."""
    d_model: int
    """Width of the residual stream."""
    d_features: int
    """Features per layer."""
    cross_layer: bool = True
    """True: a feature at layer l decodes to every layer >= l (a CLT). False: only to its own layer (a per-layer
    transcoder, the baseline)."""
    threshold_init: float = 0.1
    """Initial JumpReLU threshold, in units of the normalized pre-activation."""
    bandwidth: float = 0.1
    """Width of the rectangle kernel behind the threshold's pseudo-gradient."""
    layer_offset: int = 0
    """Index in the model of the first covered layer."""
    activation_kind: str = "jumprelu"
    """Which activation function ``clt.activation`` is: ``jumprelu`` (learned thresholds), ``topk`` (the k largest
    per token and layer) or ``batchtopk`` (the k · batch largest per layer over the batch)."""
    k: int = 32
    """Active features per token and layer for ``topk`` and ``batchtopk`` (unused by ``jumprelu``)."""

    def __post_init__(self) -> None:
        if min(self.n_layers, self.d_model, self.d_features) <= 0:
            raise ValueError("n_layers, d_model and d_features must be positive.")
        if self.bandwidth <= 0 or self.threshold_init <= 0:
            raise ValueError("bandwidth and threshold_init must be positive.")
        if self.activation_kind not in ACTIVATIONS:
            raise ValueError(
                f"activation_kind must be one of {', '.join(ACTIVATIONS)}, not {self.activation_kind!r}."
            )
        if self.activation_kind != "jumprelu" and not 0 < self.k <= self.d_features:
            raise ValueError(f"k must be between 1 and d_features={self.d_features}, not {self.k}.")

    @classmethod
    def from_dict(cls, fields: dict) -> CLTConfig:
        """The config saved as ``fields``; CLTs saved before the field was renamed call it ``activation``."""
        fields = dict(fields)
        if "activation" in fields:
            fields["activation_kind"] = fields.pop("activation")
        return cls(**fields)


@dataclass
class TrainConfig:
    """Optimisation of a CLT on harvested activations."""

    d_features: int = 512
    """Features per layer of the CLT to train."""
    cross_layer: bool = True
    """Train a CLT (True) or the per-layer transcoder baseline (False)."""
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 1024
    """Tokens per step (per rank when training on several devices)."""
    lr: float = 2e-4
    """Peak Adam learning rate."""
    lr_warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from 0."""
    lr_decay: float = 0.2
    """Final fraction of training over which the learning rate decays linearly to 0."""
    sparsity_coef: float = 2e-4
    """λ of the tanh sparsity penalty Σ tanh(c·‖W_dec,i‖·f_i), reached after the warm-up."""
    sparsity_c: float = 4.0
    """c of the tanh sparsity penalty."""
    sparsity_warmup: float = 0.8
    """Fraction of training over which λ ramps linearly from 0."""
    preact_coef: float = 3e-6
    """Coefficient of the pre-activation loss Σ relu(θ - h) that revives dead features."""
    threshold_init: float = 0.1
    """Initial JumpReLU threshold."""
    bandwidth: float = 0.1
    """JumpReLU rectangle-kernel bandwidth."""
    activation_kind: str = "jumprelu"
    """``jumprelu``, ``topk`` or ``batchtopk`` (see ``CLTConfig.activation_kind``)."""
    k: int = 32
    """Active features per token and layer for ``topk`` / ``batchtopk``."""
    decoding: str = "auto"
    """``dense``, ``sparse`` (gather the active features' decoder rows) or ``auto`` (sparse when few fire)."""
    precision: str = "32-true"
    """Lightning precision: ``32-true``, ``bf16-mixed``, ``16-mixed``."""
    compile: bool = False
    """Wrap the CLT's encoder and loss in ``torch.compile``."""
    accelerator: str = "auto"
    """Lightning accelerator: ``auto`` picks a GPU when there is one."""
    devices: int | str = 1
    """Lightning devices per node: a count, ``"auto"`` or a list spec such as ``"0,1"``."""
    num_nodes: int = 1
    """Machines to train on (with torchrun or SLURM setting up the processes)."""
    strategy: str = "auto"
    """Lightning strategy: ``auto``, ``ddp``, ``fsdp`` (CLTs too large for one device), ``ddp_spawn`` ..."""
    log_every: int = 10
    """Steps between logged metrics."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    wandb: bool = True
    """Log to Weights & Biases (offline unless logged in); metrics always go to CSV too."""
    dead_window: int = 1_000_000
    """A feature that has not fired for this many tokens counts as dead."""
    num_workers: int = 0
    """DataLoader worker processes (when ``reader_threads`` is 0)."""
    reader_threads: int = 0
    """Threads that read batches straight into (pinned) memory in the training process, instead of DataLoader
    workers: fewer copies, for feeding a GPU (see ``data.ThreadedBatches``). 0: use the DataLoader."""
    seed: int = 0
    """Seed for initialisation and data order."""

    def __post_init__(self) -> None:
        if self.max_steps <= 0 or self.batch_size <= 0 or self.d_features <= 0:
            raise ValueError("max_steps, batch_size and d_features must be positive.")
        if self.activation_kind not in ACTIVATIONS:
            raise ValueError(
                f"activation_kind must be one of {', '.join(ACTIVATIONS)}, not {self.activation_kind!r}."
            )
        if self.decoding not in ("auto", "dense", "sparse"):
            raise ValueError(f"decoding must be auto, dense or sparse, not {self.decoding!r}.")
        if not 0.0 <= self.lr_decay <= 1.0 or self.lr_warmup_steps < 0:
            raise ValueError("lr_decay must be in [0, 1] and lr_warmup_steps non-negative.")


@dataclass
class EvalConfig:
    """Replacement-model evaluation."""

    n_sequences: int = 32
    """Held-out sequences to evaluate on."""
    batch_size: int = 8
    """Sequences per forward pass."""


@dataclass
class Profile:
    """A named bundle of everything a run needs."""

    name: str
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILES: dict[str, Profile] = {
    # CI: seeded random tiny GPT-2 (real GPT-2 tokenizer), a few thousand tokens, seconds per stage.
    "ci": Profile(
        name="ci",
        harvest=HarvestConfig(model="tiny-gpt2", n_tokens=4096, seq_len=64, batch_size=16),
        train=TrainConfig(
            d_features=128,
            max_steps=60,
            batch_size=256,
            lr=1e-3,
            sparsity_coef=1e-3,
            log_every=5,
            checkpoint_every=30,
            wandb=False,
        ),
        eval=EvalConfig(n_sequences=8, batch_size=4),
    ),
    # The embedded real model, sized for a CPU run of a few minutes per stage.
    "default": Profile(
        name="default",
        harvest=HarvestConfig(
            model="smollm2-135m",
            n_tokens=60_000,
            seq_len=128,
            batch_size=16,
            model_dtype="bfloat16",
            dtype="bfloat16",
        ),
        train=TrainConfig(
            d_features=256,
            max_steps=600,
            batch_size=512,
            lr=6e-4,
            sparsity_coef=3e-4,
            precision="bf16-mixed",
            log_every=10,
            checkpoint_every=200,
            num_workers=1,  # one worker process reads and prefetches batches while the CLT trains
        ),
        eval=EvalConfig(n_sequences=32, batch_size=8),
    ),
    # GPT-2 small from the hub (needs the network once).
    "gpt2": Profile(
        name="gpt2",
        harvest=HarvestConfig(model="gpt2", n_tokens=200_000, seq_len=128, batch_size=16),
        train=TrainConfig(d_features=2048, max_steps=3000, batch_size=1024, lr=2e-4, sparsity_coef=2e-4),
        eval=EvalConfig(n_sequences=64, batch_size=8),
    ),
}


def get_profile(name: str) -> Profile:
    """Return a copy of the named profile (so a notebook may edit it freely)."""
    if name not in PROFILES:
        raise KeyError(f"Unknown profile {name!r}; choose one of {sorted(PROFILES)}.")
    return dataclasses.replace(
        PROFILES[name],
        harvest=dataclasses.replace(PROFILES[name].harvest),
        train=dataclasses.replace(PROFILES[name].train),
        eval=dataclasses.replace(PROFILES[name].eval),
    )
