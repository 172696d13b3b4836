"""`megatron-patch train` (pretraining on megatron-core) and `megatron-patch preprocess` (text ->
Megatron .bin/.idx). Both parse their flags here; the heavy imports happen when they run."""
from __future__ import annotations


def _train(args) -> int:
    from megatron_patch.training.pretrain import run

    return run(args)


def register(subparsers) -> None:
    from megatron_patch.data import preprocess
    from megatron_patch.training.arguments import add_arguments

    p = subparsers.add_parser(
        "train", help="pretrain on megatron-core (run under torchrun; Megatron-LM flag names)",
        description="Pretrain a DeepSeek-V2/V3 or Qwen model on megatron-core. Run under torchrun for more "
        "than one rank, e.g. torchrun --nproc_per_node 4 $(which megatron-patch) train ...")
    add_arguments(p)
    p.set_defaults(func=_train)
    preprocess.register(subparsers)
