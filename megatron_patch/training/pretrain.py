"""Pretraining on megatron-core: `python -m megatron_patch.training.pretrain ARGS` (or
`megatron-patch train ARGS`), normally under torchrun:

    torchrun --nproc_per_node 4 -m megatron_patch.training.pretrain --hf-config DIR --load-hf DIR \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --micro-batch-size 2 \\
        --global-batch-size 8 --seq-length 128 --train-iters 100 --lr 3e-4 --data-path PREFIX --save OUT

One step: the next global batch from megatron's GPTDataset -> megatron's pipeline schedule over this
data-parallel rank's micro-batches (training.step.forward_backward; DDP reduces the grads) -> NaN/Inf
check -> megatron optimizer step (clipping, grad norm) -> OptimizerParamScheduler -> metrics ->
checkpoint at --save-interval / --exit-interval / the end (training.checkpointing).

Start: resume from --save when it holds a training checkpoint, else from --load when that is a
training checkpoint; otherwise initialise from --load (model-only Megatron checkpoint) or --load-hf
(HF weights), or randomly.
"""
from __future__ import annotations

import os
import sys

from megatron_patch.errors import UserError

# Light on purpose (no torch at import): dist_checkpointing's writer spawns a multiprocessing Manager,
# whose child re-imports the __main__ module; keeping this module cheap keeps that spawn fast.


def run(args) -> int:
    """Validate, train, tear down. Returns the exit status (0; 3 after a NaN/Inf stop)."""
    from megatron_patch.runtime.console import quiet_known_warnings
    from megatron_patch.training.arguments import validate

    if not getattr(args, "verbose", False):  # `megatron-patch --verbose train` shows them
        quiet_known_warnings()
    validate(args)
    import torch

    from megatron_patch.training.trainer import NAN_EXIT_CODE, NaNDetected, Trainer

    trainer = None
    try:
        trainer = Trainer(args)
        return trainer.train()
    except NaNDetected:
        return NAN_EXIT_CODE
    except BaseException as err:  # DistError; DCP's CheckpointException (a BaseException) wrapping one in a save
        gone = peer_is_gone(err)
        if gone is None:
            raise
        from megatron_patch.runtime.heartbeat import EXIT_CODE

        where = f"step {trainer.iteration}" if trainer is not None else "start-up"
        who = "another rank is gone"
        if trainer is not None and trainer.heartbeat is not None:
            with _sigterm_held():
                who = trainer.heartbeat.describe_gone()
        if getattr(args, "verbose", False):  # gloo's / NCCL's own words
            who += f" [{(str(gone).strip().splitlines() or [type(gone).__name__])[0][:200]}]"
        print(f"error: {who}; rank {os.environ.get('RANK', '0')} ({where}) exits with code {EXIT_CODE}",
              file=sys.stderr, flush=True)
        return EXIT_CODE
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _sigterm_held:
    """torchrun's agent SIGTERMs the survivors as soon as it sees a rank die (and SIGKILLs 30 s later): held while
    the survivor names the dead rank (at most two heartbeat intervals and a half second), so its line is printed."""

    def __enter__(self):
        import signal
        import threading

        self.main = threading.current_thread() is threading.main_thread()  # handlers are the main thread's
        if self.main:
            self.previous = signal.signal(signal.SIGTERM, lambda *_: None)

    def __exit__(self, *exc):
        import signal

        if self.main:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_is_gone(err: BaseException) -> BaseException | None:
    """The error saying a collective failed because another rank died (gloo / NCCL / HCCL report it as a
    RuntimeError), found in `err` or anything it wraps; None if it is some other failure."""
    import torch.distributed

    from megatron_patch.errors import exception_chain

    network = getattr(torch.distributed, "DistNetworkError", ())
    found = [e for e in exception_chain(err) if isinstance(e, network) or any(text in str(e) for text in PEER_GONE)]
    return found[-1] if found else None  # the innermost (a CheckpointException's text quotes what it wraps)


def main(argv: list[str] | None = None) -> int:
    from megatron_patch.runtime.console import file_size_limit_as_error, print_once_per_node, quiet_known_warnings
    from megatron_patch.training.arguments import build_parser

    quiet_known_warnings()
    file_size_limit_as_error()
    args = build_parser("python -m megatron_patch.training.pretrain").parse_args(argv)
    try:
        code = run(args)
    except UserError as err:
        print_once_per_node(f"error: {err}")
        code = 2
    from megatron_patch.runtime.distributed_init import record_exit_code

    record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
