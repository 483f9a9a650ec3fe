"""The run config of the fl-subnet Flower App: kebab-case keys, defaults, validation.

The same keys are used in ``[tool.flwr.app.config]`` (pyproject.toml), in
``flwr run . --run-config``, in scenario TOML files and by the ``fl-subnet`` command.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

STRATEGIES = ("fedavg", "ist", "dropout", "multisample-dropout", "federated-dropout")
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "synthetic-regression", "synthetic-sequence")
IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
PARTITIONINGS = ("iid", "dirichlet", "pathological")
MODELS = ("mlp", "shallow-relu", "cnn", "cnn-bn", "resnet", "transformer")
CONV_MODELS = ("cnn", "cnn-bn", "resnet")
DATA_SCOPES = ("local", "all")
CHOICES = {
    "strategy": STRATEGIES, "dataset": DATASETS, "partitioning": PARTITIONINGS,
    "model": MODELS, "data-scope": DATA_SCOPES, "ist-scaling": ("none", "p"),
    "partition-mode": ("equal", "iid"), "untouched": ("keep", "zero"),
    "loss": ("auto", "cross-entropy", "mse"), "batchnorm": ("averaged", "static"),
}


@dataclass(frozen=True)
class RunConfig:
    """All settings of one run. Field ``x_y`` is run-config key ``x-y``.

    Attributes
    ----------
    strategy : str
        One of :data:`STRATEGIES`.
    num_server_rounds : int
        Server rounds k.
    num_nodes : int
        Nodes (= data partitions) for ``fl-subnet run``; under ``flwr run`` the
        federation's ``num-supernodes`` decides and should match.
    keep_prob : float
        ξ ∈ (0, 1] (dropout family).
    num_subnets : int
        p ≥ 1 (IST, multi-sample dropout).
    local_steps, local_epochs : int
        τ local steps; if τ = 0, E local epochs.
    data_scope : str
        ``local``: each node trains on its own partition (federated); ``all``: every
        node sees the whole training set (the paper's setting).
    model : str
        ``mlp``/``shallow-relu`` (any data set, flat features); ``cnn`` (Flower's
        template CNN), ``cnn-bn`` (CNN with BatchNorm), ``resnet`` (small pre-activation
        ResNet) on image data sets, read as ``(C, H, W)`` images; ``transformer``
        (encoder with ``nn.MultiheadAttention``) on ``synthetic-sequence``.
    hidden : str
        Comma-separated hidden widths of the MLP, e.g. ``"128,64"``; for
        ``shallow-relu`` the single width m; unused by the other models.
    batchnorm : str
        BatchNorm policy (:mod:`fl_subnet.core.batchnorm`): ``averaged`` running
        statistics, or ``static`` (HeteroFL): batch statistics on the nodes, running
        statistics recomputed by the server on the training data after each round.
    """

    strategy: str = "fedavg"
    num_server_rounds: int = 5
    num_nodes: int = 10
    keep_prob: float = 0.5
    num_subnets: int = 4
    local_steps: int = 10
    local_epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    loss: str = "auto"
    seed: int = 0
    dataset: str = "digits"
    partitioning: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    data_scope: str = "local"
    num_samples: int = 1000
    input_dim: int = 20
    model: str = "mlp"
    hidden: str = "128,64"
    batchnorm: str = "averaged"
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    ist_scaling: str = "none"
    partition_mode: str = "equal"
    loss_average: bool = False
    untouched: str = "keep"
    out_dir: str = ""

    @classmethod
    def keys(cls) -> list[str]:
        """All accepted run-config keys (kebab-case)."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, ignore_unknown: bool = False) -> "RunConfig":
        """Validate ``values`` (kebab-case keys) into a RunConfig.

        Raises
        ------
        ValueError
            Naming the key: unknown key (with the accepted keys), wrong type, a value
            outside its allowed set or range.
        """
        types = {f.name: f.type for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in types:
                if ignore_unknown:
                    continue
                raise ValueError(f"unknown run-config key '{key}'; accepted keys: {', '.join(cls.keys())}")
            kwargs[name] = _coerce(key, value, types[name])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first key whose value is out of range."""
        for key, allowed in CHOICES.items():
            value = getattr(self, key.replace("-", "_"))
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        if not 0.0 < self.keep_prob <= 1.0:
            raise ValueError(f"keep-prob must be in (0, 1], got {self.keep_prob}")
        if self.model in CONV_MODELS and self.dataset not in IMAGE_DATASETS:
            raise ValueError(f"model {self.model!r} needs an image dataset {IMAGE_DATASETS}, got dataset {self.dataset!r}")
        if self.model == "transformer" and self.dataset != "synthetic-sequence":
            raise ValueError(f"model 'transformer' needs dataset 'synthetic-sequence', got dataset {self.dataset!r}")
        if self.dataset == "synthetic-regression" and self.partitioning != "iid" and self.data_scope == "local":
            raise ValueError("partitioning must be 'iid' for dataset 'synthetic-regression' (it has no labels)")
        for key in ("num-server-rounds", "num-nodes", "num-subnets", "num-samples", "input-dim", "classes-per-partition"):
            if getattr(self, key.replace("-", "_")) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key.replace('-', '_'))}")
        for key in ("local-steps", "local-epochs", "batch-size", "momentum", "weight-decay"):
            if getattr(self, key.replace("-", "_")) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key.replace('-', '_'))}")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ValueError("local-steps and local-epochs cannot both be 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        for key in ("fraction-train", "fraction-evaluate"):
            if not 0.0 <= getattr(self, key.replace("-", "_")) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key.replace('-', '_'))}")
        self.hidden_widths()  # raises on a malformed list

    def hidden_widths(self) -> list[int]:
        """``hidden`` as a list of positive ints."""
        try:
            widths = [int(w) for w in str(self.hidden).split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"hidden must be comma-separated integers, got {self.hidden!r}") from None
        if not widths or min(widths) < 1:
            raise ValueError(f"hidden must list widths >= 1, got {self.hidden!r}")
        if self.model == "shallow-relu" and len(widths) != 1:
            raise ValueError(f"hidden must be one width m for model shallow-relu, got {self.hidden!r}")
        return widths

    @property
    def loss_name(self) -> str:
        """The training loss: ``mse`` for the regression set, else cross-entropy."""
        if self.loss != "auto":
            return self.loss
        return "mse" if self.dataset == "synthetic-regression" else "cross-entropy"

    def train_config(self) -> dict[str, object]:
        """The ConfigRecord sent with every train/evaluate message."""
        return {"local-steps": self.local_steps, "local-epochs": self.local_epochs, "lr": self.lr,
                "momentum": self.momentum, "weight-decay": self.weight_decay,
                "batch-size": self.batch_size, "loss": self.loss_name, "seed": self.seed,
                "batchnorm": self.batchnorm}


def _coerce(key: str, value: object, typ: object) -> object:
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(str(typ), typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value
