"""Per-device launch settings (not patches): environment defaults and knobs the launcher reads.

NPU values come from what Ascend users set by hand today (seed 000: HCCL timeouts raised to 7200 s
because the first steps compile for a long time, a warm-up step before training). Every value can be
overridden by the environment: an existing variable is never replaced.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class RuntimeSettings:
    device: str
    env_defaults: dict[str, str] = field(default_factory=dict)
    warmup_steps: int = 0
    # gloo gives silently wrong results for interleaved PP with batched p2p (measured; see notes).
    batch_p2p_comm: bool = True
    # torch.compile (megatron's jit_fuser) costs ~13 s per process on CPU and gains nothing there.
    disable_compile: bool = False

    def apply(self) -> None:
        for key, value in self.env_defaults.items():
            os.environ.setdefault(key, value)
        if self.disable_compile:
            import torch._dynamo

            torch._dynamo.config.disable = True


def settings_for(device: str) -> RuntimeSettings:
    if device == "npu":
        return RuntimeSettings(
            device,
            env_defaults={
                "HCCL_CONNECT_TIMEOUT": os.environ.get("MP_HCCL_CONNECT_TIMEOUT", "7200"),
                "HCCL_EXEC_TIMEOUT": os.environ.get("MP_HCCL_EXEC_TIMEOUT", "7200"),
                "MULTI_STREAM_MEMORY_REUSE": "1",
            },
            warmup_steps=int(os.environ.get("MP_WARMUP_STEPS", "1")),
        )
    if device == "cuda":
        return RuntimeSettings(device, env_defaults={"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    return RuntimeSettings(device, batch_p2p_comm=False,
                           disable_compile=os.environ.get("MP_CPU_COMPILE", "0") != "1")
