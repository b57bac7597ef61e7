"""Small configuration dataclasses and the named profiles built from them.

A profile is data: which model and corpus, how many tokens, how big a CLT, how long to train. The notebooks pick
one from the ``CLTLAB_PROFILE`` environment variable (``ci`` for CI's tiny run, ``default`` for the embedded
SmolLM2-135M) so the same notebook runs in a minute on a laptop-sized toy or for real.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .activations import ACTIVATIONS

Config = TypeVar("Config")


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
class TranscoderConfig:
    """What the transcoder is, whatever data it is trained on: features, activation function, initialisation."""

    d_features: int = 512
    """Features per layer."""
    cross_layer: bool = True
    """True: a feature at layer l decodes to every layer >= l (a CLT). False: only to its own layer (a per-layer
    transcoder, the baseline)."""
    activation_kind: str = "jumprelu"
    """Which activation function ``clt.activation`` is: ``jumprelu`` (learned thresholds), ``topk`` (the k largest
    per token and layer) or ``batchtopk`` (the k · batch largest per layer over the batch)."""
    k: int = 32
    """Active features per token and layer for ``topk`` and ``batchtopk`` (unused by ``jumprelu``)."""
    threshold_init: float = 0.1
    """Initial JumpReLU threshold, in units of the normalized pre-activation."""
    bandwidth: float = 0.1
    """Width of the rectangle kernel behind the JumpReLU threshold's pseudo-gradient."""

    def __post_init__(self) -> None:
        if self.d_features <= 0:
            raise ValueError(f"d_features must be positive, not {self.d_features}.")
        if self.bandwidth <= 0 or self.threshold_init <= 0:
            raise ValueError("bandwidth and threshold_init must be positive.")
        if self.activation_kind not in ACTIVATIONS:
            raise ValueError(
                f"activation_kind must be one of {', '.join(ACTIVATIONS)}, not {self.activation_kind!r}."
            )
        if self.activation_kind != "jumprelu" and not 0 < self.k <= self.d_features:
            raise ValueError(f"k must be between 1 and d_features={self.d_features}, not {self.k}.")


@dataclass(kw_only=True)
class CLTConfig(TranscoderConfig):
    """A transcoder's config together with the shape of the activations it reads: saved with every CLT."""

    n_layers: int
    """Number of transformer layers the transcoder covers."""
    d_model: int
    """Width of the residual stream."""
    layer_offset: int = 0
    """Index in the model of the first covered layer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.n_layers, self.d_model) <= 0:
            raise ValueError("n_layers and d_model must be positive.")

    @classmethod
    def from_dict(cls, fields: dict) -> CLTConfig:
        """The config saved as ``fields``; CLTs saved before the field was renamed call it ``activation``."""
        fields = dict(fields)
        if "activation" in fields:
            fields["activation_kind"] = fields.pop("activation")
        return cls(**fields)


@dataclass
class LossConfig:
    """The training loss: reconstruction MSE + λ · tanh sparsity penalty + the pre-activation term."""

    sparsity_coef: float = 2e-4
    """λ of the tanh sparsity penalty Σ tanh(c·‖W_dec,i‖·f_i), reached after the warm-up."""
    sparsity_c: float = 4.0
    """c of the tanh sparsity penalty."""
    sparsity_warmup: float = 0.8
    """Fraction of training over which λ ramps linearly from 0."""
    preact_coef: float = 3e-6
    """Coefficient of the pre-activation loss Σ relu(θ - h) that revives dead features."""
    decoding: str = "auto"
    """How the decoder products are computed: ``dense``, ``sparse`` (gather the active features' decoder rows) or
    ``auto`` (sparse when few fire). The loss is the same either way."""
    layer_weighting: str = "uniform"
    """How the layers' normalized squared errors are weighted in the MSE: ``uniform``, or ``residual``: in
    proportion to how large the layer's ``mlp_out`` is beside the ``resid_mid`` it is added to (``output_scale ÷
    input_scale``, weights averaging 1), so that a layer whose MLP writes most of the residual stream (the first
    one, in most models) counts for as much as its errors cost downstream."""

    def __post_init__(self) -> None:
        if self.decoding not in ("auto", "dense", "sparse"):
            raise ValueError(f"decoding must be auto, dense or sparse, not {self.decoding!r}.")
        if self.layer_weighting not in ("uniform", "residual"):
            raise ValueError(f"layer_weighting must be uniform or residual, not {self.layer_weighting!r}.")
        if (
            min(self.sparsity_coef, self.sparsity_c, self.preact_coef) < 0
            or not 0 <= self.sparsity_warmup <= 1
        ):
            raise ValueError("The loss coefficients must be non-negative and sparsity_warmup in [0, 1].")


@dataclass
class OptimizerConfig:
    """Adam and its learning-rate schedule."""

    lr: float = 2e-4
    """Peak Adam learning rate."""
    lr_warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from 0."""
    lr_decay: float = 0.2
    """Final fraction of training over which the learning rate decays linearly to 0."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, not {self.lr}.")
        if not 0.0 <= self.lr_decay <= 1.0 or self.lr_warmup_steps < 0:
            raise ValueError("lr_decay must be in [0, 1] and lr_warmup_steps non-negative.")


@dataclass
class TrainerConfig:
    """The Lightning Trainer: how long, on what, in which precision, with what logging and checkpoints."""

    max_steps: int = 1000
    """Optimizer steps."""
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
    val_every: int = 0
    """Steps between held-out replacement metrics (KL, top-1, CE recovered, NMSE and L0 per layer; see
    ``cltlab.validation``), also measured after the last step; 0: none."""
    val_sequences: int = 8
    """Held-out sequences each validation runs the replacement model on."""
    wandb: bool = True
    """Log to Weights & Biases (offline unless logged in); metrics always go to CSV too."""
    dead_window: int = 1_000_000
    """A feature that has not fired for this many tokens counts as dead."""
    seed: int = 0
    """Seed for initialisation and data order."""

    def __post_init__(self) -> None:
        if min(self.max_steps, self.log_every, self.checkpoint_every, self.num_nodes) <= 0:
            raise ValueError("max_steps, log_every, checkpoint_every and num_nodes must be positive.")
        if self.val_every < 0 or self.val_sequences <= 0:
            raise ValueError(
                f"val_every must be 0 (no validation) or positive, and val_sequences positive, not "
                f"{self.val_every} and {self.val_sequences}."
            )


@dataclass
class DataConfig:
    """How training batches are read from the buffer (or activation server)."""

    batch_size: int = 1024
    """Tokens per step (per rank when training on several devices)."""
    num_workers: int = 0
    """DataLoader worker processes (when ``reader_threads`` is 0)."""
    reader_threads: int = 0
    """Threads that read batches straight into (pinned) memory in the training process, instead of DataLoader
    workers: fewer copies, for feeding a GPU (see ``data.ThreadedBatches``). 0: use the DataLoader."""
    live: bool = False
    """Harvest the training rows as they are needed (``data.LiveActivations``), as the harvest folder given to
    ``train`` was harvested (model, corpus, layers), instead of reading that folder: for more tokens than a disc
    holds. One device; not resumable to the same batches."""
    shuffle_rows: int = 65536
    """With ``live``: rows of the shuffling pool each batch is drawn from (the normalization comes from the rows
    that filled it)."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.num_workers < 0 or self.reader_threads < 0:
            raise ValueError("batch_size must be positive and num_workers, reader_threads non-negative.")
        if self.shuffle_rows < 0:
            raise ValueError(f"shuffle_rows must be non-negative, not {self.shuffle_rows}.")


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning after the MSE stage (``cltlab.finetune``): the CLT replaces the model's MLPs on
    training text and learns, through the frozen model, to give the original model's next-token distributions."""

    kl_steps: int = 0
    """Optimizer steps of the fine-tune; 0: none."""
    kl_sequences: int = 8
    """Training sequences (of the harvest's ``seq_len``) per step."""
    kl_lr: float = 3e-4
    """Peak Adam learning rate: linear warm-up, constant, then linear decay to 0."""
    kl_encoder_lr_scale: float = 1.0
    """The encoder weights' (``W_enc``) learning rate is this × ``kl_lr``, on the same schedule."""
    kl_warmup_steps: int = 5
    """Steps of the learning rate's warm-up (a full first step from the MSE optimum overshoots)."""
    kl_lr_decay: float = 0.3
    """Fraction of ``kl_steps`` at the end over which the learning rate decays (as ``OptimizerConfig.lr_decay``)."""
    kl_mse_coef: float = 0.0
    """Weight beside the KL of each layer's local reconstruction error (squared, in the CLT's normalized units,
    against the MLPs on the original run, every 4th position): keeps the features reconstructing the MLPs,
    which attribution graphs read, at some cost in KL."""
    kl_max_minutes: float | None = None
    """Stop after this many minutes even if ``kl_steps`` are not done (a budget: a slow machine takes fewer)."""
    kl_text_sequences: int | None = None
    """Read only the training split's first this many sequences, in a new order each epoch, and run the original
    model on each once: its likeliest 1,024 next tokens at each position (the KL then counts the rest of the mass as
    one outcome) and the local term's sites stay in memory for the later epochs (3.3 MB per sequence of 128 tokens
    on smollm2 in bf16), whose steps then run only the replacement. None: fresh text at every step, each with its
    original run, and the KL over the whole vocabulary."""

    def __post_init__(self) -> None:
        if self.kl_steps < 0 or self.kl_sequences <= 0 or self.kl_warmup_steps < 0:
            raise ValueError("kl_steps and kl_warmup_steps must be non-negative and kl_sequences positive.")
        if self.kl_lr <= 0 or self.kl_mse_coef < 0:
            raise ValueError(
                f"kl_lr must be positive and kl_mse_coef non-negative, not {self.kl_lr}, {self.kl_mse_coef}."
            )
        if self.kl_encoder_lr_scale <= 0:
            raise ValueError(f"kl_encoder_lr_scale must be positive, not {self.kl_encoder_lr_scale}.")
        if not 0.0 <= self.kl_lr_decay <= 1.0:
            raise ValueError(f"kl_lr_decay must be in [0, 1], not {self.kl_lr_decay}.")
        if self.kl_max_minutes is not None and self.kl_max_minutes <= 0:
            raise ValueError(f"kl_max_minutes must be positive or None, not {self.kl_max_minutes}.")
        if self.kl_text_sequences is not None and self.kl_text_sequences < self.kl_sequences:
            raise ValueError(
                f"kl_text_sequences must be None or at least kl_sequences ({self.kl_sequences}), "
                f"not {self.kl_text_sequences}."
            )


@dataclass
class TrainConfig:
    """Training a transcoder on harvested activations, in six parts (``--transcoder.d_features``,
    ``--loss.sparsity_coef``, ``--optimizer.lr``, ``--trainer.max_steps``, ``--data.batch_size``,
    ``--finetune.kl_steps`` on the command line; the same nesting in a YAML file)."""

    transcoder: TranscoderConfig = field(default_factory=TranscoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @classmethod
    def from_dict(cls, fields: dict) -> TrainConfig:
        """The config saved as ``fields``: nested as ``asdict`` writes it, or flat, as checkpoints written before
        the nesting hold it (each flat name belongs to exactly one part)."""
        parts = {f.name: f.default_factory for f in dataclasses.fields(cls)}  # name → its dataclass
        values = {part: dict(fields.get(part, {})) for part in parts}
        owner = {name: part for part, kind in parts.items() for name in kind.__dataclass_fields__}
        for name, value in fields.items():
            name = "activation_kind" if name == "activation" else name  # the name before the rename
            if name in parts:
                continue
            if name not in owner:
                raise ValueError(f"TrainConfig has no field {name!r}; its parts are {', '.join(parts)}.")
            values[owner[name]][name] = value
        return cls(**{part: kind(**values[part]) for part, kind in parts.items()})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``, each field named alone, whatever its part: ``replace(max_steps=50,
        sparsity_coef=1e-3)`` (no name is in two parts)."""
        return TrainConfig.from_dict({**dataclasses.asdict(self), **changes})


@dataclass
class EvalConfig:
    """Replacement-model evaluation."""

    n_sequences: int = 32
    """Held-out sequences to evaluate on."""
    batch_size: int = 8
    """Sequences per forward pass (on a CPU 2 measured fastest: see ``validation.ReplacementValidation``)."""


@dataclass
class Profile:
    """A named bundle of everything a run needs."""

    name: str
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the profile to the YAML file ``path`` (``get_profile(path)`` and ``--profile path`` read it)."""
        path = Path(path)
        path.write_text(to_yaml(self))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """The profile saved in the YAML file ``path``; fields it leaves out keep their defaults."""
        return from_yaml(cls, Path(path).read_text(), source=str(path))


def to_yaml(config: Any) -> str:
    """Any config dataclass (a ``Profile``, ``TrainConfig``, ``HarvestConfig`` ...) as YAML, nested as it is."""
    plain = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples become lists, which YAML can write
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)


def from_yaml(cls: type[Config], text: str, *, source: str = "the YAML text") -> Config:
    """The ``cls`` written as YAML ``text``: every value checked against its field's type by jsonargparse, and
    the dataclasses' own checks run; a wrong or unknown key is one ``ValueError`` naming it and ``source``."""
    from jsonargparse import ArgumentParser

    fields = yaml.safe_load(text) or {}
    if not isinstance(fields, dict):
        raise ValueError(
            f"{source}: expected a mapping of {cls.__name__}'s fields, not {type(fields).__name__}."
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "config")
    try:
        return parser.instantiate(parser.parse_object({"config": fields})).config
    except Exception as error:  # jsonargparse's ArgumentError, or a dataclass's own ValueError
        message = re.sub(r"\bconfig\.", "", " ".join(str(error).split())).replace(
            "Group 'config'", cls.__name__
        )
        raise ValueError(f"{source}: {message}") from None


# The named profiles live in profiles.py; importing them here keeps `cltlab.config.get_profile` working.
from .profiles import PROFILES as PROFILES  # noqa: E402
from .profiles import get_profile as get_profile  # noqa: E402
