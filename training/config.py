"""Settings of data preparation, tokenizer and model training, evaluation and the cost report.

Training owns them; ``services.config.GenloopConfig`` composes them into the one YAML file.
``Section`` is the base of every config section, in every package: unknown keys are an error
that names the key, because a typo silently ignored is a production incident waiting to happen.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, values re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    txt_mode: Literal["file", "paragraph"] = Field(
        "paragraph", description="How .txt files become documents: the whole file, or one per blank-line paragraph."
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl/.json/.csv/.parquet sources.")
    licence: str = Field("unknown", description="Licence recorded for sources that do not state one.")
    min_chars: int = Field(64, ge=1, description="Documents shorter than this (after normalisation) are dropped.")
    max_chars: int = Field(20_000, ge=1, description="Documents longer than this are dropped.")
    max_symbol_share: float = Field(
        0.35, ge=0, le=1, description="Drop documents whose share of non-printable or symbol characters exceeds this."
    )
    max_repeated_line_share: float = Field(
        0.5, ge=0, le=1, description="Drop documents whose share of repeated (non-unique) lines exceeds this."
    )
    near_dup_threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard similarity at or above which a document is a near duplicate."
    )
    minhash_num_perm: int = Field(128, ge=16, description="MinHash permutations; more is more exact and slower.")
    shingle_words: int = Field(5, ge=1, description="Word n-gram size of the shingles MinHash compares.")
    scrub_pii: bool = Field(False, description="Replace e-mails, phone numbers and IP addresses with placeholders.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of documents (chosen by content hash, stable across versions) held out."
    )
    max_documents_per_source: int | None = Field(
        None, ge=1, description="Cap on documents read from one source, for quick runs; None reads everything."
    )


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=300, description="Byte-level BPE vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="A merge must occur at least this often in the train split.")


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights; merged on export.")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None lets peft pick the defaults for the architecture."
    )


class TrainConfig(Section):
    preset: str = Field("tiny", description="Model preset when training from scratch (see `genloop train --help`).")
    block_size: int = Field(128, ge=8, description="Tokens per packed training sequence.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not on biases and norms).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before the cosine decay.")
    max_steps: int = Field(300, ge=1, description="Optimizer steps at most.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    eval_every: int = Field(50, ge=1, description="Validate (and checkpoint) every this many optimizer steps.")
    eval_batches: int = Field(8, ge=1, description="Validation micro-batches per worker per validation.")
    patience: int = Field(3, ge=1, description="Stop after this many validations without improvement.")
    min_delta: float = Field(1e-3, ge=0, description="Validation loss must drop by more than this to count.")
    seed: int = Field(0, description="Seed for weights, data order and sampling.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel replicas).")
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 autocast on CUDA.")
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="CPUs reserved per training worker (torch threads = max(1, round(this))). Leave at least one "
        "CPU of the cluster unreserved: Ray Data needs it to stream the shards.",
    )
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="Where Ray puts the workers: PACK fills a node before the next (fast collectives), "
        "SPREAD puts them on as many nodes as it can (a node lost takes fewer workers with it).")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts (resuming from the last checkpoint).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA fine-tuning.")


def _ordered_multiples(bounds: tuple[float, float]) -> tuple[float, float]:
    if not 0 < bounds[0] <= bounds[1]:
        raise ValueError("give two multiples 0 < low <= high")
    return bounds


# Multiples of train.learning_rate a search samples between (a retrain's, ``genloop tune``'s).
LearningRateRange = Annotated[tuple[float, float], AfterValidator(_ordered_multiples)]


class TuningConfig(Section):
    """``genloop tune``'s search space over ``train``'s settings (``services.tuning``); its first trial
    is always the settings as they are, so the table shows what tuning bought."""

    trials: int = Field(8, ge=1, le=256, description="Trials, the config's own settings first; each is one Ray "
                        "Train run of train.max_steps at most.")
    learning_rate_range: LearningRateRange = Field(
        (0.3, 3.0), description="Peak learning rates are sampled log-uniformly between these multiples of "
        "train.learning_rate.")
    warmup_fractions: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2], min_length=1,
        description="Warm-up lengths tried, as shares of train.max_steps.")
    micro_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [8, 16, 32], min_length=1,
                                         description="Micro-batch sizes (sequences per worker per step) tried.")
    weight_decays: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [0.0, 0.01, 0.1], min_length=1,
                                       description="AdamW weight decays tried.")
    presets: list[str] = Field(
        default_factory=list, description="Model presets tried when training from scratch; empty tries "
        "train.preset alone. Ignored with --base, whose architecture is fixed.")
    reduction_factor: float = Field(
        2, gt=1, description="ASHA's reduction factor: at each evaluation a trial goes on only when its "
        "validation loss is in the best 1/this of the trials' there.")
    concurrent_trials: int = Field(1, ge=1, description="Trials side by side; raise it on a cluster.")


# The metrics a gate rule may name: the compared fields of training.evaluation.SetMetrics (its BETTER).
# Spelled out because this module must import without torch; tests/unit/test_evaluation.py keeps the two equal.
GateMetric = Literal["perplexity", "bits_per_byte", "bleu", "chrf", "rouge_l", "ms_per_token"]


class EvaluationConfig(Section):
    max_texts: int = Field(200, ge=1, description="Held-out texts per set scored for perplexity.")
    prompts: int = Field(16, ge=1, description="Held-out continuation prompts per set (BLEU/chrF/ROUGE-L, latency).")
    prompt_words: int = Field(24, ge=1, description="Words of a held-out text given as the prompt.")
    reference_words: int = Field(16, ge=1, description="Following words the continuation is scored against.")
    max_new_tokens: int = Field(48, ge=1, description="Greedy tokens generated per prompt.")
    stride: int = Field(64, ge=1, description="Sliding-window stride of perplexity on texts longer than the context.")
    seed: int = Field(0, description="Seed that picks the held-out prompts.")
    samples_in_report: int = Field(8, ge=1, description="Prompts shown side by side in the HTML report.")


class CostConfig(Section):
    price_per_device_hour: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 0.05, "cuda": 3.5},
        description="Price in $ per device-hour, by device type (cpu = per worker, cuda = per GPU).",
    )
    watts_per_device: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 15.0, "cuda": 700.0}, description="Power draw per device, for energy kWh."
    )
    peak_flops_per_device: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 1.0e11, "cuda": 989.0e12},
        description="Peak dense FLOP/s per device (bf16 on GPUs), the denominator of model FLOPs utilisation.",
    )
