"""The training loop shared by every recipe: accumulate, clip, step, log, evaluate, checkpoint.

One optimizer step takes `batch_size` samples at global positions [step * batch_size, ...) of
the task's sample order; process r of W takes its contiguous 1/W of them, in micro-batches. Each
micro-batch's summed loss is divided by the sample count of the whole global batch (tokens for
language modelling, pairs for DPO), so gradients do not depend on how the batch is split.

Exact resume: everything a step depends on is either a function of the step number (samples,
learning rate) or saved in the checkpoint (weights, optimizer, RNG), so k steps, a checkpoint,
and N - k more steps reproduce N straight steps bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from minicpm.kernels.allocator import return_free_heap
from minicpm.training import checkpoint as ckpt
from minicpm.training.distributed import (
    Processes,
    all_reduce_sum,
    barrier,
    full_model_state,
    full_optimizer_state,
)
from minicpm.training.logs import RunLog, perplexity, plot_losses
from minicpm.training.mup import set_learning_rate
from minicpm.training.profile import MemoryProfile, resident
from minicpm.training.recipe import Recipe
from minicpm.training.tasks import sample_order


class Trainer:
    def __init__(self, model, optimizer, schedule, task, recipe: Recipe, run_dir: Path,
                 save_weights, procs: Processes = Processes(), valid_task=None, echo=print,
                 profile: MemoryProfile | None = None):
        """Trains as `recipe.train` says (steps, batch sizes, precision, logging, evaluation and
        checkpoint intervals), drawing the data order from `recipe.seed`.
        `save_weights(directory, full_state)` writes the weights part of a checkpoint (a full
        checkpoint or an adapter); `full_state` is the unsharded state dict. With `profile`,
        the first step is measured phase by phase (forward, loss, backward, optimizer) and the
        whole profile is printed and logged at the end."""
        self.model, self.optimizer, self.schedule, self.task = model, optimizer, schedule, task
        self.settings, self.seed = recipe.train, recipe.seed
        self.run_dir, self.procs = Path(run_dir), procs
        self.title = f"{recipe.kind} {self.run_dir.name}"
        self.save_weights, self.valid_task = save_weights, valid_task
        # with a progress bar on the terminal, lines go above it rather than through it
        self.log = RunLog(self.run_dir, enabled=procs.is_main, echo=tqdm.write if _interactive() else echo)
        self.step = 0
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.profile = profile

    # --- state ---------------------------------------------------------------------------------
    def resume(self, checkpoint: Path) -> None:
        from minicpm.training.distributed import load_full_state

        state = ckpt.read_trainer_state(checkpoint)
        weights = ckpt.read_weights(checkpoint)
        load_full_state(self.model, self.optimizer, self.model_state_from(weights), state["optimizer"], self.procs)
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        self.log.truncate_after(self.step)

    def model_state_from(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors under the model's state-dict names (an adapter's PEFT names map
        to the LoraLinear modules)."""
        from minicpm.training.lora import PREFIX

        if any(k.startswith(PREFIX) for k in weights):
            return {k.removeprefix(PREFIX): v for k, v in weights.items()}
        return weights

    def save(self) -> Path | None:
        full = full_model_state(self.model, self.procs)
        optim = full_optimizer_state(self.model, self.optimizer, self.procs)
        path = None
        if self.procs.is_main:
            state = {"step": self.step, "samples_seen": self.step * self.settings.batch_size,
                     "optimizer": optim, "rng": ckpt.rng_state()}
            path = ckpt.write_checkpoint(self.run_dir, self.step, lambda d: self.save_weights(d, full), state,
                                         keep=self.settings.keep_checkpoints)
        barrier(self.procs)
        return path

    # --- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        s = self.settings
        per_process = s.batch_size // self.procs.world_size
        started, first_step = time.perf_counter(), self.step
        last: dict[str, Any] = {}
        window = _new_window()
        self.model.train()
        bar = tqdm(total=s.steps, initial=self.step, desc=self.title, unit="step", dynamic_ncols=True,
                   disable=not (self.procs.is_main and _interactive()))
        end = s.stop_at or s.steps
        while self.step < end:
            profiling = self.profile is not None and self.step == first_step
            step_started = time.perf_counter()
            rss_before = resident()[0] if profiling else 0
            lr = self.schedule(self.step)
            set_learning_rate(self.optimizer, lr)
            samples = sample_order(self.task.num_samples, self.seed, self.step * s.batch_size, s.batch_size)
            count = self.task.count(samples)
            mine = samples[self.procs.rank * per_process:(self.procs.rank + 1) * per_process]
            with self._phases(profiling):
                loss, tokens, metrics = self._accumulate(mine, count, profiling)
            grad_norm = self._clip()
            if profiling:
                self.profile.enter("optimizer state")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if profiling:
                self._profiled_first_step(rss_before)
            self.step += 1
            bar.update(1)
            loss, tokens, *values = all_reduce_sum([loss, tokens, *metrics.values()], self.procs)
            window["loss"] += loss / count
            window["count"] += 1
            window["tokens"] += tokens
            window["busy"] += time.perf_counter() - step_started
            for key, value in zip(metrics, values):
                window["metrics"][key] = window["metrics"].get(key, 0.0) + value / count
            if self.step % s.log_every == 0 or self.step == end:
                elapsed = time.perf_counter() - started
                last = self._log_train(lr, grad_norm, window, elapsed, self.step - first_step)
                window = _new_window()
            if self.valid_task is not None and (self.step % s.eval_every == 0 or self.step == end):
                last.update(self.evaluate())
                self.model.train()
                self._plot()
            if self.step % s.save_every == 0 or self.step == end:
                self.save()
        bar.close()
        self._plot()
        if self.profile is not None:
            self._write_profile(last)
        return last

    def _accumulate(self, samples: list[int], count: int,
                    profiling: bool = False) -> tuple[float, int, dict[str, float]]:
        s = self.settings
        total, tokens, metrics = 0.0, 0, {}
        for start in range(0, len(samples), s.micro_batch_size):
            batch = self._to_device(self.task.collate(samples[start:start + s.micro_batch_size]))
            if profiling:
                self.profile.enter("forward (activations)")
            with self._autocast():
                loss, micro_metrics = self.task.loss(self.model, batch)
            if profiling:
                self.profile.enter("backward")
            # FSDP averages gradients over processes: scale back up so that they are sums / count
            (loss * (self.procs.world_size / count)).backward()
            if self.procs.device.type == "cpu":
                return_free_heap()  # the micro-batch's freed activations (kernels/allocator.py)
            total += float(loss.detach())
            tokens += int(batch["input_ids"].numel())
            for key, value in micro_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value
        return total, tokens, metrics

    @contextlib.contextmanager
    def _phases(self, profiling: bool):
        """While profiling: the final norm ends the decoder's forward pass, and the loss (the
        head and cross-entropy, chunked_loss.py) begins there."""
        if not profiling:
            yield
            return
        hook = self.model.model.norm.register_forward_hook(lambda *_: self.profile.enter("logits and loss"))
        try:
            yield
        finally:
            hook.remove()

    def _profiled_first_step(self, rss_before: int) -> None:
        """After the first optimizer step: what the allocator keeps of the step's freed memory
        (resident now beyond the optimizer state the step created), then `later steps`."""
        self.profile.leave()
        state = sum(t.numel() * t.element_size() for group in self.optimizer.state.values()
                    for t in group.values() if torch.is_tensor(t))
        self.profile.add("allocator (freed, kept)", resident()[0] - rss_before - state)
        self.profile.enter("later steps")

    def _write_profile(self, last: dict[str, Any]) -> None:
        self.profile.leave()
        if self.procs.is_main:
            self.log.write({"step": self.step, "memory": self.profile.record()})
        last["memory"] = self.profile.record()

    def _memory_mb(self) -> float:
        measured = _memory_mb(self.procs)
        if self.profile is None or self.procs.device.type == "cuda":
            return measured
        # the profile resets the kernel's peak at each phase: its own peak is the run's
        return max(measured, self.profile.run_peak() / 2**20)

    def _clip(self) -> float:
        limit = self.settings.clip_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, limit if limit else math.inf)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    def _autocast(self):
        if self.settings.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.procs.device.type, dtype=torch.bfloat16)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.procs.device) for k, v in batch.items()}

    def _log_train(self, lr: float, grad_norm: float, window: dict, elapsed: float, done: int) -> dict[str, Any]:
        s = self.settings
        per_step = elapsed / max(done, 1)
        record = {"step": self.step, "steps": s.steps, "loss": window["loss"] / window["count"], "lr": lr,
                  "grad_norm": grad_norm,
                  "tokens_per_s": window["tokens"] / max(window["busy"], 1e-9),
                  "elapsed_s": elapsed, "eta_s": per_step * (s.steps - self.step), "memory_mb": self._memory_mb()}
        record.update({k: v / window["count"] for k, v in window["metrics"].items()})
        self.log.write(record)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and perplexity for language modelling) over the first eval_batches micro-batches
        of the validation data, split among the processes."""
        s, task = self.settings, self.valid_task
        self.model.eval()
        n = min(task.num_samples, s.eval_batches * s.micro_batch_size * self.procs.world_size)
        n -= n % self.procs.world_size  # every process runs the same number of forward passes
        share = n // self.procs.world_size
        mine = list(range(self.procs.rank * share, (self.procs.rank + 1) * share))
        total, metrics = 0.0, {}
        for start in range(0, len(mine), s.micro_batch_size):
            batch = self._to_device(task.collate(mine[start:start + s.micro_batch_size]))
            with self._autocast():
                loss, micro = task.loss(self.model, batch)
            total += float(loss)
            for key, value in micro.items():
                metrics[key] = metrics.get(key, 0.0) + value
        count = task.count(list(range(n)))
        total, *values = all_reduce_sum([total, *metrics.values()], self.procs)
        record = {"step": self.step, "eval_loss": total / count}
        if not metrics:
            record["eval_ppl"] = perplexity(record["eval_loss"])
        record.update({f"eval_{k}": v / count for k, v in zip(metrics, values)})
        self.log.write(record)
        return record

    def _plot(self) -> None:
        if self.procs.is_main:
            plot_losses(self.log.records(), self.run_dir / "loss.png", self.title)


def _new_window() -> dict[str, Any]:
    """What the next log record averages: the steps since the last one."""
    return {"loss": 0.0, "count": 0, "tokens": 0, "metrics": {}, "busy": 0.0}


def _interactive() -> bool:
    import sys

    return sys.stderr.isatty()


def _memory_mb(procs: Processes) -> float:
    """Peak memory of this process: the GPU's allocator peak, else the resident set's peak."""
    if procs.device.type == "cuda":
        return torch.cuda.max_memory_allocated(procs.device) / 2**20
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a run started by a
    # large process (a test runner, a notebook) would report at least that process's size
    peak = resident()[1]
    return peak / 2**20 if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
