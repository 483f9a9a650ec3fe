"""The run config of the fl-subnet Flower App: kebab-case keys, defaults, validation.

The same keys are used in ``[tool.flwr.app.config]`` (pyproject.toml), in
``flwr run . --run-config``, in scenario TOML files and by the ``fl-subnet`` command.

:class:`RunConfig` is a frozen pydantic (v2) dataclass and the one definition of every
key: its type, range or choices (the ``Literal`` types and ``Annotated`` bounds below),
default and meaning. Everything else is derived from it: the tuples
:data:`STRATEGIES`, :data:`DATASETS`, :data:`MODELS`, ... (``typing.get_args`` of the
``Literal`` types), the error messages (:func:`allowed`), the key list
(:meth:`RunConfig.keys`) and the "Keys" section of :class:`RunConfig`'s docstring.
Choices owned by other code are taken from it: ``strategy`` from the registered protocols
(:data:`fl_subnet.strategies.PROTOCOLS`), ``ist-scaling``, ``lr-scaling``, ``aggregation``,
``screen``, ``dropout-sampling`` and ``server-optimizer`` from the modules that implement
them; a protocol's own requirements from its ``check_run_config``.

Every invalid value raises ``ValueError`` (never pydantic's ``ValidationError``) whose
message names the kebab-case key, the bad value and what is allowed, e.g.
``lr must be a finite number > 0, got inf``.
"""

import difflib
import numbers
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

import annotated_types as at
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from fl_subnet.core.device import AMP_MODES, DEVICE_CHOICES, check_device_name
from fl_subnet.core.paths import PATH_SCALES
from fl_subnet.core.robust import SCREEN_MODES
from fl_subnet.core.robust_direction import BUCKET_SIZE, CLIP_ITERATIONS
from fl_subnet.core.robust_distance import KRUM_ROGUES_AUTO, WEISZFELD_ITERATIONS, WEISZFELD_SMOOTHING
from fl_subnet.core.server_opt import SERVER_OPTIMIZERS
from fl_subnet.strategies import PROTOCOLS, protocol_class
from fl_subnet.strategies.base import AGGREGATIONS
from fl_subnet.strategies.federated_dropout import DROPOUT_SAMPLINGS
from fl_subnet.strategies.fjord import FJORD_BN_MODES
from fl_subnet.strategies.ist import IST_SCALINGS
from fl_subnet.strategies.lr_scaling import LR_SCALINGS

# --- Choices: one Literal per key; the public tuples are derived from them -------------------

Strategy = Literal[tuple(PROTOCOLS)]  # every registered protocol (strategies.registry)
ImageDataset = Literal["digits", "mnist", "fashion-mnist", "cifar10", "mnist-5k"]
SignalDataset = Literal["mnist1d"]  # 1-D signals: (C, L) per row
Dataset = Literal[ImageDataset, SignalDataset, "synthetic-regression", "synthetic-sequence", "shifted-majority", "text"]
Partitioning = Literal["iid", "dirichlet", "pathological"]
ConvModel = Literal["cnn", "cnn-bn", "resnet"]  # 2-D: image data sets
Conv1dModel = Literal["cnn1d"]  # 1-D: signal data sets
Model = Literal["mlp", "mlp-bn", "shallow-relu", ConvModel, Conv1dModel, "transformer", "hf-classifier"]
DataScope = Literal["local", "all"]
LossChoice = Literal["auto", "cross-entropy", "mse"]
BatchNormPolicy = Literal["averaged", "static"]
IstScaling = Literal[IST_SCALINGS]
LrScaling = Literal[LR_SCALINGS]
PartitionMode = Literal["equal", "iid"]
Untouched = Literal["keep", "zero"]
Aggregation = Literal[AGGREGATIONS]
ScreenMode = Literal[SCREEN_MODES]
DropoutSampling = Literal[DROPOUT_SAMPLINGS]
ServerOptimizer = Literal[("none",) + SERVER_OPTIMIZERS]
PathScale = Literal[PATH_SCALES]
FjordBn = Literal[FJORD_BN_MODES]
Amp = Literal[AMP_MODES]

STRATEGIES: tuple[str, ...] = get_args(Strategy)
DATASETS: tuple[str, ...] = get_args(Dataset)
IMAGE_DATASETS: tuple[str, ...] = get_args(ImageDataset)
SIGNAL_DATASETS: tuple[str, ...] = get_args(SignalDataset)
PARTITIONINGS: tuple[str, ...] = get_args(Partitioning)
MODELS: tuple[str, ...] = get_args(Model)
CONV_MODELS: tuple[str, ...] = get_args(ConvModel)
CONV1D_MODELS: tuple[str, ...] = get_args(Conv1dModel)
DATA_SCOPES: tuple[str, ...] = get_args(DataScope)
#: Models with depth blocks (skippable residual branches), which ``random-path`` needs
#: (a protocol whose ``needs_depth_blocks`` is set).
DEPTH_MODELS = ("resnet", "transformer")
#: Data sets of token ids (int64 for the model): the sequence models read them.
TOKEN_DATASETS = ("synthetic-sequence", "shifted-majority", "text")


class DatasetInfo(NamedTuple):
    """What the run config must know of a data set to validate a scenario without loading it."""

    classes: int
    """Number of classes (0: regression; -1: the run config's ``num-classes``)."""
    train_rows: int | None
    """Rows of the training split at the loaders' defaults (None: ``num-samples``)."""
    features: int | None = None
    """Input features of a row, the flat ``x`` the MLPs read (None: ``input-dim``)."""


#: Facts checked against the run config (see :mod:`fl_subnet.experiments.data`): digits has
#: 1,797 rows, 1,437 of them train at the loader's default test fraction 0.2; mnist-5k
#: 5,000 rows, 4,000 train at the same fraction; mnist1d 4,000 train rows (the package's split).
DATASET_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, 1437, 64),
    "mnist": DatasetInfo(10, 60_000, 784),
    "fashion-mnist": DatasetInfo(10, 60_000, 784),
    "cifar10": DatasetInfo(10, 50_000, 3072),
    "mnist-5k": DatasetInfo(10, 4000, 784),
    "mnist1d": DatasetInfo(10, 4000, 40),
    "synthetic-regression": DatasetInfo(0, None),
    "synthetic-sequence": DatasetInfo(2, None),
    "shifted-majority": DatasetInfo(4, None, 16),
    "text": DatasetInfo(-1, None),
}
if tuple(DATASET_INFO) != DATASETS:  # pragma: no cover  (a programming error, caught on import)
    raise AssertionError(f"DATASET_INFO {tuple(DATASET_INFO)} must list DATASETS {DATASETS}")


# --- Value types: type and range in one place each --------------------------------------------

class _Allowed(NamedTuple):
    """Annotated metadata: the text of what a free-form key allows (shown in its error message)."""

    text: str


def _whole_number(value: Any) -> Any:
    """An integral float (``5.0``) or a numpy integer as ``int``; anything else unchanged (for
    the strict int check: ``"3"``, ``true``, ``5.5`` stay invalid)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    return value


def Int(lo: int, hi: int, doc: str):  # noqa: N802  (a type factory)
    """An ``int`` key in ``[lo, hi]``."""
    return Annotated[int, BeforeValidator(_whole_number), Field(strict=True, ge=lo, le=hi, description=doc)]


def _exact_float(value):
    """Refuse an int that a float cannot hold exactly (above 2**53), instead of rounding it."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            if float(value) != value:
                raise ValueError("an integer a float cannot hold exactly")
        except OverflowError:
            raise ValueError("an integer too large for a float") from None
    return value


def Number(doc: str, **bounds: float):  # noqa: N802
    """A finite ``float`` key (an int is accepted as a float when a float holds it
    exactly); ``bounds``: gt/ge/lt/le."""
    return Annotated[float, BeforeValidator(_exact_float),
                     Field(strict=True, allow_inf_nan=False, description=doc, **bounds)]


def Choice(choices, doc: str):  # noqa: N802
    """A string key, one of the ``Literal`` ``choices``."""
    return Annotated[choices, Field(description=doc)]


MAX_WIDTH = 100_000
MAX_LAYERS = 100
_WIDTH = re.compile(r"[0-9]+")


def _check_hidden(value: str) -> str:
    if not value.strip():  # no hidden layer: the MLP is one Linear (logistic regression)
        return value
    parts = [w.strip() for w in value.split(",")]
    if not 1 <= len(parts) <= MAX_LAYERS or not all(_WIDTH.fullmatch(w) and 1 <= int(w) <= MAX_WIDTH for w in parts):
        raise ValueError("bad hidden widths")
    return value


def _check_path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL in path")
    return value


_TIERS = re.compile(r"\s*(0?\.[0-9]+|1(\.0*)?)\s*(,\s*(0?\.[0-9]+|1(\.0*)?)\s*)*")


def _check_tiers(value: str) -> str:
    if not _TIERS.fullmatch(value) or not all(0 < float(t) <= 1 for t in value.split(",")):
        raise ValueError("bad capacity tiers")
    return value


def Fractions(allowed: str, doc: str, check=_check_tiers):  # noqa: N802  (a type factory)
    """A string key of comma-separated fractions in (0, 1] (``check`` may add rules);
    ``allowed`` is what an error message says is allowed."""
    return Annotated[str, AfterValidator(check), _Allowed(allowed), Field(strict=True, description=doc)]


def fractions(value: str) -> tuple[float, ...]:
    """A validated :func:`Fractions` value as floats, in the given order."""
    return tuple(float(t) for t in value.split(","))


CapacityTiers = Fractions('a string of comma-separated capacities in (0, 1], e.g. "0.25,0.5,1.0"',
                          "HeteroFL/FedRolex/FjORD: capacities of the nodes that declare none, by node "
                          "order (node i gets tier i mod len), e.g. ``\"0.25,0.5,1.0\"``.")
FjordWidths = Fractions('a string of comma-separated widths in (0, 1], e.g. "0.2,0.4,0.6,0.8,1.0"',
                        "FjORD: the discrete widths (FjORD's uniform grid by default); a node trains, per "
                        "batch, a width drawn from those at most its capacity.")


def _check_path_length(value: str) -> str:
    _check_tiers(value)
    stages = fractions(value)
    if any(b < a for a, b in zip(stages, stages[1:])):
        raise ValueError("decreasing path lengths")
    return value


PathLength = Fractions('a string of comma-separated, non-decreasing fractions in (0, 1], e.g. "0.5" or '
                       '"0.5,0.75,1.0"',
                       "random-path: fraction of the depth blocks each node keeps (⌈f·B⌉, the first and last "
                       "always); several values are RaPTr's progressive stages, each over an equal share of the "
                       "rounds, e.g. ``\"0.5,0.75,1.0\"``.", check=_check_path_length)
HiddenWidths = Annotated[
    str, AfterValidator(_check_hidden),
    _Allowed(f"a string of comma-separated widths, each an integer in [1, {MAX_WIDTH}] "
             f'(at most {MAX_LAYERS} widths), e.g. "128,64", or "" (no hidden layer)'),
    Field(strict=True, description="Hidden widths of the MLP, e.g. ``\"128,64\"``; ``\"\"``: no hidden layer, "
                                   "the MLP is one Linear (multinomial logistic regression on a "
                                   "classification set), which has no unit groups; for ``shallow-relu`` "
                                   "the single width m; unused by the other models."),
]
def PathKey(allowed: str, doc: str):  # noqa: N802  (a type factory)
    """A string key naming a folder, file or hub name (no NUL character); ``allowed`` is
    what an error message says is allowed."""
    return Annotated[str, AfterValidator(_check_path), _Allowed(allowed), Field(strict=True, description=doc)]


FolderPath = PathKey("a folder path (a string without NUL characters)",
                     "Output folder of ``flwr run``: an absolute path, or one relative to "
                     "``~/flwr-runs/`` (empty: ``~/flwr-runs/<strategy>-<time>``); "
                     "``fl-subnet`` sets it from ``--out``.")
DeviceName = Annotated[
    str, AfterValidator(check_device_name), _Allowed(DEVICE_CHOICES),
    Field(strict=True, description="Where the nodes train and evaluate, and the server's central evaluation "
                                   "runs: ``auto`` (``cuda`` if the machine has CUDA, else ``cpu``), ``cpu``, "
                                   "``cuda`` or ``cuda:N``. Checked here for its form only; each node checks "
                                   "its own hardware (``cuda`` on a node without CUDA fails there, naming "
                                   "``device``) and may override it (``--node-config \"device='cuda:1'\"``). "
                                   "``fl-subnet`` runs every node on this machine and checks it at once."),
]
DataPath = PathKey("a folder path or hub name (a string without NUL characters)",
                   "``text``: a folder written by ``DatasetDict.save_to_disk`` (splits ``train`` "
                   "and ``test``, columns ``text`` and ``label``), or a hub name when the "
                   "machine is online.")
BaseModel = PathKey("a folder path or hub name (a string without NUL characters)",
                    "``hf-classifier``: the pre-trained model, a folder written by "
                    "``save_pretrained`` (config, weights and, for ``text``, the tokenizer) or a "
                    "hub name when the machine is online; empty: the tiny BERT pre-trained on "
                    "task A from ``seed`` (``shifted-majority``'s base).")
_TARGETS = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_.]*\s*(,\s*[A-Za-z_][A-Za-z0-9_.]*\s*)*")


def _check_targets(value: str) -> str:
    if not _TARGETS.fullmatch(value):
        raise ValueError("bad module names")
    return value


LoraTargets = Annotated[
    str, AfterValidator(_check_targets),
    _Allowed('a string of comma-separated module names, e.g. "query,value" or "q_proj,v_proj"'),
    Field(strict=True, description="``hf-classifier``: the modules that get LoRA adapters (peft's "
                                   "``target_modules``: a module whose name ends with one of them)."),
]
ResumeFrom = PathKey("a folder path (a string without NUL characters)",
                     "``flwr run``: continue the run saved in this results folder (absolute, or "
                     "relative to ``~/flwr-runs/``) after its last checkpointed round, writing "
                     "on there; only :data:`RESUMABLE_KEYS` may differ from its config. "
                     "Empty: a new run. ``fl-subnet run`` uses ``--resume DIR`` instead.")

#: Keys a resumed run may change (``resume-from``, ``fl-subnet run --resume``): how long the
#: run goes on, where it writes, how long it waits, and how replies are screened and
#: combined (the defences, so they can be switched on for a run under attack). Every other
#: key would change the experiment and is refused.
RESUMABLE_KEYS = frozenset({
    "num-server-rounds", "out-dir", "resume-from", "round-timeout", "node-wait-timeout", "max-failed-rounds",
    "fraction-evaluate", "aggregation", "trim-fraction", "max-update-ratio", "max-ratio-to-median", "screen",
    "max-num-examples", "clip-radius", "clip-iterations", "bucket-size", "weiszfeld-iterations",
    "weiszfeld-smoothing", "krum-rogues", "min-cosine", "device",
})

_CONFIG = ConfigDict(strict=True, extra="forbid")


@dataclass(frozen=True, config=_CONFIG)
class RunConfig:
    """All settings of one run. Field ``x_y`` is run-config key ``x-y``.

    Construct it with keyword arguments (``RunConfig(strategy="ist", num_subnets=2)``) or
    from kebab-case keys (:meth:`from_mapping`); either way every value is validated, and
    an invalid one raises ``ValueError`` naming the key, the value and what is allowed.
    The "Keys" section below is generated from the field definitions.
    """

    strategy: Choice(Strategy, "The federated strategy (:data:`STRATEGIES`).") = "fedavg"
    num_server_rounds: Int(1, 100_000, "Server rounds k.") = 5
    num_nodes: Int(1, 10_000, "Nodes (= data partitions) for ``fl-subnet run``; under ``flwr run`` the "
                              "federation's ``num-supernodes`` decides and should match.") = 10
    keep_prob: Number("ξ, the keep probability of a unit (dropout family).", gt=0.0, le=1.0) = 0.5
    num_subnets: Int(1, 10_000, "p, sub-networks per round (IST, multi-sample dropout: one per node).") = 4
    local_steps: Int(0, 1_000_000, "τ local steps per round; 0: ``local-epochs`` epochs.") = 10
    local_epochs: Int(0, 10_000, "Local epochs per round when ``local-steps`` is 0.") = 1
    lr: Number("Learning rate of the nodes' SGD.", gt=0.0) = 0.1
    momentum: Number("SGD momentum.", ge=0.0, lt=1.0) = 0.0
    weight_decay: Number("SGD weight decay.", ge=0.0) = 0.0
    batch_size: Int(0, 1_000_000, "Mini-batch size; 0: full batch (the paper's GD).") = 32
    loss: Choice(LossChoice, "Training loss; ``auto``: ``mse`` for synthetic-regression, else "
                             "cross-entropy.") = "auto"
    seed: Int(0, 2**32 - 1, "Seeds data split, partitions, masks and model init (numpy's range).") = 0
    dataset: Choice(Dataset, "The data set (:data:`DATASETS`).") = "digits"
    partitioning: Choice(Partitioning, "How the training set is split over the nodes.") = "dirichlet"
    dirichlet_alpha: Number("Dirichlet concentration (smaller: more label skew).", gt=0.0) = 0.5
    classes_per_partition: Int(1, 10_000,
                               "Classes per node (``pathological`` partitioning); at most the data "
                               "set's classes.") = 2
    data_scope: Choice(DataScope, "``local``: each node trains on its own partition (federated); ``all``: "
                                  "every node sees the whole training set (the paper's setting).") = "local"
    num_samples: Int(1, 10_000_000, "Training rows of the synthetic data sets.") = 1000
    input_dim: Int(1, 100_000, "Input dimension (synthetic-regression) or sequence length "
                               "(synthetic-sequence, text).") = 20
    dataset_path: DataPath = ""
    num_classes: Int(0, 100_000, "``text``: the number of classes of its ``label`` column (required there); "
                                 "unused by the other data sets, whose classes are known.") = 0
    model: Choice(Model, "``mlp``/``shallow-relu`` (any data set, flat features); ``mlp-bn``: the MLP with a "
                         "BatchNorm without running statistics after every hidden layer (IST's code); ``cnn`` (Flower's template "
                         "CNN), ``cnn-bn`` (CNN with BatchNorm), ``resnet`` (small pre-activation ResNet) on "
                         "image data sets, read as ``(C, H, W)`` images; ``cnn1d`` (MNIST-1D's CNN) on 1-D signal data "
                         "sets, read as ``(C, L)`` signals; ``transformer`` (encoder with "
                         "``nn.MultiheadAttention``) on ``synthetic-sequence``; ``hf-classifier`` (a pre-trained "
                         "``transformers`` sequence classifier, ``base-model``, with LoRA adapters of rank "
                         "``lora-rank``; :mod:`fl_subnet.experiments.hf_model`) on ``shifted-majority`` or "
                         "``text``.") = "mlp"
    base_model: BaseModel = ""
    pretrain_steps: Int(0, 1_000_000, "``hf-classifier`` with ``base-model = \"\"``: AdamW steps of the tiny "
                                      "BERT's central pre-training on task A (docs/lora.md).") = 600
    lora_rank: Int(0, 100_000, "``hf-classifier``: r_max, the rank of every LoRA adapter (its units; a node of "
                               "capacity c trains ⌈c·r⌉ ranks); 0: no adapters, every weight trained "
                               "(full fine-tuning).") = 16
    lora_alpha: Number("``hf-classifier``: peft's ``lora_alpha``; every node uses the scale "
                       "``lora-alpha / lora-rank`` whatever ranks it keeps (docs/lora.md).", gt=0.0) = 32.0
    lora_targets: LoraTargets = "query,value"
    hidden: HiddenWidths = "128,64"
    capacity_tiers: CapacityTiers = "1.0"
    label_split: Annotated[bool, Field(strict=True, description="HeteroFL/FedRolex: HeteroFL's label split "
                                       "for non-IID labels: a node's logits of labels its partition lacks are "
                                       "masked, and each classifier row is averaged over the nodes holding "
                                       "its label (:mod:`fl_subnet.core.label_split`).")] = False
    fjord_widths: FjordWidths = "0.2,0.4,0.6,0.8,1.0"
    fjord_distill: Annotated[bool, Field(strict=True, description="FjORD only: FjORD+KD's self-distillation "
                                         "(Horváth et al. 2021, §3.3): per batch the node's max width is "
                                         "trained on the labels and the drawn width on its softened outputs "
                                         "(:func:`fl_subnet.core.ordered.fjord_kd_loss`).")] = False
    fjord_bn: Choice(FjordBn, "FjORD only: BatchNorm running statistics shared by all widths, or one set per "
                     "width as FjORD's ODBatchNorm2d (needs batchnorm = 'averaged'); ``auto``: per width "
                     "wherever that applies, else shared.") = "auto"
    core_fraction: Number("core-alternation: the core's share of every unit group (its first "
                          "⌈f·size⌉ units), trained alone in core rounds.", gt=0.0, le=1.0) = 0.5
    core_period: Int(2, 100_000, "core-alternation: period p of the schedule, p - 1 core rounds then "
                                 "one full-model round (round k is a core round iff k mod p != 0).") = 2
    path_length: PathLength = "0.5"
    path_scale: Choice(PathScale, "random-path: ``none`` (kept blocks unscaled) or ``raptr`` (each kept middle "
                                  "block's residual branch ×(B−2)/(L−2) while training, so the expected "
                                  "residual sum equals the full model's; first and last block ×1).") = "none"
    blocks_per_stage: Int(1, 64, "``resnet``: residual blocks per stage (1: one skippable block; "
                                 "``random-path`` needs >= 2).") = 1
    batchnorm: Choice(BatchNormPolicy, "BatchNorm policy (:mod:`fl_subnet.core.batchnorm`): ``averaged`` "
                                       "running statistics, or ``static`` (HeteroFL): batch statistics on the "
                                       "nodes, running statistics recomputed by the server after each "
                                       "round.") = "averaged"
    fraction_train: Number("Fraction of the nodes trained per round (FedAvg, federated dropout, IST).",
                           ge=0.0, le=1.0) = 1.0
    fraction_evaluate: Number("Fraction of the nodes evaluating per round.", ge=0.0, le=1.0) = 0.0
    ist_scaling: Choice(IstScaling, "IST output scaling: ``none`` (IST's code), ``p`` (outputs ×p while "
                                    "training, the nodes' lr following ``lr-scaling``), ``p-lr`` (×p and the "
                                    "nodes' lr ×1/p), ``eval`` (trained unscaled, the full model's split units "
                                    "×1/p at evaluation, folded into the weights: ResIST).") = "p"
    lr_scaling: Choice(LrScaling, "How a node's lr follows its sub-model's output scale s (1/ξ, 1/r, p): "
                                  "``square`` ×1/s², ``linear`` ×1/s, ``none``; ``auto``: the protocol's "
                                  "default (``square``; ``none`` for dropout and multi-sample dropout).") = "auto"
    partition_mode: Choice(PartitionMode, "IST unit partition: ``equal`` sizes or ``iid`` assignment.") = "equal"
    loss_average: Annotated[bool, Field(strict=True, description="Multi-sample dropout: Inoue's 1/p loss "
                                        "average instead of the per-unit mean over holders.")] = False
    untouched: Choice(Untouched, "Units no node trained this round: ``keep`` or ``zero``.") = "keep"
    aggregation: Choice(Aggregation, "``mean`` over the holders of each entry (weighted by ``num-examples``), "
                                     "or the robust ``median`` / ``trimmed-mean`` (coordinate-wise, unweighted, "
                                     "Yin et al. 2018), ``centered-clip`` (centered clipping of whole updates, "
                                     "Karimireddy et al. 2021), ``bucketing`` (centered clipping of bucket "
                                     "means, Karimireddy et al. 2022), ``geometric-median`` (of whole updates, "
                                     "RFA, Pillutla et al. 2022) or ``multi-krum`` (the mean of the m best by "
                                     "Krum's score, Blanchard et al. 2017). The default, ``centered-clip``, is "
                                     "chosen in docs/attacks.md (\"The default\"); ``mean`` is the "
                                     "protocols as published.") = "centered-clip"
    trim_fraction: Number("β of ``trimmed-mean``: the fraction of an entry's holders dropped at each end.",
                          ge=0.0, lt=0.5) = 0.25
    clip_radius: Number("τ of ``centered-clip`` / ``bucketing``: a reply's (bucket's) update farther than τ "
                        "from the center is scaled down to τ; 0: the round's median distance.", ge=0.0) = 0.0
    clip_iterations: Int(1, 1000, "L of ``centered-clip`` / ``bucketing``: clipping iterations per round "
                                  "(3: the authors' experiments).") = CLIP_ITERATIONS
    bucket_size: Int(1, 100_000, "s of ``bucketing``: replies averaged per bucket, shuffled from the seed and "
                                 "the round (1: centered clipping).") = BUCKET_SIZE
    weiszfeld_iterations: Int(1, 1000, "T of ``geometric-median``: smoothed Weiszfeld iterations per round "
                                       "(8: the reference's experiments).") = WEISZFELD_ITERATIONS
    weiszfeld_smoothing: Number("ν of ``geometric-median``: an update closer than ν to the median weighs as if "
                                "at ν (0.1: the reference's default).", gt=0.0) = WEISZFELD_SMOOTHING
    krum_rogues: Int(-1, 100_000, "f of ``multi-krum``: rogue replies a round is assumed to hold; the m = n − f "
                                  "replies of lowest Krum score are averaged; -1: as many as Krum tolerates, "
                                  "⌊(n − 3)/2⌋.") = KRUM_ROGUES_AUTO
    min_cosine: Number("Direction screening: leave out replies whose update's cosine to the geometric median "
                       "of the round's updates (over the entries each holds) is below this; -1: off.",
                       ge=-1.0, le=1.0) = -1.0
    max_update_ratio: Number("Screen replies whose update norm exceeds this multiple of the global slice's "
                             "norm; 0: off.", ge=0.0) = 0.0
    max_ratio_to_median: Number("Screen replies whose update-norm ratio exceeds this multiple of the round's "
                                "median; 0: off.", ge=0.0) = 0.0
    screen: Choice(ScreenMode, "What screening does to a reply over a bound: ``reject`` or ``clip``.") = "reject"
    max_num_examples: Int(0, 10**12, "Cap on a reply's self-reported ``num-examples`` weight; 0: no cap.") = 0
    max_failed_rounds: Int(0, 100_000, "Stop the run after this many consecutive rounds without a valid "
                                       "reply; 0: never.") = 3
    dropout_sampling: Choice(DropoutSampling, "Federated dropout's masks: ``bernoulli`` (each unit kept "
                                              "independently per node) or ``even`` (FedEcover: ⌈ξ·size⌉ units per "
                                              "node, dealt without replacement across the round's nodes).") = "bernoulli"
    min_holders: Int(1, 10_000, "Redundancy for the robust aggregation rules (IST and federated dropout only): "
                                "k holders per unit a round. IST deals every part to at least k nodes (needs "
                                "k·``num-subnets`` nodes a round); federated dropout adds each unit held by fewer "
                                "than min(k, nodes) to randomly chosen nodes' masks, at the same 1/ξ scale. 1: "
                                "the masks as drawn.") = 1
    server_optimizer: Choice(ServerOptimizer, "Server optimizer on the masked pseudo-gradient (Reddi et al. "
                                              "2021; :mod:`fl_subnet.core.server_opt`): entries no node held keep "
                                              "their value and optimizer state; ``none``: the aggregate itself "
                                              "(FedAvg).") = "none"
    server_lr: Number("Server learning rate η of ``server-optimizer``; 0: Flower's default for it (FedAvgM 1, "
                      "FedAdam 0.1, FedYogi 0.01, FedAdagrad 0.1).", ge=0.0) = 0.0
    server_momentum: Number("μ of FedAvgM, β₁ of FedAdam/FedYogi.", ge=0.0, lt=1.0) = 0.9
    round_timeout: Number("Seconds a round waits for the nodes' replies (Flower's timeout).", gt=0.0) = 3600.0
    node_wait_timeout: Number("Seconds to wait for enough connected nodes before giving up with an error.",
                              gt=0.0) = 60.0
    out_dir: FolderPath = ""
    resume_from: ResumeFrom = ""
    device: DeviceName = "auto"
    amp: Choice(Amp, "Mixed precision of the nodes' local training (forward passes under ``torch.autocast``): "
                     "``none``, ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA only, with a gradient scaler; a node "
                     "without CUDA refuses it, naming ``amp``). Evaluation stays in float32.") = "none"

    @model_validator(mode="after")
    def _check_combination(self) -> "RunConfig":
        self.validate()
        return self

    @classmethod
    def keys(cls) -> list[str]:
        """All accepted run-config keys (kebab-case), in field order."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, ignore_unknown: bool = False) -> "RunConfig":
        """Validate ``values`` (kebab-case keys) into a RunConfig.

        Raises
        ------
        ValueError
            Naming the key: unknown key (with the accepted keys), wrong type, a value
            outside its allowed set or range, or a combination of keys that cannot run.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"a run config must be a mapping of run-config keys, got {_show(values)}")
        known = {k: k.replace("-", "_") for k in cls.keys()}
        kwargs = {}
        for key, value in values.items():
            name = known.get(key) if isinstance(key, str) else None
            if name is None:
                if not ignore_unknown:
                    raise ValueError(unknown_key_message(key))
                continue
            kwargs[name] = value
        return cls(**kwargs)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the keys of a combination that cannot run.

        Every value is checked on its own when the RunConfig is built (so an existing
        RunConfig always passes); this checks values against each other.
        """
        info = self.dataset_info()
        if self.model in CONV_MODELS and self.dataset not in IMAGE_DATASETS:
            raise ValueError(f"model {self.model!r} needs an image dataset {IMAGE_DATASETS}, "
                             f"got dataset {self.dataset!r}")
        if self.model in CONV1D_MODELS and self.dataset not in SIGNAL_DATASETS:
            raise ValueError(f"model {self.model!r} needs a 1-D signal dataset {SIGNAL_DATASETS}, "
                             f"got dataset {self.dataset!r}")
        if self.model == "transformer" and self.dataset != "synthetic-sequence":
            raise ValueError(f"model 'transformer' needs dataset 'synthetic-sequence', got dataset {self.dataset!r}")
        if self.model == "hf-classifier" and self.dataset not in ("shifted-majority", "text"):
            raise ValueError(f"model 'hf-classifier' needs dataset 'shifted-majority' or 'text', got dataset "
                             f"{self.dataset!r}")
        if self.dataset == "text":
            if self.model != "hf-classifier":
                raise ValueError(f"dataset 'text' needs model 'hf-classifier' (its tokenizer), got {self.model!r}")
            if not self.base_model:
                raise ValueError("dataset 'text' needs base-model: the folder whose tokenizer encodes the text")
            if not self.dataset_path:
                raise ValueError("dataset 'text' needs dataset-path: a save_to_disk folder or a hub name")
            if self.num_classes < 2:
                raise ValueError(f"dataset 'text' needs num-classes >= 2 (the classes of its label column), got "
                                 f"{self.num_classes}")
        if self.model == "hf-classifier" and not self.base_model and self.dataset != "shifted-majority":
            raise ValueError("base-model \"\" (the built-in tiny BERT) is pre-trained for dataset "
                             "'shifted-majority' only")
        if self.model == "shallow-relu" and ("," in self.hidden or not self.hidden.strip()):
            raise ValueError(f"hidden must be one width m for model shallow-relu, got {self.hidden!r}")
        if info.classes == 0 and self.loss == "cross-entropy":
            raise ValueError(f"loss 'cross-entropy' needs a classification dataset; dataset {self.dataset!r} "
                             "is a regression set (use loss 'auto' or 'mse')")
        if info.classes > 0 and self.loss == "mse":
            raise ValueError(f"loss 'mse' needs dataset 'synthetic-regression'; dataset {self.dataset!r} has "
                             f"{info.classes} classes (use loss 'auto' or 'cross-entropy')")
        if info.classes == 0 and self.partitioning != "iid" and self.data_scope == "local":
            raise ValueError(f"partitioning must be 'iid' for dataset {self.dataset!r} (it has no labels), "
                             f"got {self.partitioning!r}")
        if 0 < info.classes < self.classes_per_partition:
            raise ValueError(f"classes-per-partition ({self.classes_per_partition}) must not exceed the "
                             f"{info.classes} classes of dataset {self.dataset!r}")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ValueError("local-steps and local-epochs cannot both be 0")
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("amp 'fp16' needs a CUDA device (float16 autocast with a gradient scaler), got device "
                             "'cpu': use amp 'bf16' or 'none' on the CPU")
        if self.aggregation != "mean" and self.untouched != "keep":
            raise ValueError(f"aggregation {self.aggregation!r} needs untouched 'keep', got {self.untouched!r}")
        protocol = protocol_class(self.strategy)
        if self.label_split and not getattr(protocol, "supports_label_split", False):
            able = [n for n, p in PROTOCOLS.items() if getattr(p.cls, "supports_label_split", False)]
            raise ValueError(f"label-split needs strategy {' or '.join(map(repr, able))}, got {self.strategy!r}")
        if self.fjord_distill and self.strategy != "fjord":
            raise ValueError(f"fjord-distill needs strategy 'fjord', got {self.strategy!r}")
        if self.fjord_bn != "auto" and self.strategy != "fjord":
            raise ValueError(f"fjord-bn needs strategy 'fjord', got {self.strategy!r}")
        if self.min_holders != 1 and not getattr(protocol, "supports_min_holders", False):
            able = [n for n, p in PROTOCOLS.items() if getattr(p.cls, "supports_min_holders", False)]
            raise ValueError(f"min-holders ({self.min_holders}) needs strategy {' or '.join(map(repr, able))}, "
                             f"got {self.strategy!r}")
        if protocol.needs_depth_blocks:
            if self.model not in DEPTH_MODELS:
                raise ValueError(f"strategy {self.strategy!r} needs a model with depth blocks (skippable residual "
                                 f"branches) {DEPTH_MODELS}; model {self.model!r} has none")
            if self.model == "resnet" and self.blocks_per_stage < 2:
                raise ValueError(f"strategy {self.strategy!r} with model 'resnet' needs blocks-per-stage >= 2, got 1: "
                                 "the ResNet then has a single skippable block and every path is the full model")
        protocol.check_run_config(self)
        rows = self.num_samples if info.train_rows is None else info.train_rows
        if self.data_scope == "local" and self.num_nodes > rows and self.dataset != "text":
            source = "num-samples" if info.train_rows is None else f"dataset {self.dataset!r}"
            raise ValueError(f"num-nodes ({self.num_nodes}) must not exceed the {rows} training examples of "
                             f"{source}: every node needs at least one")

    def dataset_info(self) -> DatasetInfo:
        """:data:`DATASET_INFO` of ``dataset``; for ``text``, ``num-classes`` classes of
        ``input-dim`` token ids (its rows are counted when it is loaded)."""
        if self.dataset == "text":
            return DatasetInfo(self.num_classes, None, self.input_dim)
        return DATASET_INFO[self.dataset]

    def hidden_widths(self) -> list[int]:
        """``hidden`` as a list of positive ints (empty for ``hidden = ""``: no hidden layer)."""
        return [int(w) for w in self.hidden.split(",")] if self.hidden.strip() else []

    def path_lengths(self) -> list[float]:
        """``path-length`` as a list of fractions in (0, 1], one per RaPTr stage."""
        return list(fractions(self.path_length))

    def tiers(self) -> tuple[float, ...]:
        """``capacity-tiers`` as floats, in node order."""
        return fractions(self.capacity_tiers)

    def widths(self) -> tuple[float, ...]:
        """``fjord-widths`` as floats."""
        return fractions(self.fjord_widths)

    @property
    def loss_name(self) -> str:
        """The training loss: ``mse`` for the regression set, else cross-entropy."""
        if self.loss != "auto":
            return self.loss
        return "mse" if self.dataset == "synthetic-regression" else "cross-entropy"

    def train_config(self) -> dict[str, object]:
        """The ConfigRecord sent with every train/evaluate message."""
        out: dict[str, object] = {
            "local-steps": self.local_steps, "local-epochs": self.local_epochs, "lr": self.lr,
            "momentum": self.momentum, "weight-decay": self.weight_decay,
            "batch-size": self.batch_size, "loss": self.loss_name, "seed": self.seed,
            "batchnorm": self.batchnorm}
        if self.amp != "none":  # absent at its default: the messages of a run without it are unchanged
            out["amp"] = self.amp
        return out


# --- Messages derived from the field definitions -----------------------------------------------

def _field_info(key: str):
    try:
        return RunConfig.__pydantic_fields__[key.replace("-", "_")]
    except KeyError:
        raise ValueError(unknown_key_message(key)) from None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def allowed(key: str) -> str:
    """What run-config ``key`` (kebab- or snake-case) accepts, in words, e.g.
    ``"a finite number in (0, 1]"``, ``"one of ('iid', 'dirichlet', 'pathological')"``."""
    info = _field_info(key)
    custom = [m.text for m in info.metadata if isinstance(m, _Allowed)]
    if custom:
        return custom[0]
    ann = info.annotation
    if get_origin(ann) is Literal:
        return f"one of {get_args(ann)}"
    if ann is bool:
        return "true or false"
    if ann is str:
        return "a string"
    bounds = {k: getattr(m, k) for m in info.metadata if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le))
              for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    what = "an integer" if ann is int else "a finite number"
    lo = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    hi = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if lo and hi:
        return f"{what} in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{what} {'>' if lo[0] == '(' else '>='} {_num(lo[1])}"
    if hi:
        return f"{what} {'<' if hi[0] == ')' else '<='} {_num(hi[1])}"
    return what


def _show(value: object, limit: int = 60) -> str:
    """``repr(value)`` (TOML-ish for bools), cut to ``limit`` characters."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def unknown_key_message(key: object) -> str:
    """The error for a key RunConfig does not have: a close key if any, and all accepted keys."""
    keys = RunConfig.keys()
    near = difflib.get_close_matches(str(key).replace("_", "-"), keys, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"unknown run-config key {_show(key)}{hint}; accepted keys: {', '.join(keys)}"


def _value_message(key: str, value: object) -> str:
    msg = f"{key} must be {allowed(key)}, got {_show(value)}"
    choices = get_args(_field_info(key).annotation) if get_origin(_field_info(key).annotation) is Literal else ()
    if choices and isinstance(value, str):
        near = difflib.get_close_matches(value, choices, n=1)
        if near:
            msg += f" (did you mean {near[0]!r}?)"
    return msg


def error_message(err: ValidationError, given: Mapping[str, object] | None = None) -> str:
    """One line for a pydantic ``ValidationError`` of :class:`RunConfig`: per invalid key
    ``<key> must be <allowed>, got <value>`` (``given``: the values as passed, so the
    message shows ``5.5``, not a converted value), joined by ``"; "``."""
    given = given or {}
    out = []
    for e in err.errors():
        loc = e.get("loc", ())
        if e["type"] == "value_error" and not loc:  # a combination check: its own message
            out.append(str(e.get("ctx", {}).get("error", e["msg"])))
        elif e["type"] == "unexpected_keyword_argument" and loc:
            out.append(unknown_key_message(loc[0]))
        elif loc and isinstance(loc[0], str) and loc[0] in RunConfig.__pydantic_fields__:
            out.append(_value_message(loc[0].replace("_", "-"), given.get(loc[0], e.get("input"))))
        else:
            out.append(f"run config: {e['msg']}")
    return "; ".join(dict.fromkeys(out))


_pydantic_init = RunConfig.__init__


def _init(self, *args, **kwargs) -> None:
    try:
        _pydantic_init(self, *args, **kwargs)
    except ValidationError as err:
        raise ValueError(error_message(err, kwargs)) from None


_init.__doc__ = _pydantic_init.__doc__
RunConfig.__init__ = _init  # every construction path raises a plain ValueError naming the key

#: The choices of every ``Literal`` key (kebab-case key -> allowed values).
CHOICES: dict[str, tuple[str, ...]] = {
    f.name.replace("_", "-"): get_args(RunConfig.__pydantic_fields__[f.name].annotation)
    for f in fields(RunConfig) if get_origin(RunConfig.__pydantic_fields__[f.name].annotation) is Literal
}


def _keys_doc() -> str:
    lines = ["", "    Keys", "    ----"]
    for f in fields(RunConfig):
        key = f.name.replace("_", "-")
        info = RunConfig.__pydantic_fields__[f.name]
        lines.append(f"    {key} : {allowed(key)}, default {_show(f.default)}")
        if info.description:
            lines.append(f"        {info.description}")
    return "\n".join(lines) + "\n"


RunConfig.__doc__ = (RunConfig.__doc__ or "").rstrip() + "\n" + _keys_doc()
