"""`megatron-patch env-check`: what this machine offers a Megatron job, before launching one.

Devices and count, distributed backends available, library versions, the torchrun/launcher
environment (MASTER_ADDR/PORT, WORLD_SIZE, whether the port is free), optional accelerator stacks,
and which runtime patches setup() would apply here and why.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from importlib.metadata import PackageNotFoundError, version


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("localhost",) else "127.0.0.1", port))
        except OSError:
            return False
    return True


def collect() -> dict:
    import torch
    import torch.distributed as dist

    from megatron_patch.runtime import patch_status
    from megatron_patch.runtime.accelerator import get_accelerator

    acc = get_accelerator()
    launcher = {key: os.environ.get(key) for key in
                ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NNODES", "NODE_RANK")}
    port_free = None
    if launcher["MASTER_PORT"]:
        host = launcher["MASTER_ADDR"] or "127.0.0.1"
        local = host in ("127.0.0.1", "localhost", socket.gethostname())
        port_free = _port_free(host, int(launcher["MASTER_PORT"])) if local else None
    return {
        "device": acc.type,
        "backend": acc.backend,
        "device_count": acc.device_count(),
        "device_name": acc.device_name(),
        "peak_flops_bf16": acc.peak_flops(),
        "backends_available": {
            "gloo": dist.is_gloo_available(),
            "nccl": dist.is_nccl_available(),
            "hccl": importlib.util.find_spec("torch_npu") is not None,
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "megatron-core": _version("megatron-core"),
            "transformers": _version("transformers"),
            "safetensors": _version("safetensors"),
            "megatron-patch": _version("megatron-patch"),
        },
        "optional": {name: importlib.util.find_spec(name) is not None
                     for name in ("torch_npu", "transformer_engine", "apex", "flash_attn")},
        "launcher": launcher,
        "master_port_free": port_free,
        "patches": patch_status(acc.type),
    }


def format_table(info: dict) -> str:
    lines = [
        f"device          {info['device']} x{info['device_count']} ({info['device_name']})",
        f"backend         {info['backend']}   available: "
        + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["backends_available"].items()),
        "versions        " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()),
        "optional        " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["optional"].items()),
        "launcher        " + ", ".join(f"{k}={v}" for k, v in info["launcher"].items() if v) or "launcher        (not set)",
    ]
    if not any(info["launcher"].values()):
        lines[-1] = "launcher        MASTER_ADDR/MASTER_PORT/WORLD_SIZE not set (torchrun sets them)"
    if info["master_port_free"] is not None:
        lines.append(f"master port     {'free' if info['master_port_free'] else 'IN USE: pick another MASTER_PORT'}")
    active = [p for p in info["patches"] if p["applies"]]
    lines.append(f"patches         {len(active)} of {len(info['patches'])} apply on {info['device']} "
                 f"(megatron-core {info['versions']['megatron-core']})")
    # The torch proxy is one patch per module; list those as one line (--json has them all).
    proxies = [p for p in info["patches"] if p["target"].endswith(".torch")]
    others = [p for p in info["patches"] if not p["target"].endswith(".torch")]
    width = max((len(p["target"]) for p in others), default=10)
    for p in others:
        lines.append(f"  [{'on ' if p['applies'] else 'off'}] {p['target']:<{width}}  {p['why']}")
    if proxies:
        on = sum(p["applies"] for p in proxies)
        lines.append(f"  [{'on ' if on else 'off'}] {'megatron.core.*.torch':<{width}}  "
                     f"{proxies[0]['why'] if on else 'not needed on ' + info['device']} ({on} modules)")
    return "\n".join(lines)


def launch_problems(info: dict, want_device: str | None = None) -> list[str]:
    """What would stop a torchrun launch on this machine (seed 003's checks): the wanted device type and its
    backend, WORLD_SIZE against the devices of NNODES nodes, a master port already in use."""
    problems = []
    if want_device and info["device"] != want_device:
        problems.append(f"no {want_device} device: this machine offers {info['device']} "
                        f"(optional stacks: {', '.join(k for k, v in info['optional'].items() if v) or 'none'})")
    if not info["backends_available"].get(info["backend"]):
        problems.append(f"backend {info['backend']} is not available in this torch")
    world = info["launcher"].get("WORLD_SIZE")
    nodes = int(info["launcher"].get("NNODES") or 1)
    if world and info["device"] != "cpu" and int(world) > info["device_count"] * nodes:
        problems.append(f"WORLD_SIZE={world} is more than {info['device_count']} {info['device']} device(s) x "
                        f"{nodes} node(s)")
    if info["master_port_free"] is False:
        problems.append(f"MASTER_PORT={info['launcher']['MASTER_PORT']} is in use: pick another port")
    return problems


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("env-check", help="devices, backends, versions, launcher env, patches")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
