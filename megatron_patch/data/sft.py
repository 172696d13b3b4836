"""`preprocess --sft`: instruction data -> tokens + a loss mask (answer tokens only), and the SFT batch stream.

Input: a `.json` file holding a list of records, or `.jsonl` (one record per line). A record is either
seed 002's `{"instruction", "input" (optional), "output", "difficulty" (optional)}` or a chat
`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "difficulty" (optional)}`
whose last message is the assistant's. The prompt is rendered with the tokenizer's chat template
(user = instruction, plus a newline and the input when present; assistant = output). A tokenizer without
a chat template gets the plain template

    User: {instruction}\\n{input}\\n\\nAssistant: {output}<eos>

(a system message is written as `System: {content}\\n\\n` first). Loss is on the assistant tokens only.

Output (written under temporary names, renamed at the end; PREFIX.sft.json is renamed last):
    PREFIX.bin/.idx            token ids, one document per sample (megatron IndexedDataset)
    PREFIX.mask.bin/.idx       uint8 per token: 1 on answer tokens
    PREFIX.sft.json            {"format": "sft", "levels": [...], "difficulty": [level index | -1 per sample],
                                "summary": {...}}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_patch.errors import UserError

LEVELS = ("explain", "reasoning", "topology")
PLAIN_TEMPLATE = "plain"
_ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------------
# reading records
# ---------------------------------------------------------------------------------------------------
def iter_records(path: Path):
    """(record number, record) for a .json list or a .jsonl file; every problem is a UserError naming file:record."""
    raw = path.read_bytes()
    if path.suffix == ".json":
        try:
            data = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); a list of records expected") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a .json SFT file must hold a list of records (got {type(data).__name__}); "
                            "or use .jsonl, one record per line")
        yield from enumerate(data, 1)
        return
    if path.suffix != ".jsonl":
        raise UserError(f"--input {path}: --sft reads .json (a list of records) or .jsonl (one record per line)")
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{lineno}: not UTF-8 (byte {err.start} of the line); re-encode the file as UTF-8") from None
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); one record per line expected") from None


def _string(where: str, value, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {name!r} is {type(value).__name__}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: {name!r} is not valid UTF-8; re-encode the file as UTF-8") from None
    return value


def record_messages(where: str, rec) -> tuple[list[dict], int]:
    """(chat messages, difficulty level index or -1) of one record."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    level = -1
    if rec.get("difficulty") is not None:
        diff = _string(where, rec["difficulty"], "difficulty").strip().lower()
        if diff not in LEVELS:
            raise UserError(f"{where}: difficulty {diff!r} is not one of {', '.join(LEVELS)}")
        level = LEVELS.index(diff)
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise UserError(f"{where}: messages[{i}] needs a role among {', '.join(_ROLES)}")
            out.append({"role": m["role"], "content": _string(where, m.get("content"), f"messages[{i}].content")})
        if out[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's (the answer trained on)")
        return out, level
    if "output" not in rec:
        raise UserError(f"{where}: missing 'output' (records need instruction/output, or chat 'messages')")
    if "instruction" not in rec:
        raise UserError(f"{where}: missing 'instruction'")
    instruction = _string(where, rec["instruction"], "instruction")
    extra = rec.get("input")
    extra = "" if extra is None else _string(where, extra, "input")
    output = _string(where, rec["output"], "output")
    user = f"{instruction}\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}], level


# ---------------------------------------------------------------------------------------------------
# rendering: token ids + answer mask
# ---------------------------------------------------------------------------------------------------
def _plain(messages: list[dict], eos: str, upto_assistant: bool) -> str:
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(f"System: {m['content']}\n\n")
        elif m["role"] == "user":
            parts.append(f"User: {m['content']}\n\n")
        else:
            parts.append(f"Assistant: {m['content']}{eos}")
    text = "".join(parts)
    return text + "Assistant: " if upto_assistant else text


def render(tok, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a 0/1 mask marking the assistant turns' tokens."""
    templated = bool(getattr(tok, "chat_template", None))
    eos = tok.eos_token or ""

    def text(msgs, gen):
        if templated:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return _plain(msgs, eos, gen)

    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    # Each piece of text (prompt up to an answer, the answer) is tokenized on its own and the ids concatenated,
    # so a BPE merge across the prompt/answer boundary cannot blur which tokens are the answer.
    tokens: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = text(messages[:i], True), text(messages[:i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError(f"{where}: the chat template does not render the conversation as a growing prefix; "
                            "cannot tell prompt from answer tokens")
        for piece, flag in ((prompt[len(done):], 0), (full[len(prompt):], 1)):
            got = ids(piece) if piece else []
            tokens += got
            mask += [flag] * len(got)
        done = full
    return tokens, mask


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------
def paths_for(prefix: str) -> dict[str, Path]:
    p = Path(prefix)
    return {"bin": p.with_name(p.name + ".bin"), "idx": p.with_name(p.name + ".idx"),
            "mask_bin": p.with_name(p.name + ".mask.bin"), "mask_idx": p.with_name(p.name + ".mask.idx"),
            "meta": p.with_name(p.name + ".sft.json")}


def preprocess_sft(inputs: list[str], tokenizer_dir: str, output_prefix: str, seq_length: int | None = None,
                   drop_long: bool = False, force: bool = False) -> dict:
    """Tokenize SFT records into PREFIX.{bin,idx,mask.bin,mask.idx,sft.json}; returns the summary.
    Every record is checked before anything is written."""
    import numpy

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_patch.data.preprocess import load_tokenizer

    if seq_length is not None and seq_length < 2:
        raise UserError(f"--seq-length {seq_length}: must be >= 2")
    if drop_long and seq_length is None:
        raise UserError("--drop-long needs --seq-length N")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise UserError(f"--input {p}: file not found")
    _check_outputs(output_prefix, paths, force)
    tok = load_tokenizer(tokenizer_dir)
    samples: list[tuple[list[int], list[int]]] = []
    levels: list[int] = []
    summary = {"records": 0, "samples": 0, "tokens": 0, "answer_tokens": 0, "truncated": 0, "dropped_long": 0,
               "dropped_no_answer": 0, "template": "chat" if getattr(tok, "chat_template", None) else PLAIN_TEMPLATE,
               "levels": {name: 0 for name in LEVELS} | {"none": 0}}
    for path in paths:
        for number, rec in iter_records(path):
            where = f"{path}:{number}"
            messages, level = record_messages(where, rec)
            ids, mask = render(tok, messages, where)
            summary["records"] += 1
            if seq_length is not None and len(ids) > seq_length:
                if drop_long:
                    summary["dropped_long"] += 1
                    continue
                ids, mask = ids[:seq_length], mask[:seq_length]
                summary["truncated"] += 1
            if not any(mask[1:]):  # the first token is never a label
                summary["dropped_no_answer"] += 1
                continue
            samples.append((ids, mask))
            levels.append(level)
            summary["levels"][LEVELS[level] if level >= 0 else "none"] += 1
            summary["samples"] += 1
            summary["tokens"] += len(ids)
            summary["answer_tokens"] += sum(mask)
    if not samples:
        raise UserError(f"no usable samples in {', '.join(map(str, paths))} (all dropped: see --seq-length)")
    out = paths_for(output_prefix)
    out["bin"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {k: v.with_name(v.name + f".tmp-{os.getpid()}") for k, v in out.items()}
    try:
        tokens = IndexedDatasetBuilder(str(tmp["bin"]), dtype=DType.optimal_dtype(len(tok)))
        masks = IndexedDatasetBuilder(str(tmp["mask_bin"]), dtype=numpy.uint8)
        for ids, mask in samples:
            tokens.add_document(ids, [len(ids)])
            masks.add_document(mask, [len(mask)])
        tokens.finalize(str(tmp["idx"]))
        masks.finalize(str(tmp["mask_idx"]))
        meta = {"format": "sft", "levels": list(LEVELS), "difficulty": levels, "seq_length": seq_length,
                "tokenizer": str(tokenizer_dir), "summary": summary}
        tmp["meta"].write_text(json.dumps(meta) + "\n")
        for key in ("bin", "idx", "mask_bin", "mask_idx", "meta"):  # meta last: it marks a complete dataset
            os.replace(tmp[key], out[key])
    finally:
        for leftover in tmp.values():
            if leftover.exists():
                leftover.unlink()
    return summary


def _check_outputs(prefix: str, inputs: list[Path], force: bool) -> None:
    """As plain preprocess: an existing dataset is replaced only with --force, and only one this command wrote."""
    from megatron_patch.data.preprocess import _check_output

    out = paths_for(prefix)
    _check_output(Path(prefix), inputs, force)  # PREFIX.bin/.idx
    _check_output(Path(prefix + ".mask"), inputs, force)
    if out["meta"].exists() and not force:
        raise UserError(f"output {out['meta']} already exists (pass --force to replace it, or choose another "
                        "--output-prefix)")


def is_sft_prefix(prefix: str) -> bool:
    return paths_for(prefix)["meta"].is_file()


def run(args) -> int:
    s = preprocess_sft(args.input, args.tokenizer, args.output_prefix, seq_length=args.seq_length,
                       drop_long=args.drop_long, force=args.force)
    lv = ", ".join(f"{k} {v}" for k, v in s["levels"].items())
    print(f"wrote {args.output_prefix}.bin/.idx + .mask.bin/.idx + .sft.json: {s['samples']} of {s['records']} "
          f"records, {s['tokens']} tokens ({s['answer_tokens']} answer), {s['template']} template; "
          f"truncated {s['truncated']}, dropped too long {s['dropped_long']}, dropped without answer tokens "
          f"{s['dropped_no_answer']}; levels: {lv}")
    return 0


# ---------------------------------------------------------------------------------------------------
# training: samples and global batches
# ---------------------------------------------------------------------------------------------------
def pack_plan(costs, levels, capacity: int) -> list[list[int]]:
    """`--pack`: sample indices per packed sequence. Best fit decreasing within each difficulty level (a pack holds
    one level, so the curriculum draws packs as it draws samples): each sample (longest first, ties by index) goes
    into the pack with the least room that still holds its `cost` tokens; samples keep index order inside a pack,
    packs are ordered by their first sample. A pure function of (costs, levels, capacity)."""
    import bisect

    packs: list[list[int]] = []
    for level in sorted(set(levels)):
        order = sorted((i for i, lv in enumerate(levels) if lv == level), key=lambda i: (-costs[i], i))
        room: list[tuple[int, int]] = []  # (free tokens, pack number), sorted
        members: list[list[int]] = []
        for i in order:
            at = bisect.bisect_left(room, (costs[i], -1))
            if at == len(room):
                members.append([i])
                free, n = capacity - costs[i], len(members) - 1
            else:
                free, n = room.pop(at)
                members[n].append(i)
                free -= costs[i]
            bisect.insort(room, (free, n))
        packs += [sorted(m) for m in members]
    return sorted(packs)


class SFTDataset:
    """One sample per sequence: ids cut/padded to seq_length + 1; tokens = ids[:-1], labels = ids[1:],
    loss mask = answer mask of the labels (padding masked).

    pack=True: several samples per sequence (`pack_plan`). Each sample is shifted on its own (its last token
    predicts nothing of the next sample) and takes len - 1 positions; position ids restart at 0 for every sample
    and for the padding after the last one, which is how the model finds the samples' boundaries
    (`training.step.packed_params`: attention stays within each sample, RoPE positions restart)."""

    def __init__(self, prefix: str, seq_length: int, pad_id: int, pack: bool = False, flag: str = "--data-path"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        meta_path = paths_for(prefix)["meta"]
        if not meta_path.is_file():
            raise UserError(f"{flag} {prefix}: no {meta_path.name}; make SFT data with "
                            "`megatron-patch preprocess --sft`")
        self.meta = json.loads(meta_path.read_text())
        self.tokens = IndexedDataset(prefix)
        self.masks = IndexedDataset(prefix + ".mask")
        difficulty = self.meta["difficulty"]
        if len(self.tokens) != len(self.masks) or len(self.tokens) != len(difficulty):
            raise UserError(f"{flag} {prefix}: tokens, mask and {meta_path.name} disagree on the sample count; "
                            "preprocess again")
        self.seq_length, self.pad_id = seq_length, pad_id
        self.packs = None
        self.difficulty = difficulty
        if pack:
            costs = [min(int(n), seq_length + 1) - 1 for n in self.tokens.sequence_lengths]
            self.packs = pack_plan(costs, difficulty, seq_length)
            self.difficulty = [difficulty[p[0]] for p in self.packs]

    def __len__(self) -> int:
        return len(self.tokens) if self.packs is None else len(self.packs)

    def _shifted(self, i: int):
        """(tokens, labels, loss mask) of sample i, cut at seq_length + 1 ids."""
        import torch

        ids = torch.from_numpy(self.tokens[i][:self.seq_length + 1].astype("int64"))
        mask = torch.from_numpy(self.masks[i][:self.seq_length + 1].astype("float32"))
        return ids[:-1], ids[1:], mask[1:]

    def sample(self, i: int):
        """tokens, labels, loss mask [seq_length] (+ position ids when packed)."""
        import torch

        n = self.seq_length
        parts = [self._shifted(i)] if self.packs is None else [self._shifted(j) for j in self.packs[i]]
        tokens = torch.full((n,), self.pad_id, dtype=torch.int64)
        labels = torch.full((n,), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(n, dtype=torch.float32)
        positions = torch.zeros(n, dtype=torch.int64)
        at = 0
        for tok, lab, msk in parts:
            tokens[at:at + len(tok)], labels[at:at + len(tok)], mask[at:at + len(tok)] = tok, lab, msk
            positions[at:at + len(tok)] = torch.arange(len(tok))
            at += len(tok)
        positions[at:] = torch.arange(n - at)  # the padding is a segment of its own
        return (tokens, labels, mask) if self.packs is None else (tokens, labels, mask, positions)


def collate(dataset: SFTDataset, indices):
    """A Batch of the dataset's rows `indices` (with position ids when packed)."""
    import torch

    from megatron_patch.data.batch import Batch

    rows = [dataset.sample(int(i)) for i in indices]
    return Batch(*(torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))))


class SFTBatches:
    """Global batches for `train --sft` (the GlobalBatches interface: peek, next, consumed)."""

    def __init__(self, dataset: SFTDataset, sampler):
        self.dataset, self.sampler = dataset, sampler

    @property
    def consumed(self) -> int:
        return self.sampler.step * self.sampler.gbs

    def peek(self):
        return collate(self.dataset, self.sampler.batch(self.sampler.step))

    def next(self):
        return collate(self.dataset, self.sampler.next())


class ValidationBatches:
    """`--valid-data-path` with --sft: the validation rows in order, global batch after global batch (wrapping
    around a set smaller than --eval-iters x the global batch), so every evaluation sees the same batches."""

    def __init__(self, dataset: SFTDataset, global_batch_size: int):
        self.dataset, self.gbs, self.at = dataset, global_batch_size, 0

    def next(self):
        rows = [(self.at + k) % len(self.dataset) for k in range(self.gbs)]
        self.at += self.gbs
        return collate(self.dataset, rows)


def write_report(path: str, sampler) -> None:
    """--curriculum-report: {"stages": [{"start_step", "end_step", "counts": {level: n}}]} of what was drawn."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"stages": sampler.counts()}, indent=1) + "\n")
    os.replace(tmp, target)
