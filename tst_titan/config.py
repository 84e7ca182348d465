"""The ``[tst]`` and ``[data]`` TOML sections, merged into torchtitan's JobConfig.

torchtitan 0.2.2 merges the dataclass named ``JobConfig`` of the module given by
``--job.custom_config_module`` into its own config; ``python -m tst_titan.train``
passes this module for you. CLI overrides follow torchtitan's style:
``--tst.bag_size 6``, ``--tst.switch_step 300``, ``--tst.enable`` / ``--tst.no-enable``.
"""


from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TST:
    enable: bool = False
    """Train the first part of the run in superposition (TST phase 1)."""

    bag_size: int = 6
    """s: tokens per bag. Each model position sees the mean embedding of s tokens."""

    superposition_ratio: float | None = None
    """r in [0, 1): fraction of training.steps spent in phase 1 (default 0.3 when
    neither this nor switch_step is given). Give exactly one of the two."""

    switch_step: int | None = None
    """Number of phase-1 steps: steps 1..switch_step superpose, step switch_step+1
    is the first next-token step. Give exactly one of this and superposition_ratio."""

    mode: Literal["full", "input_only", "output_only"] = "full"
    """Ablations of the paper: superpose inputs and outputs (full), only the
    inputs (next-token labels), or only the outputs (single-token inputs, next-bag
    labels)."""

    bag_weighting: Literal["uniform", "power_law"] = "uniform"
    """Slot weights of the multi-hot loss: uniform 1/s, or w_j proportional to 1/j
    (the paper found power_law better and more stable for s >= 8)."""

    at_switch: Literal["continue", "reset_optimizer"] = "continue"
    """continue: optimizer state and LR schedule run on through the switch (paper).
    reset_optimizer: clear optimizer state and restart LR warm-up at the switch."""

    fused_loss: bool = False
    """Compute the output projection and the loss together over row chunks, so the
    [N, V] logits never exist at once (multi-hot in phase 1, cross-entropy in phase 2
    and validation); works with or without tst.enable. Not with tensor parallel."""

    fused_loss_chunk_size: int = 1024
    """Positions per chunk of tst.fused_loss: one chunk's logits (chunk x vocab) are
    alive at a time; larger chunks mean fewer, larger matmuls."""


@dataclass
class Data:
    text_field: str = "text"
    """Column holding the text in jsonl / parquet / Hugging Face datasets."""

    hf_config: str = ""
    """Hugging Face dataset config name (training.dataset = "hf"), e.g. "en"."""

    hf_split: str = "train"
    """Hugging Face split used for training."""

    hf_validation_split: str = "validation"
    """Hugging Face split used for validation."""

    embedded_vocab_size: int = 2048
    """Vocabulary of the BPE tokenizer trained on the embedded corpus
    (model.hf_assets_path = "embedded"); must not exceed the model's vocab_size."""

    strict_budget: bool = False
    """Refuse to start when the planned run would read the training data more than once
    (otherwise: a warning with the number of epochs)."""

    trace: bool = False
    """Append a SHA-1 of every step's batch (inputs and labels, all microbatches) to
    <dump_folder>/data_trace/rank<r>.jsonl: proof that a resumed run served the same
    tokens as an uninterrupted one. Cheap, but off by default."""

    shuffle_seed: int = 1234
    """Seed of the document order of map-style sources (embedded, local files);
    each epoch is reshuffled with shuffle_seed + epoch."""


@dataclass
class JobConfig:
    tst: TST = field(default_factory=TST)
    data: Data = field(default_factory=Data)
