"""The training run: load → (resume) → train → checkpoint → export.

Outputs in `output_dir`: `run.json` (the resolved config, readable again with `--config`),
`metrics.jsonl` (one JSON object per logged step), `tensorboard/` (the same scalars and the validation
grids), `validation/step_NNNNNN.png` (before/after edit grids, `training/validation.py`),
`checkpoints/<step>/` (Orbax), and at the end `lora_<format>.safetensors` (standard separate q/k/v
LoRA, via `qwen_edit_jax.lora.adapters`; with `train.ema_decay` also `lora_<format>_ema.safetensors`).
`output_dir` may be a `gs://` prefix (the same layout, written through `utils.storage` and Orbax).
Running the same command again on the same `output_dir` resumes from the newest complete
checkpoint; the data order, noise and timesteps depend only on (seed, step), so a resumed run
ends with bit-identical LoRA weights on the same hardware.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ..cache_format import CachedDataset, DataError
from ..config import DiTConfig
from ..loading import load_transformer
from ..lora.adapters import load_lora_into_adapters, lora_tensors, write_lora_tensors
from ..parallel import batch_sharding, distributed, init_opt_state, make_mesh
from ..parallel.preemption import PreemptionWatcher, deadline
from ..utils import storage
from .checkpoint import TrainCheckpointer
from .config import RUN_INFO_KEY, ConfigError, TrainConfig
from .data import BatchLoader, DatasetMix, require_empty_prompts
from .run_log import RunLog
from .step import ema_params, eval_params, make_optimizer, make_schedule, make_train_step, split_lora
from .validation import Validation, ValidationImages, check_validation_inputs

CHECKPOINT_DIR = "checkpoints"
RUN_JSON = "run.json"
# Sections whose change between runs does not affect the trained weights.
_FREE_KEYS = {"train.max_steps", "train.save_every", "train.keep_checkpoints", "train.log_every", "train.progress",
              "train.async_checkpointing", "train.tensorboard", "train.preemption_timeout", "data.prefetch",
              "data.verify", "export", "validation", "log", "demo"}  # demo: a section of older run.json files
# A missing input under a folder of this name is the demo's: the error says how to make it.
DEMO_DATA_DIR = "demo_data"


class NonFiniteLossError(RuntimeError):
    """Loss, gradient norm or adapter norm became NaN/Inf; stopped before saving anything from that step."""


class TrainingPreempted(RuntimeError):
    """A preemption notice (SIGTERM) stopped the run after `step`, whose checkpoint is complete; nothing was
    exported. The same command resumes (train/train_lora.py exits with `parallel.preemption.EXIT_PREEMPTED`)."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; checkpoint saved; run the same command to resume")
        self.step = step


@dataclasses.dataclass
class TrainResult:
    output_dir: str
    final_step: int
    resumed_from: int | None
    first_loss: float | None  # mean loss of the first `loss_steps` steps of this run (None if no step ran)
    last_loss: float | None  # mean loss of the last `loss_steps` steps (disjoint from the first when ≥ 2 ran)
    lora_files: list[str]
    seconds: float
    lora_params: Any = None  # the trained LoRA parameters as exported (pure dict, as `split_lora` returns them;
    # schedule-free: its evaluation parameters)
    loss_steps: int = 0  # steps averaged in first_loss / last_loss: min(10, steps run // 2), at least 1
    schedule_steps: int | None = None  # length of the learning-rate schedule this run followed
    ema_params: Any = None  # the EMA of the adapters (`train.ema_decay`), as exported to lora_<format>_ema


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute input paths (run.json must name the base checkpoint unambiguously); `gs://` URLs as written."""
    model = dataclasses.replace(cfg.model, path=storage.normalize(cfg.model.path))
    data = dataclasses.replace(
        cfg.data, path=cfg.data.path and storage.normalize(cfg.data.path),
        datasets=tuple(dataclasses.replace(e, path=storage.normalize(e.path)) for e in cfg.data.datasets))
    lora = cfg.lora
    if lora.init_from:
        lora = dataclasses.replace(lora, init_from=storage.normalize(lora.init_from))
    v = cfg.validation
    validation = dataclasses.replace(
        v, repo=v.repo and os.path.abspath(v.repo),
        prompts=tuple(dataclasses.replace(p, images=tuple(os.path.abspath(i) for i in p.images)) for p in v.prompts))
    return cfg.replace(model=model, data=data, lora=lora, validation=validation)


def check_inputs(cfg: TrainConfig) -> None:
    """Every input the run reads exists; reads and creates nothing else.

    A missing one is a one-line `ConfigError` naming the key and the path as written; for a path under
    a `demo_data/` folder it also says how to make the demo's inputs.
    """
    _require_path("model.path", cfg.model.path)
    for key, path, _ in cfg.data.sources():
        _require_path(key, path)
    if cfg.lora.init_from:
        _require_path("lora.init_from", cfg.lora.init_from)
        if storage.isdir(cfg.lora.init_from):
            raise ConfigError(f"lora.init_from: {cfg.lora.init_from} is not a LoRA file")
    check_validation_inputs(cfg)
    if cfg.log.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={cfg.to_dict()['log']['wandb']}: the wandb package is not installed "
                          f"(pip install wandb, or pip install 'qwen-edit-jax[wandb]')")


def _require_path(key: str, path: str) -> None:
    try:
        storage.check_scheme(path, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if storage.exists(path) if storage.is_remote(path) else os.path.lexists(path):
        return
    parts = os.path.normpath(path).split(os.sep)
    hint = ""
    if DEMO_DATA_DIR in parts:
        out = os.sep.join(parts[: parts.index(DEMO_DATA_DIR) + 1]) or os.sep
        hint = f" (make the demo's inputs with: python -m qwen_edit_jax.demo --out {out})"
    raise ConfigError(f"{key}: {path} does not exist{hint}")


def _has_checkpoint(output_dir: str) -> bool:
    """An Orbax step (a purely numeric folder; on a bucket perhaps not committed) exists under
    output_dir/checkpoints."""
    return any(n.isdigit() for n in storage.listdir(storage.join(output_dir, CHECKPOINT_DIR)))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose value differs between two config dicts and that change what is trained. A key that `old`
    lacks (a run.json written before the key existed) counts as its default."""
    a, b = _flat(old), _flat(new)
    a = {**{k: v for k, v in _flat(TrainConfig().to_dict()).items() if k not in a}, **a}
    changed = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".") for f in _FREE_KEYS):
            changed.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return changed


def _write_json(path: str, obj: Any) -> None:
    storage.write_text(path, json.dumps(obj, indent=2) + "\n")


def open_datasets(cfg: TrainConfig) -> DatasetMix:
    """The run's caches (`data.path` or every `data.datasets` entry) with their repeats."""
    return DatasetMix([(CachedDataset(path, verify=cfg.data.verify), repeats)
                       for _, path, repeats in cfg.data.sources()])


def check_data_matches_model(dataset: CachedDataset | DatasetMix, dit: DiTConfig) -> None:
    """Every cache's latent channels and text width are the model's (the error names the cache)."""
    if isinstance(dataset, DatasetMix):
        for d in dataset.datasets:
            check_data_matches_model(d, dit)
        return
    channels = dit.in_channels // (dit.patch_size**2)
    if dataset.latent_channels != channels:
        raise DataError(f"{dataset.path}: latents have {dataset.latent_channels} channels, the model expects "
                        f"{channels} (in_channels {dit.in_channels} = {dit.patch_size}x{dit.patch_size} x channels)")
    if dataset.joint_attention_dim != dit.joint_attention_dim:
        raise DataError(f"{dataset.path}: prompt embeddings are {dataset.joint_attention_dim} wide, the model's "
                        f"joint_attention_dim is {dit.joint_attention_dim}")


def _make_mesh(cfg: TrainConfig):
    if not cfg.mesh.enabled:
        return None
    return make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor)


def export_lora(model: nnx.Module, output_dir: str, cfg: TrainConfig, *, suffix: str = "") -> list[str]:
    """Write the trained adapters in each `cfg.export_formats()` style as `lora_<format><suffix>.safetensors`
    (`suffix="_ema"`: the EMA weights). Every process calls this (adapters spread over several hosts are
    gathered slice by slice); only process 0 writes files."""
    paths = []
    for fmt in cfg.export_formats():
        tensors = lora_tensors(model, format=fmt, dtype=cfg.export.dtype)
        path = storage.join(output_dir, f"lora_{fmt}{suffix}.safetensors")
        if jax.process_index() == 0:
            meta = {"qwen_edit_jax.base_model": cfg.model.path}
            if suffix == "_ema":
                meta["qwen_edit_jax.ema_decay"] = str(cfg.train.ema_decay)
            with storage.staged_file(path) as tmp:  # a bucket: written locally, uploaded whole
                write_lora_tensors(tmp, tensors, format=fmt, metadata=meta)
        paths.append(path)
    return paths


def train(cfg: TrainConfig, output_dir: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) the LoRA training described by `cfg` into `output_dir`.

    `output_dir` is a local folder or a `gs://` prefix. Inputs are checked before anything is written; a run
    that fails before its first checkpoint removes the output folder if this call created it (an existing
    folder is never removed). A SIGTERM (preemption notice) ends the run after the step in progress with that
    step checkpointed on every process: `TrainingPreempted`, nothing exported; calling `train` again resumes
    (`parallel.preemption`).
    """
    is_main = jax.process_index() == 0
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if is_main else None)
    output_dir = storage.check_output(output_dir, "output_dir")
    check_inputs(cfg)
    cfg = resolve_paths(cfg)
    created = not storage.exists(output_dir)
    if not storage.is_remote(output_dir):  # a bucket has no folders: objects make their prefix
        os.makedirs(output_dir, exist_ok=True)
    try:
        return _train(cfg, output_dir, log, is_main)
    except BaseException:
        if created and is_main and not _has_checkpoint(output_dir):
            try:  # nothing a resume could use: leave no folder behind
                storage.remove_tree(output_dir)
            except OSError:
                pass
        raise


def _train(cfg: TrainConfig, output_dir: str, log: Callable[[str], None], is_main: bool) -> TrainResult:
    t_start = time.perf_counter()
    dataset = open_datasets(cfg)
    if cfg.data.caption_dropout:
        require_empty_prompts(dataset)  # before the model loads
    mesh = _make_mesh(cfg)
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(contextlib.closing(TrainCheckpointer(
            storage.join(output_dir, CHECKPOINT_DIR), keep=cfg.train.keep_checkpoints,
            async_save=cfg.train.async_checkpointing)))
        resumed = ckpt.latest_step()
        # from here a SIGTERM ends the run at a step boundary with a checkpoint (`TrainingPreempted`)
        preemption = stack.enter_context(PreemptionWatcher(start=resumed or 0))
        # prompts are encoded before the DiT loads, and the text encoder released: never both in memory
        images = ValidationImages.prepare(cfg, mesh, log) if cfg.validation.every and cfg.validation.prompts else None
        dit_config, graphdef, params, base, local_rows = _load_model(cfg, dataset, mesh)
        # the optimiser state's structure does not depend on the schedule's length (fixed after resuming)
        tx, _ = make_optimizer(cfg.optim, cfg.train.max_steps, ema_decay=cfg.train.ema_decay)
        opt_state = init_opt_state(tx, params, mesh)
        if mesh is None:  # committed to the device, as a restored checkpoint is: a resumed run compiles the same
            params, opt_state = jax.device_put((params, opt_state), jax.devices()[0])  # program (cache hit)
        loader = stack.enter_context(contextlib.closing(_open_loader(cfg, dataset, local_rows, log)))
        run_path = storage.join(output_dir, RUN_JSON)
        rng, start, schedule_steps = jax.random.key(cfg.train.seed), 0, cfg.optim.schedule_steps or cfg.train.max_steps
        if resumed is not None:
            params, opt_state, rng, start, schedule_steps = _resume(cfg, ckpt, resumed, params, opt_state, loader,
                                                                    run_path, log)
        tx, schedule = make_optimizer(cfg.optim, schedule_steps, ema_decay=cfg.train.ema_decay)
        if is_main:
            _write_json(run_path, {**cfg.to_dict(), RUN_INFO_KEY: _run_info(cfg, dit_config, dataset, loader, params,
                                                                            schedule_steps)})
        run_log = stack.enter_context(contextlib.closing(
            RunLog(output_dir, resumed_step=start, enabled=is_main, tensorboard=cfg.train.tensorboard,
                   wandb=cfg.log.wandb, config=cfg.to_dict())))
        if start < cfg.train.max_steps:
            log("compiling the training step (the first step; can take minutes on the full model) ...")
        bar = None
        if cfg.train.progress and is_main:
            bar = stack.enter_context(tqdm(total=cfg.train.max_steps, initial=start, desc="train", unit="step",
                                           dynamic_ncols=True))
        steps = _Steps(cfg, make_train_step(graphdef, tx, cfg.objective, mesh=mesh, global_batch=cfg.data.batch_size),
                       loader, ckpt, run_log, bar, schedule, schedule_steps, base, rng, log, preemption)
        if cfg.validation.every:
            steps.validation = Validation(cfg, images, dataset, graphdef, mesh, output_dir, write=is_main)
            log(f"validation uses the {validation_weights(cfg)} weights")
            if start == 0:
                steps.validate(0, params, opt_state)
        params, opt_state = steps.run(params, opt_state, start)
        ckpt.wait()
    params, ema = eval_params(opt_state, params), ema_params(opt_state)
    files = export_lora(nnx.merge(graphdef, params, base), output_dir, cfg)
    if ema is not None:
        files += export_lora(nnx.merge(graphdef, ema, base), output_dir, cfg, suffix="_ema")
    for f in files:
        log(f"wrote {f}")
    losses = steps.losses
    n = min(10, max(1, len(losses) // 2))  # first and last windows do not overlap once two steps ran
    return TrainResult(output_dir, max(start, cfg.train.max_steps), resumed,
                       float(np.mean(losses[:n])) if losses else None,
                       float(np.mean(losses[-n:])) if losses else None, files, time.perf_counter() - t_start,
                       params, loss_steps=n if losses else 0, schedule_steps=schedule_steps, ema_params=ema)


def validation_weights(cfg: TrainConfig) -> str:
    """Which adapters validation samples with: `EMA` (train.ema_decay set), else the trained ones
    (schedule-free: its evaluation parameters)."""
    if cfg.train.ema_decay is not None:
        return f"EMA (train.ema_decay={cfg.train.ema_decay})"
    return "schedule-free evaluation" if cfg.optim.optimizer == "schedule_free_adamw" else "trained"


def _open_loader(cfg: TrainConfig, dataset: DatasetMix, local_rows: Any, log: Callable[[str], None]) -> BatchLoader:
    """This process's batches (its rows of each global batch), with a warning for buckets never used."""
    d = cfg.data
    loader = BatchLoader(dataset, batch_size=d.batch_size, grad_accum=cfg.optim.grad_accum,
                         text_buckets=d.text_buckets, shuffle=d.shuffle, seed=d.seed,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         local_rows=local_rows, prefetch=d.prefetch, caption_dropout=d.caption_dropout)
    if loader.skipped:
        log(f"warning: {sum(loader.skipped.values())} samples in buckets smaller than one step "
            f"({loader.per_step} samples) are never used: {loader.skipped}")
    return loader


def _run_info(cfg: TrainConfig, dit_config: DiTConfig, dataset: DatasetMix, loader: BatchLoader, params: Any,
              schedule_steps: int) -> dict[str, Any]:
    """run.json's informational section: the base, the dataset, the adapter size, the machine."""
    return {"base_model": {"path": cfg.model.path, "config": dit_config.to_dict()},
            "dataset": {"path": dataset.path, "num_samples": len(dataset), "fingerprint": dataset.fingerprint,
                        "steps_per_epoch": loader.steps_per_epoch,
                        "buckets": {_bucket_name(k): len(v) for k, v in loader.buckets.items()},
                        "caches": [{"path": d.path, "repeats": r, "num_samples": len(d), "fingerprint": d.fingerprint,
                                    "masks": sum(i.has_mask for i in d.infos)}
                                   for d, r in zip(dataset.datasets, dataset.repeats)]},
            "lora_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
            "schedule_steps": schedule_steps,
            "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
            "jax": jax.__version__}


@dataclasses.dataclass
class _Steps:
    """The step loop: dispatch steps, fetch their metrics in windows, check them, log, save, validate.

    Metrics stay on the device until a step is logged, saved or validated (or, with a progress bar,
    one step late), so the host never waits on a step it does not need yet.
    """

    cfg: TrainConfig
    step_fn: Callable
    loader: BatchLoader
    ckpt: TrainCheckpointer
    run_log: RunLog
    bar: Any  # tqdm or None
    schedule: Callable  # the learning rate per step (logged)
    schedule_steps: int  # its length (saved with each checkpoint)
    base: Any  # the frozen base weights
    rng: jax.Array
    log: Callable[[str], None]
    preemption: PreemptionWatcher | None = None  # asked after every step whether to save and stop
    validation: Validation | None = None
    losses: list[float] = dataclasses.field(default_factory=list)  # every step's loss, in order
    t_fetch: float = 0.0  # when the last metrics arrived

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.optim.grad_accum

    def run(self, params: Any, opt_state: Any, start: int) -> tuple[Any, Any]:
        """Train from step `start` to `train.max_steps`; returns the final LoRA params and optimiser state.
        Raises `TrainingPreempted` after saving the step at which the preemption watcher said stop."""
        tr = self.cfg.train
        window: list[tuple[int, Any]] = []  # (step, on-device metrics) not yet fetched
        self.t_fetch = time.perf_counter()
        for step in range(start, tr.max_steps):
            batch = next(self.loader)
            params, opt_state, m = self.step_fn(params, opt_state, self.base, batch.img_shapes, batch.arrays,
                                                self.rng, step)
            done = step + 1
            window.append((done, m))
            preempted = self.preemption is not None and self.preemption.should_stop(done)
            log_now = done % tr.log_every == 0 or done == tr.max_steps or step == start or preempted
            save_now = done % tr.save_every == 0 or done == tr.max_steps
            validate_now = self.validation is not None and done % self.cfg.validation.every == 0
            if preempted:
                self._report(window, step, batch.epoch, log_now)
                self._save_and_stop(done, params, opt_state)
            if log_now or save_now or validate_now:
                ready, window = window, []  # wait for this step: it is logged, saved or validated
            elif self.bar is not None and len(window) > 1:
                ready, window = window[:-1], window[-1:]  # one step late: the device is busy with this one
            else:
                continue  # keep dispatching; metrics are fetched in one transfer later
            self._report(ready, step, batch.epoch, log_now)
            if save_now:  # every step up to `done` was checked finite in `_report`, so the saved state is too
                self._save(done, params, opt_state)
            if validate_now:
                self.validate(done, params, opt_state)
                self.t_fetch = time.perf_counter()  # the next step's time excludes the validation
        return params, opt_state

    def _report(self, ready: list[tuple[int, Any]], step: int, epoch: int, log_now: bool) -> None:
        """Fetch the ready steps' metrics in one transfer, stop on a non-finite one, log and show the last."""
        fetched = jax.device_get([w[1] for w in ready])
        now = time.perf_counter()
        dt = (now - self.t_fetch) / len(ready)
        self.t_fetch = now
        for (d, _), hm in zip(ready, fetched):
            _check_finite(d, hm, self.ckpt)
            self.losses.append(float(hm["loss"]))
        m = {k: float(v) for k, v in fetched[-1].items()}
        done = ready[-1][0]
        if log_now:
            self.run_log.scalars(done, {"loss": m["loss"], "mse": m["mse"], "lr": float(self.schedule(step)),
                                        "grad_norm": m["grad_norm"], "sigma": m["sigma"], "step_time": dt,
                                        "samples_per_s": self.global_batch / dt, "epoch": epoch})
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", s_step=f"{dt:.3f}",
                                 samples_s=f"{self.global_batch / dt:.1f}")

    def _save(self, done: int, params: Any, opt_state: Any) -> None:
        meta = {"step": done, "data": self.loader.state_dict(),
                "rng": np.asarray(jax.random.key_data(self.rng)).tolist(), "config": self.cfg.to_dict(),
                "schedule_steps": self.schedule_steps}
        # Copies: the next step donates `params`/`opt_state` while the (async) save may still read them.
        self.ckpt.save(done, _copy(params), _copy(opt_state), meta)

    def _save_and_stop(self, done: int, params: Any, opt_state: Any) -> None:
        """Save step `done` with every process, wait for it (at most `train.preemption_timeout` seconds; past it
        the process exits with the preemption status, the unfinished save ignored on resume), then raise
        `TrainingPreempted`. No export, no validation."""
        timeout = self.cfg.train.preemption_timeout

        def too_slow() -> None:  # every process says why it ends
            print(f"preempted at step {done}; its checkpoint was not complete after train.preemption_timeout="
                  f"{timeout:g} s: exiting without it; run the same command to resume from the newest complete "
                  f"checkpoint in {self.ckpt.directory}", file=sys.stderr, flush=True)

        with deadline(timeout, too_slow):
            self._save(done, params, opt_state)
            self.ckpt.wait()
        raise TrainingPreempted(done)

    def validate(self, step: int, params: Any, opt_state: Any) -> None:
        """Run the validation at `step` with the EMA weights when kept (else the evaluation parameters) and
        log its metrics and grid."""
        weights = ema_params(opt_state)
        metrics, grid, path = self.validation(step, eval_params(opt_state, params) if weights is None else weights,
                                              self.base)
        if metrics:
            self.run_log.scalars(step, {**metrics, "validation_weights": "ema" if weights is not None else "trained"})
        if grid is not None:
            self.run_log.image("validation/grid", step, grid)
            (self.bar.write if self.bar is not None else self.log)(f"validation grid: {path}")


def _load_model(cfg: TrainConfig, dataset: DatasetMix, mesh: Any):
    """Base model (placed on `mesh`) with fresh or file-initialised adapters, split into (LoRA, base)."""
    options = cfg.model_options()
    if jax.default_backend() == "cpu" and options.dtype != jnp.float32:
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: XLA:CPU cannot run the backward pass of "
                          f"{options.dtype.name} matmuls with fp32 accumulation; on CPU train with "
                          f"model.dtype=float32 (model.param_dtype may stay bfloat16)")
    # adapters are created once, on device, already in their shardings
    model = load_transformer(cfg.model.path, options=options, mesh=mesh, lora_seed=cfg.lora.seed)
    check_data_matches_model(dataset, model.config)
    if cfg.lora.init_from:
        with tempfile.TemporaryDirectory(prefix="qwen-edit-jax-lora-") as d:
            src = cfg.lora.init_from
            if storage.is_remote(src):  # one small file: read from a local copy
                src = storage.download_file(src, os.path.join(d, "init.safetensors"))
            load_lora_into_adapters(model, src)
    local_rows = None
    if mesh is not None:
        local_rows = distributed.local_batch_rows(batch_sharding(mesh, cfg.data.batch_size), cfg.data.batch_size)
    graphdef, params, base = split_lora(model)
    return model.config, graphdef, params, base, local_rows


def _resume(cfg: TrainConfig, ckpt: TrainCheckpointer, step: int, params: Any, opt_state: Any, loader: BatchLoader,
            run_path: str, log: Callable[[str], None]) -> tuple[Any, Any, jax.Array, int, int]:
    """Restore checkpoint `step` into (params, opt_state) and `loader`: (params, opt_state, rng, first step,
    schedule length)."""
    params, opt_state, meta = _restore(cfg, ckpt, step, params, opt_state, run_path, log)
    loader.load_state_dict(meta["data"])
    rng = jax.random.wrap_key_data(jnp.asarray(np.asarray(meta["rng"], np.uint32)))
    start = int(meta["step"])
    log(f"resuming from {ckpt.directory}/{step} (step {start})")
    return params, opt_state, rng, start, resumed_schedule_steps(cfg, meta, start, log)


def _restore(cfg: TrainConfig, ckpt: TrainCheckpointer, step: int, params: Any, opt_state: Any, run_path: str,
             log: Callable[[str], None]) -> tuple[Any, Any, dict[str, Any]]:
    if storage.exists(run_path):
        old = {k: v for k, v in json.loads(storage.read_text(run_path)).items() if k != RUN_INFO_KEY}
        changes = config_changes(old, cfg.to_dict())
        if changes:
            log(f"warning: resuming with a changed config: {'; '.join(changes)}")
    if ema_params(opt_state) is not None and not ckpt.has_ema(step):
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay}: {ckpt.directory}/{step} was saved without an EMA "
                          f"(train.ema_decay was null), so it cannot resume one; resume with train.ema_decay=null "
                          f"or start a new output dir")
    try:
        return ckpt.restore(step, params, opt_state)
    except Exception as e:  # structure/shape mismatch: LoRA rank, targets or optimiser changed
        raise ConfigError(f"{ckpt.directory}/{step}: cannot restore this checkpoint with the current config "
                          f"(did lora.rank, lora.targets, lora.qkv_mode or the optimiser change?): "
                          f"{type(e).__name__}: {str(e)[:300]}") from None


def resumed_schedule_steps(cfg: TrainConfig, meta: dict[str, Any], step: int, log: Callable[[str], None]) -> int:
    """The learning-rate schedule's length for a resumed run, and a log line for whatever changed.

    The run keeps the length it was trained with (recorded in the checkpoint; older checkpoints:
    the `train.max_steps` saved with them), so a new `train.max_steps` continues the same curve:
    a longer run trains on at the schedule's final LR. `optim.schedule_steps` set to another length
    re-stretches the schedule; the LR then jumps at the resumed step, and the log says by how much.
    """
    saved = meta.get("config", {})
    recorded = meta.get("schedule_steps") or saved.get("optim", {}).get("schedule_steps") \
        or saved.get("train", {}).get("max_steps") or cfg.train.max_steps
    recorded = int(recorded)
    old_max = saved.get("train", {}).get("max_steps")
    if old_max is not None and int(old_max) != cfg.train.max_steps:
        log(f"train.max_steps: {old_max} -> {cfg.train.max_steps}")
    wanted = cfg.optim.schedule_steps
    if wanted is None or wanted == recorded:
        if cfg.train.max_steps > recorded and cfg.optim.schedule != "constant":
            final = float(make_schedule(cfg.optim, recorded)(recorded))
            log(f"learning-rate schedule: kept at its recorded length of {recorded} steps; steps {recorded + 1}-"
                f"{cfg.train.max_steps} run at its final LR {final:.3g} (set optim.schedule_steps="
                f"{cfg.train.max_steps} to stretch the schedule instead)")
        return recorded
    before = float(make_schedule(cfg.optim, recorded)(step))
    after = float(make_schedule(cfg.optim, wanted)(step))
    log(f"learning-rate schedule: re-stretched from {recorded} to {wanted} steps (optim.schedule_steps); "
        f"the LR at step {step + 1} changes from {before:.3g} to {after:.3g}")
    return wanted


def _check_finite(step: int, m: dict[str, Any], ckpt: TrainCheckpointer) -> None:
    """Stop before a non-finite state can reach a checkpoint (the checks run before every save)."""
    if all(math.isfinite(float(m[k])) for k in ("loss", "grad_norm", "param_norm")):
        return
    ckpt.wait()
    good = ckpt.latest_step()
    raise NonFiniteLossError(
        f"step {step}: loss {float(m['loss'])}, grad norm {float(m['grad_norm'])}, LoRA weight norm "
        f"{float(m['param_norm'])}: not finite; training stopped. Last good checkpoint: "
        f"{'none' if good is None else f'{ckpt.directory}/{good}'} (intact). "
        f"Lower optim.learning_rate, keep optim.max_grad_norm on, or check the data.")


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def _bucket_name(key) -> str:
    shapes, text = key
    return "+".join(f"{h}x{w}" for _, h, w in shapes) + f"/text{text}"
