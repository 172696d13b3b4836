"""Forward hooks on the HF model and on this rank's Megatron chunks, driven by the family's hook table.

A hook point (models/families/base.py HookPoint) names a Megatron module path and the HF module path
computing the same thing; `{layer}` expands over decoder layers (global index on the HF side; on the
Megatron side the chunk's stage-local index, mapped back to the global one with the layer's own
`layer_number`). Every call of a hooked module is recorded (`output.detach().clone()`: megatron updates
some outputs in place), so micro-batches and modules that run twice (MTP reuses the embedding and the
output layer) can be sorted out afterwards in normalize.py.

What is kept of an output, by kind:
  hidden  the tensor (first element of a (output, bias) / (output, weights) tuple)
  logits  the same
  router  Megatron: probs [tokens, E] (zeros where not routed);  HF: (top-k weights, top-k indices)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Key = tuple[str, int | None]  # (component, global layer or None)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _keep_mcore(kind: str, output):
    if kind == "router":
        probs = output[0] if isinstance(output, (tuple, list)) else output
        return probs.detach().clone()
    return _first(output).detach().clone()


def _keep_hf(kind: str, output):
    if kind == "router":
        # transformers 5 gates return (router_logits, top-k weights, top-k indices)
        if not (isinstance(output, (tuple, list)) and len(output) >= 3):
            raise TypeError(f"unexpected HF router output: {type(output).__name__}; expected (logits, weights, "
                            "indices)")
        return (output[1].detach().clone(), output[2].detach().clone())
    return _first(output).detach().clone()


@dataclass
class Target:
    key: Key
    kind: str
    module: torch.nn.Module
    path: str
    fused_norm: bool = False  # module is the TE LayerNormLinear the hooked norm is fused into


def fused_norm_output(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the norm a TE LayerNormLinear fuses computes on its input: the local spec's norm output, from
    the fused module's own layer_norm_weight / eps (statistics in fp32, as TE and HF)."""
    w = linear.layer_norm_weight.float()
    if getattr(linear, "zero_centered_gamma", False):
        w = w + 1
    h = x.float()
    if getattr(linear, "normalization", "RMSNorm") == "RMSNorm":
        out = torch.nn.functional.rms_norm(h, (h.shape[-1],), eps=linear.eps) * w
    else:
        bias = getattr(linear, "layer_norm_bias", None)
        out = torch.nn.functional.layer_norm(h, (h.shape[-1],), w, None if bias is None else bias.float(),
                                             eps=linear.eps)
    return out.to(x.dtype)


class Recorder:
    """Forward hooks that append every call's output to `calls[key]`; `remove()` takes them off."""

    def __init__(self, keep):
        self._keep = keep
        self.calls: dict[Key, list] = {}
        self.kinds: dict[Key, str] = {}
        self.paths: dict[Key, str] = {}
        self._handles = []

    def add(self, target: Target) -> None:
        self.calls.setdefault(target.key, [])
        self.kinds[target.key] = target.kind
        self.paths[target.key] = target.path
        keep, key, kind = self._keep, target.key, target.kind

        if target.fused_norm:
            def hook(module, inputs, _output):
                self.calls[key].append(keep(kind, fused_norm_output(module, inputs[0])))
        else:
            def hook(_module, _inputs, output):
                self.calls[key].append(keep(kind, output))

        self._handles.append(target.module.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _get(module: torch.nn.Module, path: str):
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def split_hooks(hooks) -> tuple[list, list, list]:
    """(pre, per-layer, post) hook points in table order: non-layer points listed before the first
    `{layer}` point run before the decoder (embedding), the others after it (final norm, logits)."""
    pre, layer, post = [], [], []
    for h in hooks:
        if "{layer}" in h.mcore or "{layer}" in h.hf:
            layer.append(h)
        elif layer:
            post.append(h)
        else:
            pre.append(h)
    return pre, layer, post


def hook_order(hooks, num_layers: int) -> list[Key]:
    """All keys in execution order: pre points, then per layer its points in table order, then post."""
    pre, layer, post = split_hooks(hooks)
    keys: list[Key] = [(h.component, None) for h in pre]
    for i in range(num_layers):
        keys += [(h.component, i) for h in layer]
    keys += [(h.component, None) for h in post]
    return keys


def _fused_into(model: torch.nn.Module, path: str):
    """The TE LayerNormLinear a norm at `path` is fused into (the TE spec leaves an IdentityOp there;
    key_map.FUSED_NORMS names the pairs), or None when the norm is a module of its own."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_patch.checkpoint.key_map import FUSED_NORMS

    if not isinstance(_get(model, path), IdentityOp):
        return None
    for norm, linear in FUSED_NORMS:
        if path == norm or path.endswith("." + norm):
            fused = _get(model, path[: len(path) - len(norm)] + linear)
            if fused is not None and hasattr(fused, "layer_norm_weight"):
                return fused
    return None


def _found(model: torch.nn.Module, wanted) -> list[Target]:
    """Targets for the (key, kind, module path) triples whose module exists in model. A norm the TE spec
    fuses into the next linear is recorded from that linear's input (fused_norm_output)."""
    out = []
    for key, kind, path in wanted:
        fused = _fused_into(model, path)
        if fused is not None:
            out.append(Target(key, kind, fused, path, fused_norm=True))
        elif (mod := _get(model, path)) is not None:
            out.append(Target(key, kind, mod, path))
    return out


def hf_targets(model: torch.nn.Module, hooks, num_layers: int) -> list[Target]:
    pre, layer, post = split_hooks(hooks)
    wanted = [((h.component, None), h.kind, h.hf) for h in pre + post]
    wanted += [((h.component, i), h.kind, h.hf.format(layer=i)) for i in range(num_layers) for h in layer]
    return _found(model, wanted)


def mcore_targets(chunks: list, hooks) -> list[Target]:
    """Hook targets on this rank's chunks. Pre points only on the chunk that runs the embedding
    (pre_process): the MTP stage of a DeepSeek-V3 model holds an embedding too (MTP reuses it). Post
    points wherever their module exists: the output layer is on the post_process chunk, but with MTP
    megatron builds the final norm on the chunk of the last decoder layer, which a pipeline layout can
    put on an earlier stage."""
    pre, layer, post = split_hooks(hooks)
    out = []
    for chunk in chunks:
        model = getattr(chunk, "module", chunk)
        ends = (pre if getattr(model, "pre_process", False) else []) + post
        wanted = [((h.component, None), h.kind, h.mcore) for h in ends]
        decoder = getattr(model, "decoder", None)
        for local, layer_module in enumerate(getattr(decoder, "layers", [])):
            global_layer = layer_module.layer_number - 1  # megatron's layer_number is global, 1-based
            wanted += [((h.component, global_layer), h.kind, h.mcore.format(layer=local)) for h in layer]
        out += _found(model, wanted)
    return out


def hf_recorder(model, hooks, num_layers: int) -> Recorder:
    rec = Recorder(_keep_hf)
    for t in hf_targets(model, hooks, num_layers):
        rec.add(t)
    return rec


def mcore_recorder(chunks, hooks) -> Recorder:
    rec = Recorder(_keep_mcore)
    for t in mcore_targets(chunks, hooks):
        rec.add(t)
    return rec
