"""Training configuration: typed dataclasses read from YAML, with `key=value` overrides.

Every section is a frozen dataclass; a wrong key, type or value raises `ConfigError` naming the
file, the dotted key and the value, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Union

import yaml

from ..config import (
    DEFAULT_LORA_TARGETS,
    DTYPE_NAMES,
    AdapterType,
    AttentionImpl,
    LoraConfig,
    ModelOptions,
    OffloadMode,
    QKVMode,
    QuantizeMode,
    RematPolicy,
)


class ConfigError(ValueError):
    """A training config value is missing, unknown or invalid; the message names file and key."""


# ---- sections ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The frozen base model and how to run it (maps to `ModelOptions`)."""

    path: str = ""  # diffusers transformer folder (config.json + safetensors) or a merged file
    param_dtype: str = "bfloat16"  # storage dtype of the frozen base weights
    dtype: str = "bfloat16"  # activation dtype; LoRA params and the loss stay fp32
    remat: RematPolicy = "full"
    attention: AttentionImpl = "auto"  # see ModelOptions
    scan_layers: bool = True
    quantize: QuantizeMode | None = None  # weight-only quantized frozen base (docs/quantization.md)
    offload: OffloadMode = "none"  # base: frozen block weights in host memory, streamed per layer


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 32
    alpha: float | None = None  # None: alpha = rank (scale 1, as DiffSynth)
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    qkv_mode: QKVMode = "split"
    init_from: str | None = None  # start from a standard LoRA file (split mode)
    seed: int = 0  # A initialisation
    type: AdapterType = "lora"  # lora | dora (PEFT's weight-decomposed LoRA) | lokr (LyCORIS Kronecker product)
    lokr_factor: int = -1  # LoKr factor sizes as LyCORIS's factorization(dim, factor); -1: most balanced
    # regular expressions (re.search) over diffusers module names, e.g. transformer_blocks\.(1[0-9])\.
    include: tuple[str, ...] = ()  # empty: every module of `targets`
    exclude: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)  # {regex: rank}, PEFT's matching
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)  # {regex: alpha}


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """One cache of a mixed run (`data.datasets`): its folder and how many times each sample counts per epoch."""

    path: str = ""
    repeats: int = 1  # musubi-tuner's num_repeats: every sample appears this many times in each epoch


@dataclasses.dataclass(frozen=True)
class DataSection:
    path: str = ""  # cached dataset folder (manifest.json + shards), see training/data.py
    datasets: tuple[DatasetEntry, ...] = ()  # several caches instead of `path`: [{path: …, repeats: 2}, …]
    caption_dropout: float = 0.0  # probability a sample trains on its cached empty prompt (with its images)
    batch_size: int = 1  # global micro-batch (all hosts together)
    text_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)  # prompt lengths are padded up to one of these
    shuffle: bool = True
    seed: int = 0
    verify: bool = False  # check every shard's sha256 before training
    prefetch: int = 2  # batches loaded ahead in a background thread

    def sources(self) -> tuple[tuple[str, str, int], ...]:
        """(config key, cache folder, repeats) of every cache the run reads: `path` or each `datasets` entry."""
        if self.datasets:
            return tuple((f"data.datasets[{i}].path", e.path, e.repeats) for i, e in enumerate(self.datasets))
        return (("data.path", self.path, 1),)


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
    """Flow matching: x_σ = (1−σ)·x0 + σ·ε, target ε − x0, loss on target tokens only."""

    timestep_sampling: Literal["diffsynth", "uniform", "logit_normal", "resolution_shift"] = "diffsynth"
    weighting: Literal["auto", "bell", "none"] = "auto"  # auto: bell for diffsynth/resolution_shift
    num_train_timesteps: int = 1000
    mu: float = 0.8  # DiffSynth's fixed exponential shift for training
    shift_terminal: float | None = 0.02
    logit_mean: float = 0.0
    logit_std: float = 1.0
    base_shift: float = 0.5  # resolution_shift: mu = base_shift @ base_seq_len … max_shift @ max_seq_len
    max_shift: float = 0.9
    base_seq_len: int = 256
    max_seq_len: int = 8192
    # masked loss (caches with `mask`s): weights below this are raised to it (0: masked-out pixels do not count)
    mask_min_weight: float = 0.0
    # musubi-tuner's --min_timestep / --max_timestep, on the 0…num_train_timesteps scale (t = σ·1000):
    # timesteps are drawn only from the part of the σ grid in [min_timestep, max_timestep]; null = no bound
    min_timestep: float | None = None
    max_timestep: float | None = None


Optimizer = Literal["adamw", "adafactor", "prodigy", "schedule_free_adamw"]


@dataclasses.dataclass(frozen=True)
class OptimSection:
    # adamw: optax.adamw; adafactor: optax.adafactor (HF's scale_parameter=False, relative_step=False);
    # prodigy: optax.contrib.prodigy (learning_rate multiplies its estimated step size: 1.0 as in its paper);
    # schedule_free_adamw: optax.contrib.schedule_free_adamw (export, validation, EMA use its evaluation params)
    optimizer: Optimizer = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # end value of cosine/linear decay, as a fraction of learning_rate
    # Length of the warm-up + decay schedule. null: train.max_steps of the run's first start; a resumed
    # run keeps the length recorded in its checkpoint (a new --max-steps trains on at the final LR)
    # unless this is set, which re-stretches the schedule from the resumed step on.
    schedule_steps: int | None = None
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    grad_accum: int = 1
    lora_plus_ratio: float | None = None  # LoRA+ (musubi-tuner's loraplus_lr_ratio): lora_B leaves train at lr × ratio


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh for multi-device runs (`qwen_edit_jax.parallel.make_mesh`); `enabled: false` = one device."""

    enabled: bool = False
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainSection:
    max_steps: int = 1000
    save_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 1
    seed: int = 0  # noise and timestep RNG
    async_checkpointing: bool = True
    progress: bool = True
    tensorboard: bool = True  # TensorBoard event files in DIR/tensorboard (metrics.jsonl is always written)
    # EMA of the adapter weights (SimpleTuner's --ema_decay): decay min(ema_decay, (1+t)/(10+t)) at its t-th
    # update, as diffusers' EMAModel; checkpointed, exported as lora_<format>_ema.safetensors, used by validation
    ema_decay: float | None = None
    # seconds the checkpoint save after a preemption notice (SIGTERM) may take; past it the process exits with
    # the preemption status anyway and a rerun resumes from the previous complete checkpoint
    preemption_timeout: float = 60.0


@dataclasses.dataclass(frozen=True)
class ValidationPrompt:
    """One validation edit: an instruction and its control image(s), as the pipeline takes them."""

    prompt: str = ""
    images: tuple[str, ...] = ()  # control image paths (Edit: one; Edit-2509/2511: one or more)
    negative_prompt: str | None = None  # None: `validation.negative_prompt`


@dataclasses.dataclass(frozen=True)
class ValidationSection:
    """Periodic validation every `every` steps (0 = off), run sharded like training.

    `prompts`: edited images through the JAX pipeline's stages, saved as before/after PNG grids in
    `DIR/validation/` and TensorBoard (`training/validation.py`). `samples`: dataset indices whose
    sampled latents' RMS distance to the cached target is logged (`sampling.validation_distance`).
    """

    every: int = 0
    prompts: tuple[ValidationPrompt, ...] = ()
    repo: str | None = None  # text encoder, VAE, processor, scheduler; None: model.path's parent folder
    resolution: int = 1024  # output/VAE area resolution² (the pipelines' 1024²), at the last image's aspect
    negative_prompt: str = " "  # for prompts without their own, when true_cfg_scale > 1
    samples: tuple[int, ...] = ()  # dataset indices for the latent distance
    num_inference_steps: int = 20
    true_cfg_scale: float = 4.0
    seed: int = 0
    # a FlowMatchEulerDiscreteScheduler config JSON (e.g. Qwen-Image-Lightning's) for both kinds of validation;
    # None: the repo's scheduler/scheduler_config.json for the images, Qwen-Image's schedule for the distance
    scheduler_config: str | None = None


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """LoRA files written at the end as `DIR/lora_<format>.safetensors` (standard separate q/k/v keys)."""

    # null: the adapter type's standard keys — [diffusers] for lora and dora (PEFT), [comfyui] for lokr (LyCORIS)
    formats: tuple[Literal["diffusers", "comfyui", "kohya", "diffsynth"], ...] | None = None
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class WandbSection:
    """Weights & Biases run (`pip install wandb`): the scalars and validation grids TensorBoard gets."""

    project: str = ""
    entity: str | None = None
    name: str | None = None  # None: wandb's generated name
    mode: Literal["online", "offline", "disabled"] | None = None  # None: wandb's default (WANDB_MODE)


@dataclasses.dataclass(frozen=True)
class LogSection:
    wandb: WandbSection | None = None  # None: no wandb


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    objective: ObjectiveSection = ObjectiveSection()
    optim: OptimSection = OptimSection()
    mesh: MeshSection = MeshSection()
    train: TrainSection = TrainSection()
    validation: ValidationSection = ValidationSection()
    export: ExportSection = ExportSection()
    log: LogSection = LogSection()

    # ---- derived runtime objects -----------------------------------------------------------------
    def export_formats(self) -> tuple[str, ...]:
        """`export.formats`, or the adapter type's standard key style when it is null."""
        if self.export.formats is not None:
            return self.export.formats
        return ("comfyui",) if self.lora.type == "lokr" else ("diffusers",)

    def lora_config(self) -> LoraConfig:
        lo = self.lora
        return LoraConfig(rank=lo.rank, alpha=lo.alpha, targets=lo.targets, qkv_mode=lo.qkv_mode, type=lo.type,
                          lokr_factor=lo.lokr_factor, include=lo.include, exclude=lo.exclude,
                          rank_pattern=lo.rank_pattern, alpha_pattern=lo.alpha_pattern)

    def model_options(self) -> ModelOptions:
        m = self.model
        return ModelOptions(param_dtype=m.param_dtype, dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
                            attention=m.attention, fuse_qkv=True, lora=self.lora_config(), quantize=m.quantize,
                            offload=m.offload)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> TrainConfig:
        return dataclasses.replace(self, **sections)


# ---- validation of values beyond types --------------------------------------------------------------
def _check_values(cfg: TrainConfig, where: str) -> None:
    problems: list[str] = []

    def need(cond: bool, key: str, value: Any, msg: str) -> None:
        if not cond:
            problems.append(f"{key}={value!r}: {msg}")

    m, lo, d, ob, op, tr = cfg.model, cfg.lora, cfg.data, cfg.objective, cfg.optim, cfg.train
    need(bool(m.path), "model.path", m.path, "required (a diffusers transformer folder)")
    if d.path and d.datasets:
        problems.append(f"data.datasets={[e.path for e in d.datasets]!r}: set data.path (one cache) or "
                        f"data.datasets (several), not both")
    else:
        need(bool(d.path) or bool(d.datasets), "data.path", d.path,
             "required (a cached dataset folder), or data.datasets (several)")
    for i, e in enumerate(d.datasets):
        need(bool(e.path), f"data.datasets[{i}].path", e.path, "required (a cached dataset folder)")
        need(e.repeats >= 1, f"data.datasets[{i}].repeats", e.repeats, "must be >= 1")
    need(0 <= d.caption_dropout < 1, "data.caption_dropout", d.caption_dropout, "must be in [0, 1)")
    need(0 <= ob.mask_min_weight <= 1, "objective.mask_min_weight", ob.mask_min_weight, "must be in [0, 1]")
    for key in ("param_dtype", "dtype"):
        v = getattr(m, key)
        need(v in DTYPE_NAMES, f"model.{key}", v, f"choose one of {sorted(DTYPE_NAMES)}")
    need(cfg.export.dtype in DTYPE_NAMES, "export.dtype", cfg.export.dtype, f"choose one of {sorted(DTYPE_NAMES)}")
    need(lo.rank > 0, "lora.rank", lo.rank, "must be positive")
    need(lo.alpha is None or lo.alpha > 0, "lora.alpha", lo.alpha, "must be positive (or null for alpha = rank)")
    need(len(lo.targets) > 0, "lora.targets", list(lo.targets), "at least one target module")
    need(lo.lokr_factor == -1 or lo.lokr_factor > 0, "lora.lokr_factor", lo.lokr_factor, "must be -1 or positive")
    if lo.type == "dora":
        need(m.quantize is None and m.offload == "none", "lora.type", lo.type,
             "DoRA needs the base weights on the device in float: not with model.quantize or model.offload")
        bad = [f for f in cfg.export_formats() if f != "diffusers"]
        need(not bad, "export.formats", list(cfg.export_formats()), "DoRA is written with PEFT's keys: use [diffusers]")
    if lo.type == "lokr":
        bad = [f for f in cfg.export_formats() if f not in ("comfyui", "kohya")]
        need(not bad, "export.formats", list(cfg.export_formats()),
             "LoKr is written with LyCORIS keys: use [comfyui] and/or [kohya]")
    need(d.batch_size > 0, "data.batch_size", d.batch_size, "must be positive")
    need(len(d.text_buckets) > 0 and all(b > 0 for b in d.text_buckets), "data.text_buckets",
         list(d.text_buckets), "a non-empty list of positive lengths")
    need(d.prefetch >= 0, "data.prefetch", d.prefetch, "must be >= 0")
    need(ob.num_train_timesteps >= 2, "objective.num_train_timesteps", ob.num_train_timesteps, "must be >= 2")
    need(ob.shift_terminal is None or 0 < ob.shift_terminal < 1, "objective.shift_terminal", ob.shift_terminal,
         "must be in (0, 1) or null")
    need(ob.logit_std > 0, "objective.logit_std", ob.logit_std, "must be positive")
    need(ob.max_seq_len > ob.base_seq_len, "objective.max_seq_len", ob.max_seq_len, "must exceed base_seq_len")
    need(op.learning_rate > 0, "optim.learning_rate", op.learning_rate, "must be positive")
    need(op.weight_decay >= 0, "optim.weight_decay", op.weight_decay, "must be >= 0")
    need(0 <= op.b1 < 1, "optim.b1", op.b1, "must be in [0, 1)")
    need(0 <= op.b2 < 1, "optim.b2", op.b2, "must be in [0, 1)")
    need(op.eps > 0, "optim.eps", op.eps, "must be positive")
    need(op.warmup_steps >= 0, "optim.warmup_steps", op.warmup_steps, "must be >= 0")
    need(0 <= op.min_lr_ratio <= 1, "optim.min_lr_ratio", op.min_lr_ratio, "must be in [0, 1]")
    need(op.max_grad_norm is None or op.max_grad_norm >= 0, "optim.max_grad_norm", op.max_grad_norm,
         "must be >= 0 (0 or null disables clipping)")
    need(op.grad_accum >= 1, "optim.grad_accum", op.grad_accum, "must be >= 1")
    need(op.lora_plus_ratio is None or op.lora_plus_ratio > 0, "optim.lora_plus_ratio", op.lora_plus_ratio,
         "must be positive (or null: off)")
    if op.optimizer == "prodigy":
        need(op.lora_plus_ratio is None, "optim.lora_plus_ratio", op.lora_plus_ratio,
             "not with optim.optimizer=prodigy (it estimates one step size for all adapters); set it to null")
        need(op.learning_rate >= 0.1, "optim.learning_rate", op.learning_rate,
             "with optim.optimizer=prodigy it multiplies Prodigy's estimated step size: use about 1.0")
    if op.optimizer == "schedule_free_adamw":
        need(op.schedule == "constant", "optim.schedule", op.schedule,
             "must be constant with optim.optimizer=schedule_free_adamw (it replaces the decay; warmup_steps applies)")
        need(op.b1 > 0, "optim.b1", op.b1, "must be > 0 with optim.optimizer=schedule_free_adamw (its interpolation)")
    need(tr.ema_decay is None or 0 < tr.ema_decay < 1, "train.ema_decay", tr.ema_decay,
         "must be in (0, 1), e.g. 0.999 (or null: off)")
    n = ob.num_train_timesteps
    need(ob.min_timestep is None or 0 <= ob.min_timestep < n, "objective.min_timestep", ob.min_timestep,
         f"must be in [0, {n}) (objective.num_train_timesteps) or null")
    need(ob.max_timestep is None or 0 < ob.max_timestep <= n, "objective.max_timestep", ob.max_timestep,
         f"must be in (0, {n}] (objective.num_train_timesteps) or null")
    need(ob.min_timestep is None or ob.max_timestep is None or ob.min_timestep < ob.max_timestep,
         "objective.max_timestep", ob.max_timestep, f"must exceed objective.min_timestep={ob.min_timestep}")
    if cfg.log.wandb is not None:
        need(bool(cfg.log.wandb.project), "log.wandb.project", cfg.log.wandb.project, "required when log.wandb is set")
    need(op.schedule_steps is None or op.schedule_steps >= 1, "optim.schedule_steps", op.schedule_steps,
         "must be >= 1 (or null: the run's train.max_steps)")
    need(tr.max_steps >= 1, "train.max_steps", tr.max_steps, "must be >= 1")
    need(tr.save_every >= 1, "train.save_every", tr.save_every, "must be >= 1")
    need(tr.keep_checkpoints >= 1, "train.keep_checkpoints", tr.keep_checkpoints, "must be >= 1")
    need(tr.log_every >= 1, "train.log_every", tr.log_every, "must be >= 1")
    need(tr.preemption_timeout > 0, "train.preemption_timeout", tr.preemption_timeout, "must be > 0 (seconds)")
    need(cfg.validation.every >= 0, "validation.every", cfg.validation.every, "must be >= 0 (0 = off)")
    v = cfg.validation
    need(v.num_inference_steps >= 1, "validation.num_inference_steps", v.num_inference_steps, "must be >= 1")
    need(v.every == 0 or v.prompts or v.samples, "validation.every", v.every,
         "needs validation.prompts (images) or validation.samples (latent distance)")
    need(v.resolution >= 16, "validation.resolution", v.resolution, "must be >= 16 pixels")
    need(v.true_cfg_scale >= 1, "validation.true_cfg_scale", v.true_cfg_scale, "must be >= 1 (1 = no CFG)")
    for i, p in enumerate(v.prompts):
        need(bool(p.prompt.strip()), f"validation.prompts[{i}].prompt", p.prompt, "must not be empty")
        need(len(p.images) >= 1, f"validation.prompts[{i}].images", list(p.images),
             "at least one control image (the edit pipelines need one)")
    for key in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, key)
        need(v == -1 or v >= 1, f"mesh.{key}", v, "must be >= 1 or -1 (all remaining devices)")
    try:
        cfg.lora_config()
    except ValueError as e:
        problems.append(f"lora: {e}")
    if problems:
        raise ConfigError(f"{where}: invalid training config: " + "; ".join(problems))


# ---- generic dict → dataclass with type checks ----------------------------------------------------
def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key}={value!r} is not {expected}")

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"a list of {len(args)} items")
        return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {_coerce(k, args[0], f"{key}.{k}", where): _coerce(v, args[1], f"{key}.{k}", where)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("a mapping")
        return _build(tp, value, key, where)
    return value


def _build(cls: type, d: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        dotted = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise ConfigError(f"{where}: unknown config key(s) {dotted}; "
                          f"{'section ' + prefix if prefix else 'the top level'} accepts {names}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, where) for k, v in d.items()}
    return cls(**kwargs)


RUN_INFO_KEY = "run_info"  # extra, informational section of run.json; ignored when read back as a config


def config_from_dict(d: dict[str, Any], *, source: str = "config") -> TrainConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(d).__name__}")
    d = {k: v for k, v in d.items() if k != RUN_INFO_KEY}
    cfg = _build(TrainConfig, d, "", source)
    _check_values(cfg, source)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.learning_rate=3e-4` → (['optim', 'learning_rate'], 3e-4); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.strip().split("."), value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    d = _to_plain(dict(d))
    for item in overrides:
        path, value = parse_override(item)
        node = d
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return d


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(d).__name__}")
    return d


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or defaults when `path` is None) and apply `key=value` overrides."""
    d = read_yaml(path) if path is not None else {}
    source = os.fspath(path) if path is not None else "config"
    if overrides:
        d = apply_overrides(d, overrides)
        source += " (with overrides)"
    return config_from_dict(d, source=source)
