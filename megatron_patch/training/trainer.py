"""The train loop behind `megatron_patch.training.pretrain` (see there for the flow)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from megatron_patch.errors import UserError
from megatron_patch.models.moe_options import moe_overrides

NAN_EXIT_CODE = 3


class NaNDetected(RuntimeError):
    """A NaN/Inf loss or gradient with --exit-on-nan (the run stops with NAN_EXIT_CODE)."""


def _rank0_print(*args) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, flush=True)


def _layout(args):
    from megatron_patch.models.builder import ParallelLayout
    from megatron_patch.models.pipeline import split_kwargs

    return ParallelLayout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                          ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                          vpp=args.virtual_pipeline_model_parallel_size,
                          sp=True if args.sequence_parallel else None, cp=args.context_parallel_size,
                          **split_kwargs(args))


def _config_overrides(args) -> dict:
    overrides: dict = {}
    if args.bf16:
        overrides.update(bf16=True, params_dtype=torch.bfloat16)
    if args.fp16:
        overrides.update(fp16=True, params_dtype=torch.float16)
    if args.moe_aux_loss_coeff is not None:
        overrides["moe_aux_loss_coeff"] = args.moe_aux_loss_coeff
    if getattr(args, "dsa_indexer_loss_coeff", None) is not None:
        overrides["dsa_indexer_loss_coeff"] = args.dsa_indexer_loss_coeff
    overrides.update(moe_overrides(args))
    if args.context_parallel_size > 1:
        overrides["cp_comm_type"] = getattr(args, "cp_comm_type", "all_gather")
    if getattr(args, "hidden_dropout", None) is not None:
        overrides["hidden_dropout"] = args.hidden_dropout
    for name in ("recompute_granularity", "recompute_method", "recompute_num_layers"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.recompute_granularity == "full" and args.recompute_num_layers is None:
        overrides["recompute_num_layers"] = 1
    if args.lora_rank:  # the base is frozen: so is DeepSeek-V3's router expert bias (not in the adapters either)
        overrides["moe_router_bias_update_rate"] = 0.0
    if args.sft:  # gradients of the mean over all answer tokens of the global batch (not per micro-batch)
        overrides["calculate_per_token_loss"] = True
    return overrides


def _load_hf_config(args):
    from megatron_patch.checkpoint.hf_config import load_hf_config

    path = args.hf_config or args.load_hf
    if not path and args.load and os.path.isfile(os.path.join(args.load, "hf_config", "config.json")):
        path = os.path.join(args.load, "hf_config")  # written by `megatron-patch convert hf2mcore`
    if not path:
        raise UserError("--hf-config DIR is required (the HF model directory with config.json)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--hf-config {path}: no config.json there (give the HF model directory)")
    return load_hf_config(path)


def _batch_sizes(args, world: int, layout) -> tuple[int, int]:
    dp = world // (layout.tp * layout.pp * layout.cp)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {args.micro_batch_size} "
                        f"x data-parallel size {dp} (world {world} / TP{layout.tp} / PP{layout.pp} / CP{layout.cp})")
    num_micro = gbs // (args.micro_batch_size * dp)
    if layout.vpp and num_micro % layout.pp:
        raise UserError(f"interleaved pipeline: micro-batches per step ({num_micro}) must be a multiple of "
                        f"--pipeline-model-parallel-size {layout.pp}")
    return gbs, num_micro


def _scheduler(args, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters or args.train_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=False)


def _saved_args(args, world: int, config) -> dict:
    out = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    out["world_size"] = world
    # the spec built (not "auto") and the expert layout: the names the checkpoint holds, as Megatron-LM records
    out.update(transformer_impl=config.transformer_impl, moe_grouped_gemm=bool(config.moe_grouped_gemm))
    return out


class Trainer:
    def __init__(self, args):
        from megatron_patch.runtime import setup
        from megatron_patch.runtime.settings import settings_for

        self.args = args
        self.heartbeat = self.save_lock = self.sink = None
        try:
            self._set_up(args, setup, settings_for)
        except BaseException:  # a refused --load, a locked --save, ...: release the lock, stop the heartbeat
            self.close()
            raise

    def _set_up(self, args, setup, settings_for):
        self.acc = setup(args.device)
        self.settings = settings_for(self.acc.type)
        from megatron_patch.runtime.distributed_init import init_distributed, record_exit_code

        self.rank, self.world, self.heartbeat = init_distributed(
            self.acc, args.distributed_timeout_minutes, args.heartbeat_timeout, on_abort=record_exit_code)
        self.save_lock = self._lock_save_dir()
        self.layout = _layout(args)
        self.hf_config = _load_hf_config(args)
        self.gbs, self.num_micro = _batch_sizes(args, self.world, self.layout)
        self._build_model()
        self.iteration = 0
        self.skipped_steps = 0
        self.consumed = 0
        self._start_state()
        self._build_data()
        self._build_metrics()

    # --- setup ----------------------------------------------------------------------------------------
    def _lock_save_dir(self):
        """One training per --save (rank 0 holds the lock; every rank learns whether it got it); then the
        temporaries of saves that were killed are removed (no other writer can be at work)."""
        if not self.args.save:
            return None
        import contextlib

        from megatron_patch.checkpoint.atomic import output_lock
        from megatron_patch.training.checkpointing import remove_stale_saves

        stack, refused = contextlib.ExitStack(), ""
        if self.rank == 0:
            try:
                save = Path(self.args.save).absolute()
                save.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(output_lock(save))
                remove_stale_saves(save)
            except UserError as err:
                refused = str(err)
        flag = [refused]
        if self.world > 1:
            torch.distributed.broadcast_object_list(flag, src=0)
        if flag[0]:
            raise UserError(flag[0].replace("output", "--save", 1))
        return stack

    def _build_model(self) -> None:
        from megatron_patch.models.builder import build_family_model, check_layout, initialize_parallel
        from megatron_patch.models.families import family_for_config

        args = self.args
        from megatron_patch.models.moe_options import check_moe_overrides, with_moe_defaults

        overrides = _config_overrides(args)
        config = family_for_config(self.hf_config).to_mcore_config(self.hf_config, **overrides)
        check_moe_overrides(overrides, config)
        overrides = with_moe_defaults(overrides, config)
        check_layout(self.layout, config, self.world)
        initialize_parallel(self.layout, seed=args.seed)
        chunks, self.config, self.margs = build_family_model(
            self.hf_config, self.layout, transformer_impl=getattr(args, "transformer_impl", "auto"), **overrides)
        self.init_source = self._init_weights(chunks)
        if args.lora_rank:
            from megatron_patch.models.lora import apply_lora

            count = apply_lora(chunks, self.hf_config, self.config, self.margs, self.layout, args.lora_rank,
                               args.lora_alpha or args.lora_rank, args.lora_dropout, args.lora_target, args.seed)
            self.init_source += f" + LoRA r{args.lora_rank} on {count} linears ({args.lora_target})"
        self.dsa_warmup = self._start_dsa_stages(chunks)
        self._wrap_and_build_optimizer(chunks)

    def _wrap_and_build_optimizer(self, chunks) -> None:
        from megatron_patch.training.setup_model import build_optimizer, wrap_ddp

        args = self.args
        self.chunks = wrap_ddp(chunks, self.config, use_distributed_optimizer=args.use_distributed_optimizer)
        self.optimizer = build_optimizer(
            self.chunks, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
            clip_grad=args.clip_grad, use_distributed_optimizer=args.use_distributed_optimizer, bf16=args.bf16,
            fp16=args.fp16, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
            min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window,
            hysteresis=args.hysteresis,
            min_lr=args.min_lr, adam_eps=args.adam_eps, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2)
        self.scheduler = _scheduler(args, self.optimizer)

    # --- DeepSeek-V3.2 (DSA) training stages -----------------------------------------------------------
    def _start_dsa_stages(self, chunks) -> int:
        """Dense warm-up for --dsa-warmup-iters steps (only the indexer trains: everything else frozen, the
        expert-bias update off), sparse training after it. Returns the warm-up steps left (0: sparse now)."""
        args = self.args
        dsa = getattr(self.config, "experimental_attention_variant", None) == "dsa"
        if not dsa:
            if args.dsa_warmup_iters or args.dsa_indexer_loss_coeff:
                raise UserError("--dsa-warmup-iters/--dsa-indexer-loss-coeff are for DSA models (DeepSeek-V3.2)")
            return 0
        from megatron_patch.models.dsa import is_indexer_param, set_dsa_stage

        warmup = args.dsa_warmup_iters
        if args.dsa_indexer_loss_coeff and self.layout.cp > 1:
            raise UserError("--dsa-indexer-loss-coeff with --context-parallel-size > 1 is not supported yet (the "
                            "indexer loss needs the full attention rows); train the indexer at CP 1")
        if warmup and (self.resume_from is not None or args.lora_rank):
            raise UserError("--dsa-warmup-iters: run the warm-up as a fresh run without LoRA (resuming into it is "
                            "not supported yet); continue with --load/--finetune without the flag")
        set_dsa_stage(chunks, dense=bool(warmup))
        if warmup:
            for chunk in chunks:
                for name, param in chunk.named_parameters():
                    param.requires_grad_(is_indexer_param(name))
            self._bias_update_rate = self.config.moe_router_bias_update_rate
            self.config.moe_router_bias_update_rate = 0.0
            _rank0_print(f"DSA: dense warm-up for {warmup} step(s), only the indexer trains")
        return warmup

    def _end_dsa_warmup(self) -> None:
        """Sparse training from here: every parameter trains, with a fresh optimizer (DeepSeek's stages) and
        the LR schedule where it was."""
        from megatron_patch.models.dsa import set_dsa_stage

        modules = [getattr(c, "module", c) for c in self.chunks]
        for module in modules:
            for param in module.parameters():
                param.requires_grad_(True)
        set_dsa_stage(modules, dense=False)
        self.config.moe_router_bias_update_rate = self._bias_update_rate
        self._wrap_and_build_optimizer(modules)
        self.scheduler.step(increment=self.iteration)
        self.dsa_warmup = 0
        _rank0_print(f"DSA: sparse training from step {self.iteration + 1}")

    def _resume_dir(self):
        from megatron_patch.checkpoint.locate import train_checkpoint_dir

        if self.args.finetune:
            return None
        for root in (self.args.save, self.args.load):
            if root and os.path.isdir(root):
                found = train_checkpoint_dir(root)
                if found is not None:
                    return found
        return None

    def _init_weights(self, chunks) -> str:
        """Pretrained weights for a fresh run (a resume overwrites them later)."""
        from megatron_patch.training import checkpointing as ckpt

        self.resume_from = self._resume_dir()
        if self.resume_from is not None and not self.args.lora_rank:
            return f"resume {self.resume_from}"
        # (a LoRA checkpoint holds the adapters only: the frozen base comes from --load/--load-hf every time)
        if self.args.load:
            return ckpt.init_from_megatron(self.args.load, chunks, self.layout)
        if self.args.load_hf:
            return ckpt.init_from_hf(self.args.load_hf, chunks, self.hf_config, self.layout, self.config, self.margs)
        return "random init"

    def _start_state(self) -> None:
        from megatron_patch.training.checkpointing import load_training_checkpoint
        from megatron_patch.training.setup_model import use_fused_adam

        if self.resume_from is not None:
            self.iteration, self.consumed = load_training_checkpoint(
                self.resume_from, self.chunks, self.optimizer, self.scheduler,
                load_optim=not self.args.no_load_optim, load_rng=not self.args.no_load_rng)
            use_fused_adam(self.optimizer)
            if self.consumed != self.iteration * self.gbs:
                raise UserError(f"{self.resume_from} consumed {self.consumed} samples in {self.iteration} "
                                f"iterations; --global-batch-size {self.gbs} does not match the checkpoint")
        _rank0_print(f"model: {self.init_source} | {self.layout.describe()} | {self.config.transformer_impl} spec | "
                     f"world {self.world} | global batch "
                     f"{self.gbs} x {self.args.seq_length} tokens, {self.num_micro} micro-batch(es) of "
                     f"{self.args.micro_batch_size} per rank | start at iteration {self.iteration}")

    def _build_data(self) -> None:
        from megatron_patch.data.gpt import DataSpec, GlobalBatches, build_datasets, tokenizer_from_hf_config
        from megatron_patch.training.arguments import parse_data_blend

        args = self.args
        if args.sft:
            self._build_sft_data()
            return
        eval_samples = 0
        if args.eval_iters and args.eval_interval:
            eval_samples = args.eval_iters * self.gbs
        spec = DataSpec(train_blend=parse_data_blend(args.data_path, "--data-path"), seq_length=args.seq_length,
                        global_batch_size=self.gbs, train_iters=args.train_iters, seed=args.seed,
                        tokenizer=tokenizer_from_hf_config(self.hf_config),
                        valid_blend=parse_data_blend(args.valid_data_path, "--valid-data-path"),
                        split=args.split, eval_samples=eval_samples, cache_dir=args.data_cache_path)
        train, self.valid = build_datasets(spec)
        self.batches = GlobalBatches(train, self.gbs, consumed=self.consumed)

    def _build_sft_data(self) -> None:
        from megatron_patch.checkpoint import safe_load
        from megatron_patch.data.curriculum import DEFAULT_STAGES, BatchSampler, parse_stages
        from megatron_patch.data.sft import SFTBatches, SFTDataset

        args = self.args
        eos = getattr(self.hf_config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos  # padding is masked out of the loss
        dataset = SFTDataset(args.data_path[0], args.seq_length, int(pad or 0), pack=args.pack)
        if args.pack:
            _rank0_print(f"--pack: {len(dataset.tokens)} samples in {len(dataset)} sequences of {args.seq_length} "
                         "tokens")
        self.valid = None
        if args.valid_data_path:
            self.valid = SFTDataset(args.valid_data_path[0], args.seq_length, int(pad or 0), pack=args.pack,
                                    flag="--valid-data-path")
        stages = parse_stages(args.curriculum_stages or DEFAULT_STAGES) if args.curriculum else None
        seed = args.curriculum_seed if args.curriculum_seed is not None else args.seed
        sampler = BatchSampler(dataset.difficulty, args.train_iters, self.gbs, seed, stages, log=_rank0_print)
        saved = None
        if self.resume_from is not None:
            saved = safe_load.load_common(self.resume_from).get("sft_sampler")
        sampler.restore(saved, self.iteration)
        self.batches = SFTBatches(dataset, sampler)

    def _extra_state(self) -> dict:
        return {"sft_sampler": self.batches.sampler.state()} if self.args.sft else {}

    def _write_report(self) -> None:
        if self.args.curriculum_report and self.rank == 0:
            from megatron_patch.data.sft import write_report

            write_report(self.args.curriculum_report, self.batches.sampler)

    def _build_metrics(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_patch.training.flops import training_flops_per_token
        from megatron_patch.training.metrics import MetricsSink, MoEAuxLosses

        self.log_rank = self.world - 1  # on the last pipeline stage, where the loss is (Megatron's print_rank_last)
        assert ps.is_pipeline_last_stage(ignore_virtual=True) or self.rank != self.log_rank
        self.sink = MetricsSink(self.rank == self.log_rank, self.args.tensorboard_dir, self.args.metrics_file)
        self.aux = MoEAuxLosses(self.config, self.acc.current_device())
        vocab = self.margs.padded_vocab_size(self.layout.tp)
        self.flops_per_token = training_flops_per_token(self.config, vocab, self.args.seq_length)
        self.peak_flops = self.acc.peak_flops(torch.bfloat16 if self.args.bf16 else torch.float32)

    # --- one step ---------------------------------------------------------------------------------------
    def _finite_flags(self, loss) -> tuple[bool, bool]:
        """(loss finite, grads finite) agreed by all ranks."""
        from megatron_patch.training.metrics import grads_finite

        bad = torch.zeros(2, device=self.acc.current_device())
        if loss is not None and not bool(torch.isfinite(loss)):
            bad[0] = 1
        if not grads_finite(self.chunks):
            bad[1] = 1
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bad[0].item() == 0, bad[1].item() == 0

    def _global_loss(self, loss) -> float:
        """The loss of the last pipeline stage, on every rank."""
        value = torch.tensor([loss.item() if loss is not None else -float("inf")], dtype=torch.float64,
                             device=self.acc.current_device())
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return value.item()

    def train_step(self, batch):
        from megatron_patch.training.metrics import StepRecord, collect_dsa_indexer, collect_mtp
        from megatron_patch.training.setup_model import zero_grads
        from megatron_patch.training.step import forward_backward

        if self.dsa_warmup and self.iteration >= self.dsa_warmup:
            self._end_dsa_warmup()
        self._set_dsa_loss_scale()
        self.acc.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        zero_grads(self.chunks, self.optimizer)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
        loss = forward_backward(self.chunks, batch.to(self.acc.current_device()), self.args.micro_batch_size)
        loss_ok, grads_ok = self._finite_flags(loss)
        if self.args.fp16:
            grads_ok = True  # overflowing fp16 gradients are the loss scaler's to skip (optimizer.step)
        iteration = self.iteration + 1
        if not (loss_ok and grads_ok):
            what = "loss" if not loss_ok else "gradients"
            message = f"NaN/Inf in the {what} at step {iteration}"
            if self.args.exit_on_nan:
                if self.rank == self.log_rank:
                    print(f"error: {message}; stopping (last checkpoint is untouched; --no-exit-on-nan skips such "
                          "steps instead)", file=sys.stderr, flush=True)
                raise NaNDetected(message)
            update_ok, grad_norm = False, float("nan")
            zero_grads(self.chunks, self.optimizer)
            if self.rank == self.log_rank:
                print(f"warning: {message}; update skipped", file=sys.stderr, flush=True)
        else:
            update_ok, grad_norm, _ = self.optimizer.step()
            if update_ok:
                self.scheduler.step(increment=1)
        self.skipped_steps += not update_ok
        self.acc.synchronize()
        step_time, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start
        writer = self.sink.writer
        aux = self.aux.collect(self.num_micro, iteration, writer)
        mtp = collect_mtp(self.config, self.num_micro, iteration, writer)
        indexer = collect_dsa_indexer(self.config, self.num_micro, iteration, writer)
        self.iteration = iteration
        self.consumed = self.batches.consumed
        return StepRecord(
            iteration=iteration, train_iters=self.args.train_iters, loss=self._global_loss(loss),
            lr=lr, grad_norm=float(grad_norm if grad_norm is not None else 0.0),
            step_time=step_time, tokens=self.gbs * self.args.seq_length, aux=aux, mtp=mtp, indexer=indexer,
            flops_per_token=self.flops_per_token, peak_flops=self.peak_flops, world_size=self.world,
            skipped=not update_ok, skipped_total=self.skipped_steps,
            loss_scale=float(self.optimizer.get_loss_scale()) if self.args.fp16 else None, cpu_time=cpu_time)

    def _set_dsa_loss_scale(self) -> None:
        """The DSA indexer loss's backward scale, as megatron's schedules set the MoE aux loss's (they do not
        set DSA's in megatron-core 0.16.1): the loss scale, per micro-batch unless the loss is per token."""
        if not getattr(self.config, "dsa_indexer_loss_coeff", None):
            return
        from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

        scale = float(self.optimizer.get_loss_scale())
        if not self.config.calculate_per_token_loss:
            scale /= self.num_micro
        DSAIndexerLossAutoScaler.set_loss_scale(torch.tensor(scale, device=self.acc.current_device()))

    def _peak_memory(self) -> int:
        peak = torch.tensor([float(self.acc.memory_stats()["peak"])], dtype=torch.float64,
                            device=self.acc.current_device())
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return int(peak.item())

    def evaluate(self) -> float:
        from megatron_patch.data.gpt import GlobalBatches
        from megatron_patch.data.sft import ValidationBatches
        from megatron_patch.training.step import forward_backward

        for c in self.chunks:
            c.eval()
        # the same validation batches every time
        batches = ValidationBatches(self.valid, self.gbs) if self.args.sft else GlobalBatches(self.valid, self.gbs)
        total = 0.0
        with torch.no_grad():
            for _ in range(self.args.eval_iters):
                loss = forward_backward(self.chunks, batches.next().to(self.acc.current_device()),
                                        self.args.micro_batch_size, forward_only=True)
                total += self._global_loss(loss)
        for c in self.chunks:
            c.train()
        return total / self.args.eval_iters

    def warmup(self, batch, steps: int) -> None:
        """Run forward/backward `steps` times without touching the training state (first-step compilation
        on NPU happens here, outside the timed steps). Grads, router token counts, aux/MTP trackers and
        random states are reset afterwards; no gradient reduction or expert-bias update happens."""
        from megatron.core.distributed.finalize_model_grads import reset_model_temporary_tensors
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        from megatron_patch.training.checkpointing import rng_state, set_rng_state
        from megatron_patch.training.setup_model import zero_grads
        from megatron_patch.training.step import forward_backward

        saved_rng = rng_state()
        start = time.perf_counter()
        finalize, self.config.finalize_model_grads_func = self.config.finalize_model_grads_func, None
        try:
            for _ in range(steps):
                loss = forward_backward(self.chunks, batch.to(self.acc.current_device()), self.args.micro_batch_size)
        finally:
            self.config.finalize_model_grads_func = finalize
        loss = self._global_loss(loss)
        if self.rank == self.log_rank:  # the loss the first step will log again: its state is restored below
            print(f"warm-up: {steps} step(s) in {time.perf_counter() - start:.1f}s, loss {loss!r} (state reset)",
                  flush=True)
        zero_grads(self.chunks, self.optimizer)
        reset_model_temporary_tensors(self.config, self.chunks)
        clear_aux_losses_tracker()
        if "values" in MTPLossLoggingHelper.tracker:
            MTPLossLoggingHelper.clean_loss_in_tracker()
        set_rng_state(saved_rng)
        self.acc.synchronize()

    # --- the loop -----------------------------------------------------------------------------------------
    def save(self) -> None:
        from megatron_patch.training.checkpointing import save_checkpoint

        start = time.perf_counter()
        path = save_checkpoint(self.args.save, self.iteration, self.chunks, self.optimizer, self.scheduler,
                               self.consumed, _saved_args(self.args, self.world, self.config),
                               extra=self._extra_state())
        self._write_report()
        _rank0_print(f"saved checkpoint {path} ({time.perf_counter() - start:.1f}s)")

    def train(self) -> int:
        from megatron_patch.training.metrics import average

        args = self.args
        pending = []
        if self.iteration < args.train_iters and self.settings.warmup_steps:
            self.warmup(self.batches.peek(), self.settings.warmup_steps)
        saved_at = self.iteration
        if self.heartbeat is not None:
            self.heartbeat.step = self.iteration  # start-up is over
        while self.iteration < args.train_iters:
            rec = self.train_step(self.batches.next())
            if self.heartbeat is not None:
                self.heartbeat.step = self.iteration
            pending.append(rec)
            self.sink.step(rec)
            if self.iteration % args.log_interval == 0 or self.iteration == args.train_iters:
                rec = average(pending)
                rec.mem_bytes = self._peak_memory()
                self.sink.log(rec)
                pending = []
            if args.eval_interval and args.eval_iters and self.valid is not None and \
                    self.iteration % args.eval_interval == 0:
                self.sink.validation(self.iteration, self.evaluate())
            exiting = bool(args.exit_interval) and self.iteration % args.exit_interval == 0
            if args.save and ((args.save_interval and self.iteration % args.save_interval == 0) or exiting):
                self.save()
                saved_at = self.iteration
            if exiting:
                self._write_report()
                _rank0_print(f"exiting at iteration {self.iteration} (--exit-interval {args.exit_interval})")
                self._finish()
                return 0
        if args.save and saved_at != self.iteration:
            self.save()
        self._write_report()
        self._finish()
        return 0

    def _finish(self) -> None:
        if self.heartbeat is not None:  # every rank stops watching before any exits (no false alarm)
            self.heartbeat.stop()
            torch.distributed.barrier()

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.save_lock is not None:
            self.save_lock.close()
        if self.sink is not None:
            self.sink.close()
