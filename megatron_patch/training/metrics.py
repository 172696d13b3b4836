"""Per-step metrics: the console line, TensorBoard scalars, a JSON-lines file, MoE aux / MTP losses
from megatron's trackers, and NaN/Inf detection.

The console line (one per --log-interval steps; values averaged over the interval where that makes
sense, LR and grad norm of the last step):

    Step 12/100 | Loss: 5.1234 | Aux: 0.001234 | LR: 3.00e-04 | Grad norm: 1.23 | Time: 0.45s | tok/s: 1234 | MFU: 12.3% | Mem: 1.2 GiB

  Loss   language-model loss, token mean over the global batch (aux and MTP losses not included)
  Aux    MoE load-balancing loss as added to the objective: sum over kinds of coeff x megatron's tracked
         value (mean over MoE layers); only for MoE models
  MTP    multi-token-prediction loss (DeepSeek-V3 with num_nextn_predict_layers), after Aux when present
  Indexer  DeepSeek-V3.2's DSA indexer loss as added to the objective: --dsa-indexer-loss-coeff x the KL
         between the indexer's distribution and the attention's (mean over layers); with a coefficient only
  tok/s  global tokens (global batch x sequence length) per second of step time
  MFU    model FLOP/s (training_flops_per_token x tok/s) over world size x the device's peak FLOP/s;
         only when the accelerator knows its peak (not on CPU; MP_PEAK_FLOPS sets one)
  Mem    peak device memory of the busiest rank (process peak RSS on CPU)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

GIB = 1024**3

_AUX_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
              "global_aux_loss": "global_load_balancing_loss"}


class MoEAuxLosses:
    """megatron's MoE aux-loss tracker (moe_utils.track_moe_metrics), read once per step.

    The tracker only gets an entry when a layer on this rank records a loss, while track_moe_metrics
    all-reduces every entry over the pipeline group: a stage without MoE layers would skip that
    collective and hang the others. So every rank pre-creates the entries its config can produce."""

    def __init__(self, config, device):
        self.config = config
        types = config.moe_router_load_balancing_type
        coeffs = config.moe_aux_loss_coeff
        types = types if isinstance(types, list) else [types]
        coeffs = coeffs if isinstance(coeffs, list) else [coeffs]
        self.coeff = {_AUX_NAMES[t]: float(c) for t, c in zip(types, coeffs) if t in _AUX_NAMES and c}
        if config.moe_z_loss_coeff:
            self.coeff["z_loss"] = float(config.moe_z_loss_coeff)
        self.enabled = bool(config.num_moe_experts) and bool(self.coeff)
        self.num_layers = config.num_layers + (config.mtp_num_layers or 0)
        self.device = device

    def _ensure_entries(self) -> None:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        for name in self.coeff:
            if name not in tracker:
                tracker[name] = {"values": torch.zeros(self.num_layers, device=self.device), "reduce_group": None,
                                 "avg_group": None, "reduce_group_has_dp": False}

    def collect(self, num_microbatches: int, iteration: int, writer=None) -> dict[str, float]:
        """Reduce and clear the tracker (a collective: call on every rank). Returns each tracked loss
        (mean over MoE layers, without its coefficient) and "aux", the weighted sum."""
        if not self.enabled:
            return {}
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        self._ensure_entries()
        totals: dict = {}
        track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=iteration, writer=writer,
                          total_loss_dict=totals, num_layers=self.config.num_layers,
                          moe_layer_freq=self.config.moe_layer_freq, mtp_num_layers=self.config.mtp_num_layers,
                          track_names=list(self.coeff))
        out = {name: float(totals[name]) for name in self.coeff if name in totals}
        out["aux"] = sum(self.coeff[name] * value for name, value in out.items())
        return out


def collect_mtp(config, num_microbatches: int, iteration: int, writer=None) -> float | None:
    """Mean MTP loss over the MTP layers from megatron's MTP tracker (None without MTP)."""
    if not getattr(config, "mtp_num_layers", None):
        return None
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    totals: dict = {}
    MTPLossLoggingHelper.track_mtp_metrics(1.0 / num_microbatches, iteration, writer, total_loss_dict=totals)
    values = [float(v) for k, v in totals.items() if k.startswith("mtp_")]
    return sum(values) / len(values) if values else None


def collect_dsa_indexer(config, num_microbatches: int, iteration: int, writer=None) -> float | None:
    """Mean DSA indexer loss over the DSA layers, MTP's included (coefficient included) from megatron's DSA tracker; None without
    one. A collective over PP and DP: every rank pre-creates its entry, as MoEAuxLosses does."""
    if getattr(config, "experimental_attention_variant", None) != "dsa" or not config.dsa_indexer_loss_coeff:
        return None
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossLoggingHelper

    from megatron_patch.models.dsa import tracked_layers
    from megatron_patch.runtime import get_accelerator

    tracker = DSAIndexerLossLoggingHelper.tracker
    if "values" not in tracker:
        tracker["values"] = torch.zeros(tracked_layers(config), device=get_accelerator().current_device())
    totals: dict = {}
    DSAIndexerLossLoggingHelper.track_indexer_metrics(1.0 / num_microbatches, iteration, writer,
                                                      total_loss_dict=totals)
    return float(totals["indexer loss"])


def grads_finite(chunks) -> bool:
    """True when every local gradient (DDP grad buffers) is finite.

    One sum per buffer: a NaN or Inf anywhere makes it non-finite, and unlike isfinite(...).all() it
    allocates nothing the size of the model (that check cost ~0.1 s of a 2 s CPU step). A sum of finite
    values above the fp32 range (~3e38) is reported too, which is a broken step anyway."""
    for chunk in chunks:
        for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if not bool(torch.isfinite(buf.grad_data.sum())):
                return False
    return True


@dataclass
class StepRecord:
    iteration: int
    train_iters: int
    loss: float
    lr: float
    grad_norm: float
    step_time: float
    tokens: int
    aux: dict = field(default_factory=dict)
    mtp: float | None = None
    indexer: float | None = None  # DSA indexer loss (DeepSeek-V3.2)
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    world_size: int = 1
    mem_bytes: int | None = None
    skipped: bool = False
    skipped_total: int = 0  # skipped updates so far in this run (NaN/Inf, fp16 overflow)
    loss_scale: float | None = None  # fp16 only
    cpu_time: float | None = None  # CPU seconds of this process in the step (a load-independent cost on CPU)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_time if self.step_time > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        if not self.peak_flops or self.step_time <= 0:
            return None
        return self.flops_per_token * self.tokens_per_second / (self.peak_flops * self.world_size)

    def as_dict(self) -> dict:
        return {"iteration": self.iteration, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "step_time": self.step_time, "tokens_per_second": self.tokens_per_second, "mfu": self.mfu,
                "mem_bytes": self.mem_bytes, "mtp": self.mtp, "indexer": self.indexer, "skipped": self.skipped,
                "skipped_total": self.skipped_total, "loss_scale": self.loss_scale, "cpu_time": self.cpu_time,
                **self.aux}


def format_line(rec: StepRecord) -> str:
    parts = [f"Step {rec.iteration}/{rec.train_iters}", f"Loss: {rec.loss:.4f}"]
    if "aux" in rec.aux:
        parts.append(f"Aux: {rec.aux['aux']:.6f}")
    if rec.mtp is not None:
        parts.append(f"MTP: {rec.mtp:.4f}")
    if rec.indexer is not None:
        parts.append(f"Indexer: {rec.indexer:.4f}")
    parts += [f"LR: {rec.lr:.2e}", f"Grad norm: {rec.grad_norm:.2f}", f"Time: {rec.step_time:.2f}s",
              f"tok/s: {rec.tokens_per_second:.0f}"]
    if rec.mfu is not None:
        parts.append(f"MFU: {100 * rec.mfu:.1f}%")
    if rec.mem_bytes is not None:
        parts.append(f"Mem: {rec.mem_bytes / GIB:.1f} GiB")
    if rec.loss_scale is not None:
        parts.append(f"Loss scale: {rec.loss_scale:g}")
    if rec.skipped:
        parts.append("update skipped")
    if rec.skipped_total:
        parts.append(f"Skipped: {rec.skipped_total}")
    return " | ".join(parts)


def average(records: list[StepRecord]) -> StepRecord:
    """One record for a log interval: mean loss/aux/MTP, total time and tokens, last LR / grad norm."""
    last = records[-1]
    n = len(records)
    aux = {k: sum(r.aux.get(k, 0.0) for r in records) / n for k in last.aux}
    mtps = [r.mtp for r in records if r.mtp is not None]
    indexer = [r.indexer for r in records if r.indexer is not None]
    return StepRecord(
        iteration=last.iteration, train_iters=last.train_iters, loss=sum(r.loss for r in records) / n,
        lr=last.lr, grad_norm=last.grad_norm, step_time=sum(r.step_time for r in records),
        tokens=sum(r.tokens for r in records), aux=aux, mtp=sum(mtps) / len(mtps) if mtps else None,
        indexer=sum(indexer) / len(indexer) if indexer else None,
        flops_per_token=last.flops_per_token, peak_flops=last.peak_flops, world_size=last.world_size,
        mem_bytes=last.mem_bytes, skipped=any(r.skipped for r in records), skipped_total=last.skipped_total,
        loss_scale=last.loss_scale)


class MetricsSink:
    """Console, TensorBoard (SummaryWriter) and JSON lines; active on the logging rank only."""

    def __init__(self, active: bool, tensorboard_dir: str | None = None, metrics_file: str | None = None):
        self.active = active
        self.writer = None
        self._file = None
        if not active:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=1)
        if metrics_file:
            self._file = open(metrics_file, "a", buffering=1)

    def step(self, rec: StepRecord) -> None:
        if self._file:
            self._file.write(json.dumps(rec.as_dict()) + "\n")

    def log(self, rec: StepRecord) -> None:
        if not self.active:
            return
        print(format_line(rec), flush=True)
        if self.writer is not None:
            it = rec.iteration
            self.writer.add_scalar("lm loss", rec.loss, it)
            self.writer.add_scalar("learning-rate", rec.lr, it)
            self.writer.add_scalar("grad-norm", rec.grad_norm, it)
            self.writer.add_scalar("iteration-time", rec.step_time, it)
            self.writer.add_scalar("throughput/tokens-per-sec", rec.tokens_per_second, it)
            if "aux" in rec.aux:
                self.writer.add_scalar("aux-loss", rec.aux["aux"], it)
            if rec.mfu is not None:
                self.writer.add_scalar("throughput/mfu", rec.mfu, it)
            if rec.mem_bytes is not None:
                self.writer.add_scalar("memory/peak-gib", rec.mem_bytes / GIB, it)

    def validation(self, iteration: int, loss: float) -> None:
        if not self.active:
            return
        ppl = math.exp(min(loss, 20.0))
        print(f"Validation | Step {iteration} | Loss: {loss:.4f} | PPL: {ppl:.2f}", flush=True)
        if self.writer is not None:
            self.writer.add_scalar("lm loss validation", loss, iteration)
            self.writer.add_scalar("lm loss validation ppl", ppl, iteration)
        if self._file:
            self._file.write(json.dumps({"iteration": iteration, "valid_loss": loss}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self._file:
            self._file.close()
