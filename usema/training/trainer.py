"""The training loop: iteration-indexed data, Dice+CE with deep supervision, validation, exact resume.

Progress is counted in global steps (``step = epoch * iterations_per_epoch + iteration``). The batch of a
step is a pure function of the step (see :mod:`usema.training.sampling`); everything else that changes
during training (weights, optimiser, scheduler, scaler, RNGs, loss accumulators, metrics history) is in
``checkpoints/last.pt``, so a run resumed from any checkpoint continues exactly as if never stopped.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from usema.config import TrainConfig
from usema.errors import UsemaError
from usema.faults import fault_point
from usema.inference.precision import autocast_dtype
from usema.training import reporting
from usema.run.checkpoint import StoredModel, save_checkpoint
from usema.run.compilation import compile_failures, compile_module
from usema.run.device import training_memory_format
from usema.run.layout import BEST, LAST, METRICS, PLOTS, TENSORBOARD, checkpoint_path
from usema.run.spec import (
    build_network_from_spec,
    check_patch_size,
    check_same_architecture,
    load_matching_weights,
    load_weights,
    spec_for_recipe,
    spec_to_dict,
    with_stored_widths,
)
from usema.training.components import (
    GRAD_CLIP_NORM,
    build_loss,
    build_optimizer,
    build_scheduler,
)
from usema.training.distributed import DistContext, all_gather_objects, all_reduce_sum
from usema.training.rng import (
    capture_rng_state,
    restore_rng_state,
    seed_everything,
    seed_worker,
)
from usema.training.sampling import StepBatchSampler
from usema.training.validation import ValidationResult, validate

# tensorboard tags of the metrics.csv columns that are not validation Dice
_TB_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "seconds": "time/epoch_seconds"}
# what a failed train.compile tells the user to do instead (the key may change on --resume)
_COMPILE_REMEDY = "set train.compile=false (it may change on --resume)"


@dataclass
class TrainState:
    """Everything besides module/optimiser state that a resumed run needs."""

    step: int = 0  # global steps completed
    best_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_seconds: float = 0.0
    # where a fine-tuning run started: {"path", "loaded", "skipped"} (model.init_from), else None
    init_from: dict[str, Any] | None = None


def configure_determinism(device: torch.device) -> None:
    """Bit-exact CPU runs (exact resume); on CUDA favour speed (cuDNN autotuning)."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def training_autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training forward on ``device``; None = float32, no autocast.

    ``train.precision`` auto follows ``train.amp``: on CUDA bf16 where the GPU supports it (no loss scaling needed),
    else fp16; float32 on the CPU. An explicit precision must be one the device runs natively (UsemaError naming
    the key otherwise) and must not contradict ``amp: false``.
    """
    if train.precision == "auto":
        if not train.amp or device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not train.amp and train.precision != "fp32":
        raise UsemaError(f"train.amp: false turns mixed precision off, but train.precision is {train.precision}; "
                         "drop one of the two")
    return autocast_dtype(train.precision, device, option="train.precision")


class Trainer:
    """Trains ``recipe`` on ``data`` (a ``usema.data.PreparedData``), writing the run directory ``run_dir``.

    Args:
        recipe: a ``usema.config.Recipe``.
        recipe_dict: the resolved recipe as plain data (stored in checkpoints).
        data: train_dataset (``{"image": (C, *patch), "label": (1, *patch)}`` per index), val_cases,
            labels ``{int: name}``, in_channels, norm_stats.
        run_dir: output folder; ``checkpoints/``, ``metrics.csv``, ``plots/``, ``tb/`` go there.
        ctx: process placement (see :func:`usema.training.distributed.setup_distributed`).
        init: the stored model whose matching weights start a fresh run (``model.init_from``); None otherwise.
        resume_weights: a resumed run's stored weights: a preset whose widths changed since they were written is
            rebuilt with the widths they have (``usema.run.spec.FORMER_PRESET_FEATURES``).
    """

    def __init__(
        self,
        recipe: Any,
        recipe_dict: dict[str, Any],
        data: Any,
        run_dir: Path,
        ctx: DistContext,
        init: StoredModel | None = None,
        resume_weights: Mapping[str, Any] | None = None,
    ):
        self.recipe, self.recipe_dict, self.data, self.ctx = recipe, recipe_dict, data, ctx
        self.run_dir = Path(run_dir)
        self.ipe = recipe.train.iterations_per_epoch
        self.total_steps = recipe.train.epochs * self.ipe
        self.labels = {int(k): str(v) for k, v in data.labels.items()}
        self.num_classes = max(self.labels) + 1
        self.fg_names = [self.labels.get(k, str(k)) for k in range(1, self.num_classes)]
        self.columns = reporting.metric_columns(self.fg_names)
        self.spec = spec_for_recipe(recipe, data.in_channels, self.num_classes)
        if resume_weights is not None:
            self.spec = with_stored_widths(self.spec, resume_weights)

        configure_determinism(ctx.device)
        seed_everything(recipe.train.seed)
        network = build_network_from_spec(self.spec, recipe.data.patch_size)
        self.memory_format = training_memory_format(network, ctx.device)
        self.network = network.to(ctx.device, memory_format=self.memory_format)
        check_patch_size(self.network, list(recipe.data.patch_size), self.spec)
        self.state = TrainState()
        if init is not None:
            self._initialise_from(init)
        seed_everything(recipe.train.seed + ctx.rank)  # per-rank stream for stochastic layers (DropPath)
        self.model = self._training_module(self.network)
        self.loss_fn = build_loss()
        self.optimizer = build_optimizer(
            self.network.parameters(), recipe.train.optimizer, recipe.train.lr, recipe.train.weight_decay
        )
        self.scheduler = build_scheduler(self.optimizer, recipe.train.schedule, self.total_steps)
        self.amp_dtype = training_autocast_dtype(recipe.train, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.last_lr = recipe.train.lr
        self.writer = None

    def _initialise_from(self, init: StoredModel) -> None:
        """Fine-tuning: the freshly built network takes every matching tensor of ``init``; the rest (the output
        heads when the class count differs) keeps the seeded fresh initialisation. Loading draws no random
        numbers, so the run's RNG streams are those of a run from scratch."""
        where = f"model.init_from: {init.source}"
        check_same_architecture(init.spec, self.spec, where)
        transfer = load_matching_weights(self.network, init.weights, where)
        self.state.init_from = {"path": str(init.source), "loaded": len(transfer.loaded), "skipped": transfer.skipped}
        if self.ctx.is_main:
            print(f"usema: model.init_from {init.source}: {transfer.describe()}", flush=True)

    def _training_module(self, network: torch.nn.Module) -> torch.nn.Module:
        """What the forward/backward calls: ``network``, DDP-wrapped across ranks, then compiled with
        ``train.compile`` (compiling the DDP wrapper lets dynamo split graphs at its gradient buckets).
        ``self.network`` stays the plain module that checkpoints, validation and the optimiser read."""
        module = self._wrap_ddp(network)
        if not self.recipe.train.compile:
            return module
        return compile_module(module, "train.compile", _COMPILE_REMEDY)

    def _wrap_ddp(self, network: torch.nn.Module) -> torch.nn.Module:
        if not self.ctx.distributed:
            return network
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=device_ids)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Checkpoint dict (docs/ARCHITECTURE.md). Collective under DDP: every rank must call it."""
        rng_per_rank = all_gather_objects(capture_rng_state(), self.ctx)
        loss_sum, loss_count = self._all_ranks_epoch_loss()
        epoch, iteration = divmod(self.state.step, self.ipe)
        return {
            "model": self.network.state_dict(),
            "network": spec_to_dict(self.spec),
            "recipe": self.recipe_dict,
            "norm_stats": self.data.norm_stats,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "epoch": epoch,
            "iteration": iteration,
            "step": self.state.step,
            "best_metric": self.state.best_metric,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"ranks": rng_per_rank},
            "metrics": {
                "history": self.state.history,
                "epoch_loss_sum": loss_sum,  # over all ranks; restored on rank 0
                "epoch_loss_count": loss_count,
                "epoch_seconds": self.state.epoch_seconds,
                "init_from": self.state.init_from,
            },
        }

    def load_state_dict(self, ckpt: dict[str, Any], source: Path) -> None:
        """Restore the checkpoint at ``source`` written by :meth:`state_dict` (same recipe)."""
        load_weights(self.network, ckpt["model"], self.spec, str(source))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:  # e.g. a USEMA checkpoint from before the heads were fixed
            raise UsemaError(
                f"{source}: optimizer: the stored state does not fit this network ({' '.join(str(exc).split())}); "
                "start a new run"
            ) from exc
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        metrics = ckpt["metrics"]
        self.state = TrainState(
            step=ckpt["step"],
            best_metric=ckpt["best_metric"],
            history=list(metrics["history"]),
            epoch_loss_sum=metrics["epoch_loss_sum"] if self.ctx.is_main else 0.0,
            epoch_loss_count=metrics["epoch_loss_count"] if self.ctx.is_main else 0,
            epoch_seconds=metrics["epoch_seconds"],
            init_from=metrics.get("init_from"),  # absent in checkpoints of runs from scratch written earlier
        )
        ranks = ckpt["rng"]["ranks"]
        # a different world size cannot reproduce the old streams; rank 0's is the closest
        restore_rng_state(ranks[self.ctx.rank] if len(ranks) == self.ctx.world_size else ranks[0])

    def _save(self, name: str) -> None:
        """Rank 0 writes ``checkpoints/<name>``; every rank waits for it and fails together if it failed."""
        payload = self.state_dict()
        error = None
        if self.ctx.is_main:
            try:
                save_checkpoint(payload, checkpoint_path(self.run_dir, name))
            except UsemaError as exc:
                error = exc
        # doubles as the barrier: no rank runs ahead of a checkpoint that is still being written
        failed = all_reduce_sum(torch.tensor([float(error is not None)]), self.ctx)
        if error is not None:
            raise error
        if failed.item():
            raise UsemaError(f"{checkpoint_path(self.run_dir, name)}: rank 0 could not write the checkpoint")

    # ------------------------------------------------------------------------------------------ loop
    def _loader(self) -> DataLoader:
        """DataLoader over the remaining steps; its own generator keeps the global torch RNG untouched."""
        train = self.recipe.train
        sampler = StepBatchSampler(
            self.state.step, self.total_steps, train.batch_size, self.ctx.rank, self.ctx.world_size
        )
        generator = torch.Generator().manual_seed(train.seed * 1_000_003 + self.state.step)
        workers = self.recipe.data.num_workers
        return DataLoader(
            self.data.train_dataset,
            batch_sampler=sampler,
            num_workers=workers,
            worker_init_fn=seed_worker,
            generator=generator,
            pin_memory=self.ctx.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=2 if workers > 0 else None,
        )

    def _train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on ``batch`` (image (B, C, *patch), label (B, 1, *patch)); returns the loss."""
        image = batch["image"].to(self.ctx.device, non_blocking=True, memory_format=self.memory_format)
        label = batch["label"].to(self.ctx.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(
            self.ctx.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )
        # compilation is lazy: the first forward and backward compile, and fail, here
        with compile_failures("train.compile", _COMPILE_REMEDY, enabled=self.recipe.train.compile):
            with autocast:
                loss = self.loss_fn(self.model(image), label)
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRAD_CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used, for metrics.csv
        self.scheduler.step()
        value = float(loss.detach().item())
        if not math.isfinite(value) and not self.scaler.is_enabled():  # fp16 scaling skips such steps itself
            raise UsemaError(
                f"train.lr: the loss became {value} at step {self.state.step + 1}; lower the learning rate "
                f"or check the data (the last checkpoint is kept)"
            )
        return value

    def fit(self) -> TrainState:
        """Train from ``self.state.step`` to the end, validating and checkpointing as the recipe says."""
        if self.state.step >= self.total_steps:
            return self.state
        if self.ctx.is_main:
            self.writer = self._open_tensorboard()
        batches = iter(self._loader())
        session_start, session_steps = time.monotonic(), 0
        try:
            while self.state.step < self.total_steps:
                epoch, first = divmod(self.state.step, self.ipe)
                epoch_start = time.monotonic()
                bar = self._progress_bar(epoch, first)
                for iteration in range(first, self.ipe):
                    loss = self._train_step(next(batches))
                    self.state.step += 1
                    self.state.epoch_loss_sum += loss
                    self.state.epoch_loss_count += 1
                    session_steps += 1
                    self._log_iteration(bar, loss, (time.monotonic() - session_start) / session_steps)
                    if self._mid_epoch_checkpoint_due(iteration):
                        self.state.epoch_seconds += time.monotonic() - epoch_start
                        epoch_start = time.monotonic()
                        self._save(LAST)
                    fault_point("train.iteration")
                bar.close()
                self.state.epoch_seconds += time.monotonic() - epoch_start
                self._end_epoch(epoch)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self.state

    def _mid_epoch_checkpoint_due(self, iteration: int) -> bool:
        every = self.recipe.train.checkpoint_every
        # the epoch's last iteration is checkpointed after validation, in _end_epoch
        return every > 0 and (iteration + 1) % every == 0 and iteration + 1 < self.ipe

    def _end_epoch(self, epoch: int) -> None:
        """Validate (when due), record the epoch, write reports, save best.pt then last.pt."""
        start = time.monotonic()
        result = self._validate() if self._validation_due(epoch) else None
        self.state.epoch_seconds += time.monotonic() - start
        row = self._metrics_row(epoch, result)
        self.state.history.append(row)
        self.state.epoch_loss_sum, self.state.epoch_loss_count, self.state.epoch_seconds = 0.0, 0, 0.0
        improved = self._update_best(result)
        if self.ctx.is_main:
            self._report_epoch(row, result)
        if improved:
            self._save(BEST)
        self._save(LAST)

    def _validation_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.recipe.val.interval == 0 or epoch + 1 == self.recipe.train.epochs

    def _validate(self) -> ValidationResult | None:
        if not self.data.val_cases:
            return None
        val = self.recipe.val
        return validate(
            self.network,
            self.data.val_cases,
            self.num_classes,
            roi_size=self.recipe.roi_size,
            net_spatial_dims=self.recipe.data.spatial_dims,
            slice_axis=self.recipe.data.slice_axis,
            ctx=self.ctx,
            overlap=val.overlap,
            sw_batch_size=val.sw_batch_size,
            autocast_dtype=self.amp_dtype,
        )

    def _update_best(self, result: ValidationResult | None) -> bool:
        """True when best.pt should be (re)written: a new best mean Dice, or no validation data at all."""
        if not self.data.val_cases:
            return True
        if result is None:
            return False
        if self.state.best_metric is None or result.mean_dice > self.state.best_metric:
            self.state.best_metric = result.mean_dice
            return True
        return False

    def _all_ranks_epoch_loss(self) -> tuple[float, int]:
        """Sum and count of this epoch's batch losses over all ranks (collective under DDP)."""
        if not self.ctx.distributed:
            return self.state.epoch_loss_sum, self.state.epoch_loss_count
        totals = torch.tensor([self.state.epoch_loss_sum, self.state.epoch_loss_count], dtype=torch.float64)
        all_reduce_sum(totals, self.ctx)
        return float(totals[0]), int(totals[1])

    def _epoch_train_loss(self) -> float:
        """Mean training loss of the epoch over all ranks' batches (collective under DDP)."""
        loss_sum, loss_count = self._all_ranks_epoch_loss()
        return loss_sum / max(1, loss_count)

    def _metrics_row(self, epoch: int, result: ValidationResult | None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": self._epoch_train_loss(),
            "mean_dice": result.mean_dice if result else None,
            "lr": self.last_lr,
            "seconds": round(self.state.epoch_seconds, 3),
        }
        class_dice = result.class_dice if result else [None] * len(self.fg_names)
        for name, value in zip(self.fg_names, class_dice, strict=True):
            row[f"dice_{name}"] = value
        return row

    # ------------------------------------------------------------------------------------- reporting
    def _open_tensorboard(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - only rank 0 needs tensorboard

        # purge_step drops events a killed run logged after its last checkpoint
        return SummaryWriter(str(self.run_dir / TENSORBOARD), purge_step=self.state.step or None)

    def _progress_bar(self, epoch: int, first: int) -> tqdm:
        enabled = self.ctx.is_main and sys.stderr.isatty()
        return tqdm(
            total=self.ipe, initial=first, desc=f"epoch {epoch + 1}/{self.recipe.train.epochs}",
            disable=not enabled, leave=False, dynamic_ncols=True,
        )

    def _log_iteration(self, bar: tqdm, loss: float, seconds_per_step: float) -> None:
        remaining = (self.total_steps - self.state.step) * seconds_per_step
        bar.set_postfix(loss=f"{loss:.4f}", run_eta=time.strftime("%H:%M:%S", time.gmtime(remaining)), refresh=False)
        bar.update()
        if self.writer is not None:
            self.writer.add_scalar("train/loss_iteration", loss, self.state.step)

    def _report_epoch(self, row: dict[str, Any], result: ValidationResult | None) -> None:
        """metrics.csv, plots, tensorboard scalars + overlay, and one summary line on stdout."""
        reporting.write_metrics_csv(self.run_dir / METRICS, self.state.history, self.columns)
        reporting.write_plots(self.run_dir / PLOTS, self.state.history, self.fg_names)
        step = self.state.step
        for key, value in row.items():
            if key != "epoch" and value is not None:
                self.writer.add_scalar(_TB_TAGS.get(key, f"val/{key}"), value, step)
        if result is not None and result.example is not None:
            overlay = reporting.overlay_image(**result.example, slice_axis=self.recipe.data.slice_axis)
            self.writer.add_image("val/overlay_truth_vs_prediction", overlay, step)
        self.writer.flush()
        dice = "-" if row["mean_dice"] is None else f"{row['mean_dice']:.4f}"
        print(
            f"epoch {row['epoch']}/{self.recipe.train.epochs}  loss {row['train_loss']:.4f}  "
            f"mean Dice {dice}  lr {row['lr']:.2e}  {row['seconds']:.1f}s",
            flush=True,
        )
