"""What a converter reads from a Megatron checkpoint is checked against the HF config before any output is
renamed into place: a checkpoint of another layer count, hidden size or head count, a tensor of the wrong
shape, an integer tensor where weights are, or one float dtype among others is an error, never a silently
wrong model."""
from __future__ import annotations

import re

import torch

from megatron_patch.errors import UserError

# Stored Megatron-LM args that must equal the model the config describes (Megatron-LM's own
# check_checkpoint_args compares these too).
_ARGS = ("num_layers", "hidden_size", "num_attention_heads")
_LAYER = re.compile(r"^(decoder|mtp)\.layers\.(\d+)\.")


def check_stored_args(args, plan, where, config_path) -> None:
    """The args saved in a checkpoint against the model config.json describes."""
    for field in _ARGS:
        stored, want = getattr(args, field, None), getattr(plan.mcore_config, field, None)
        if stored is not None and want is not None and int(stored) != int(want):
            raise UserError(f"{where} was saved with {field}={stored}, but {config_path} gives {want}: the checkpoint "
                            "does not match that config (wrong --hf-config?)")


def check_rank_layers(chunks: list[dict], plan, pp: int, where) -> None:
    """A rank file holds no layer the plan does not read (a checkpoint with more layers than the config)."""
    for chunk, sd in enumerate(chunks):
        expected = {plan.local_name(p.row, p.place) for p in plan.placed if p.place.pp == pp and p.place.chunk == chunk}
        layers = {m.group(0) for name in expected if (m := _LAYER.match(name))}
        extra = sorted({m.group(0) for name in sd if (m := _LAYER.match(name)) and m.group(0) not in layers})
        if extra:
            raise UserError(f"{where} (model chunk {chunk}) holds {extra[0].rstrip('.')}, a layer the config does not "
                            f"have ({plan.mcore_config.num_layers} layers): the checkpoint does not match that config "
                            "(wrong --hf-config?)")


_SHAPES: dict[str, dict] = {}


def expected_shapes(hf_config) -> dict[str, tuple]:
    """hf_config.expected_hf_shapes, built once per config (a config transformers cannot build is an
    error there, not a skipped check)."""
    from .hf_config import expected_hf_shapes

    key = hf_config.to_json_string()
    if key not in _SHAPES:
        _SHAPES.clear()
        _SHAPES[key] = expected_hf_shapes(hf_config)
    return _SHAPES[key]


def merge_error(name: str, err: Exception, config_path) -> UserError:
    """Shards that do not fit together (a shape torch cannot reshape or concatenate) as one line."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return UserError(f"cannot assemble {name} from the checkpoint ({first}): the checkpoint does not match "
                     f"{config_path} (wrong --hf-config?) or a tensor is damaged")


class TensorCheck:
    """Rank-local tensors: floating point, one float dtype (bar the names megatron keeps in fp32); merged HF
    tensors: the shapes transformers builds from the config."""

    def __init__(self, hf_config, config_path, keep_dtype_suffixes=()):
        self.hf_config, self.config_path, self.keep = hf_config, config_path, tuple(keep_dtype_suffixes)
        self.float_dtype = None
        self._shapes = None

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            raise UserError(f"checkpoint tensor {name} is {str(tensor.dtype).replace('torch.', '')}, not floating point: "
                            "the checkpoint is damaged or not a model checkpoint (re-copy it)")
        if not name.endswith(self.keep):
            if self.float_dtype is None:
                self.float_dtype = tensor.dtype
            elif tensor.dtype != self.float_dtype:
                raise UserError(f"checkpoint tensor {name} is {str(tensor.dtype).replace('torch.', '')} while the others "
                                f"are {str(self.float_dtype).replace('torch.', '')}: mixed dtypes (a stray tensor?); "
                                "the checkpoint is damaged (re-copy or re-convert it)")
        return tensor

    def hf(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self._shapes is None:
            self._shapes = expected_shapes(self.hf_config)
        want = self._shapes.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise UserError(f"tensor {name} read from the checkpoint has shape {list(tensor.shape)}, but "
                            f"{self.config_path} implies {list(want)}: the checkpoint does not match that config "
                            "(wrong --hf-config?) or a tensor is damaged")
        return tensor
