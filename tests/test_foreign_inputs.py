"""Inputs written by other tools than ours, as a new user brings them.

- A DeepSeek-V3 saved by transformers itself: DeepseekV3Config defaults num_nextn_predict_layers (num_mtp_layers)
  to 1, but transformers builds and saves no MTP modules, so the model declares an MTP layer its weights lack. It
  is read as transformers runs it, without MTP (hf2mcore, compare, --load-hf); a partial MTP is still refused.
- A Megatron checkpoint in torch's pre-1.6 (non-zip) format: read weights-only like any other (it cannot be
  memory-mapped), and a payload in one is refused as in the zip format.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import save_file

from megatron_patch.checkpoint.hf_config import load_hf_config
from megatron_patch.cli import main
from megatron_patch.convert.mini import make_mini


def _strip(src, dst, keep):
    """A copy of the mini whose weights hold only the tensors `keep` accepts."""
    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if keep(k)}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
    return dst


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_declared_mtp_without_weights_reads_as_no_mtp(tmp_path, capsys):
    mini = make_mini("deepseek_v3", tmp_path / "mtp", layers=2, overrides={"num_nextn_predict_layers": 1})
    mtp = "model.layers.2."
    saved = _strip(mini, tmp_path / "saved", lambda k: not k.startswith(mtp))  # as save_pretrained writes it
    assert json.loads((saved / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert load_hf_config(saved).num_nextn_predict_layers == 0
    assert load_hf_config(mini).num_nextn_predict_layers == 1  # weights present: MTP kept
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(saved / "config.json", config_only)
    assert load_hf_config(config_only).num_nextn_predict_layers == 1  # nothing to tell: as written

    out, back = tmp_path / "mcore", tmp_path / "back"
    assert main(["convert", "hf2mcore", "--hf-path", str(saved), "--out", str(out), "--ep", "2"]) == 0
    assert "hold no MTP layer (model.layers.2.*" in capsys.readouterr().err
    assert json.loads((out / "hf_config" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert main(["convert", "mcore2hf", "--mcore-path", str(out), "--out", str(back)]) == 0
    want, got = _tensors(saved), _tensors(back)
    assert sorted(want) == sorted(got) and all(want[k].equal(got[k]) for k in want)

    # an MTP layer that is there in part is a damaged checkpoint, not a transformers save
    partial = _strip(mini, tmp_path / "partial", lambda k: not k.startswith(mtp + "enorm"))
    assert main(["convert", "hf2mcore", "--hf-path", str(partial), "--out", str(tmp_path / "p")]) == 2
    assert "lacks 1 tensor(s)" in capsys.readouterr().err and not (tmp_path / "p").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pre_zip_torch_format_loads_weights_only(tmp_path):
    from megatron_patch.checkpoint import mcore_layout
    from megatron_patch.checkpoint.safe_load import UnsafeCheckpoint

    root = tmp_path / "ckpt"
    path = mcore_layout.write_rank(root, 3, 0, 0, 0, {"tp": 1}, [{"w": torch.arange(4.0)}], {"lr": 1e-3})
    mcore_layout.write_latest(root, 3)
    saved = torch.load(path, weights_only=False)
    torch.save(saved, path, _use_new_zipfile_serialization=False)
    loaded = mcore_layout.load_rank_checkpoint(root, 0, 0, 0)
    assert torch.equal(mcore_layout.model_chunks(loaded)[0]["w"], torch.arange(4.0))
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({**saved, "evil": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpoint, match="refused to load: it holds posix.system"):
        mcore_layout.load_rank_checkpoint(root, 0, 0, 0)
    assert not marker.exists()
