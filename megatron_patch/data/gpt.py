"""The training batch stream: megatron-core's GPTDataset over a Megatron indexed dataset.

Global batch i is made of dataset samples [i*G, (i+1)*G) (G = global batch size); GPTDataset already
shuffles its samples (seeded), so the stream is a pure function of (data, seq length, seed, sample
count) and the only state to checkpoint is the number of consumed samples. Every rank reads the whole
global batch (token ids only) and `training.step.forward_backward` takes its data-parallel rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_patch.data.batch import Batch
from megatron_patch.errors import UserError


class DatasetTokenizer:
    """What megatron's GPTDataset reads from a tokenizer: vocab size, end-of-document id, pad id.
    (Data is pre-tokenized; no text tokenizer is needed to train.)"""

    def __init__(self, vocab_size: int, eod: int, pad: int | None = None):
        self.vocab_size = vocab_size
        self.eod = eod
        self._pad = pad
        # GPTDataset hashes its config (tokenizer included) into the index-cache file names.
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size, "eod": eod, "pad": pad}

    @property
    def pad(self) -> int:
        if self._pad is None:
            raise AttributeError("no pad token")  # GPTDataset then uses its own reserved pad id
        return self._pad


def tokenizer_from_hf_config(hf_config) -> DatasetTokenizer:
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = getattr(hf_config, "pad_token_id", None)
    return DatasetTokenizer(hf_config.vocab_size, eod=0 if eos is None else int(eos),
                            pad=None if pad is None or pad == eos else int(pad))


def check_prefix(prefix: str, flag: str = "--data-path") -> str:
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise UserError(f"{flag} {prefix}: {prefix}{ext} not found (give the prefix without .bin/.idx; "
                            "make one with `megatron-patch preprocess`)")
    return prefix


def check_tokens(prefix: str, vocab_size: int, flag: str = "--data-path") -> None:
    """The dataset is readable (megatron's own index reader), complete, and its largest token id is inside
    the model's vocabulary (data tokenized with another tokenizer would index past the embedding: an
    IndexError at TP1, silently wrong rows of the vocab padding at TP>1)."""
    import numpy
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        index = _IndexReader(prefix + ".idx", multimodal=False)
    except Exception as err:  # noqa: BLE001 - asserts, struct and buffer errors of a damaged file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{flag} {prefix}.idx cannot be read ({first}); re-run `megatron-patch preprocess`") from None
    itemsize = numpy.dtype(index.dtype).itemsize
    needed = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize if len(index) else 0
    size = Path(prefix + ".bin").stat().st_size
    if size < needed or size % itemsize:
        raise UserError(f"{flag} {prefix}.bin holds {size} bytes, its .idx describes {needed}: the pair is truncated "
                        "or mismatched; re-run `megatron-patch preprocess`")
    if size == 0 or numpy.iinfo(index.dtype).max < vocab_size:
        return  # the dtype cannot hold an id outside the vocabulary
    tokens = numpy.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
    step = 1 << 26
    largest = max(int(tokens[i:i + step].max()) for i in range(0, len(tokens), step))
    if largest >= vocab_size:
        raise UserError(f"{flag} {prefix}: token id {largest} is outside the model's vocabulary ({vocab_size} "
                        "tokens); the data was tokenized with another tokenizer: re-run `megatron-patch preprocess` "
                        "with the model's tokenizer")


Blend = tuple  # (prefixes, weights or None), as megatron's BlendedMegatronDatasetConfig takes it


@dataclass
class DataSpec:
    train_blend: Blend
    seq_length: int
    global_batch_size: int
    train_iters: int
    seed: int
    tokenizer: DatasetTokenizer
    valid_blend: Blend | None = None
    split: str | None = None  # Megatron's --split for --data-path, e.g. "99,1,0"
    eval_samples: int = 0
    cache_dir: str | None = None


def build_datasets(spec: DataSpec):
    """(train, valid) GPTDatasets; valid is None without validation data. Call on every rank (rank 0
    builds the index caches first, the others then read them)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for prefix in spec.train_blend[0]:
        check_tokens(check_prefix(prefix), spec.tokenizer.vocab_size)
    train_samples = spec.train_iters * spec.global_batch_size
    eval_samples = spec.eval_samples or None
    common = dict(
        random_seed=spec.seed, sequence_length=spec.seq_length, tokenizer=spec.tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=spec.cache_dir, mmap_bin_files=True,
    )
    if spec.valid_blend:
        for prefix in spec.valid_blend[0]:
            check_tokens(check_prefix(prefix, "--valid-data-path"), spec.tokenizer.vocab_size, "--valid-data-path")
        config = GPTDatasetConfig(blend_per_split=[spec.train_blend, spec.valid_blend, None], **common)
    else:
        split = spec.split or "100,0,0"
        if parse_and_normalize_split(split)[1] == 0:
            eval_samples = None
        config = GPTDatasetConfig(blend=spec.train_blend, split=split, **common)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, eval_samples, None], lambda: True, config)
    train, valid, _ = builder.build()
    return train, valid


def _collate(dataset, indices) -> Batch:
    samples = [dataset[int(i)] for i in indices]
    return Batch(torch.stack([s["tokens"] for s in samples]), torch.stack([s["labels"] for s in samples]),
                 torch.stack([s["loss_mask"] for s in samples]).float())


class GlobalBatches:
    """Global batches in order from a sample position; `consumed` is the checkpointed data position."""

    def __init__(self, dataset, global_batch_size: int, consumed: int = 0):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.consumed = consumed

    def peek(self) -> Batch:
        """The next global batch, without advancing."""
        start, stop = self.consumed, self.consumed + self.global_batch_size
        if stop > len(self.dataset):
            raise UserError(f"dataset has {len(self.dataset)} samples, batch needs samples up to {stop}")
        return _collate(self.dataset, range(start, stop))

    def next(self) -> Batch:
        batch = self.peek()
        self.consumed += self.global_batch_size
        return batch


def iterations_per_epoch(prefix: str, seq_length: int, global_batch_size: int) -> int:
    """Steps that see every token of the dataset once: (tokens - 1) // seq_length samples, whole global batches
    (at least 1)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # kept alive: sequence_lengths is a view of its memory map
    tokens = int(dataset.sequence_lengths.sum())
    del dataset
    return max(1, (tokens - 1) // seq_length // global_batch_size)
