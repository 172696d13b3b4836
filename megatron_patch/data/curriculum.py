"""Which SFT samples each global batch holds: plain shuffled epochs, or a difficulty curriculum.

Curriculum (seed 002): stages are spans of training (percent of --train-iters) with a share per level
(explain/reasoning/topology). `--curriculum-stages` SPEC is a comma-separated list of
`START-END:EXPLAIN/REASONING/TOPOLOGY` (percent; shares in percent, summing to 100), e.g. the default
`0-30:80/20/0,30-70:40/40/20,70-100:25/35/40`. Stage boundaries are at START * train_iters // 100.

Within a stage, sample after sample goes to the level furthest below its share (ties: the easier level),
so every stage's counts follow its shares to within one sample. Each level draws its samples in a seeded
random order without repeats; a level with fewer samples than the whole run needs from it is drawn with
replacement (seeded). A global batch is then shuffled (seeded by step), and split over data-parallel
ranks as every batch is, so the stream does not depend on the DP size. Everything is a function of
(levels, seed, stages, train_iters, global batch): the checkpointed state is the step, and resuming replays
to it and checks the saved counts.
"""
from __future__ import annotations

import numpy

from megatron_patch.data.sft import LEVELS
from megatron_patch.errors import UserError

DEFAULT_STAGES = "0-30:80/20/0,30-70:40/40/20,70-100:25/35/40"


def parse_stages(spec: str) -> list[tuple[int, int, tuple[float, ...]]]:
    """[(start %, end %, shares per level)] covering 0-100 without gaps."""
    stages = []
    for part in spec.split(","):
        try:
            span, shares = part.strip().split(":")
            start, end = (int(x) for x in span.split("-"))
            values = tuple(float(x) for x in shares.split("/"))
        except ValueError:
            raise UserError(f"--curriculum-stages {spec!r}: {part!r} is not START-END:E/R/T (e.g. "
                            f"{DEFAULT_STAGES})") from None
        if len(values) != len(LEVELS) or min(values) < 0 or abs(sum(values) - 100) > 1e-6:
            raise UserError(f"--curriculum-stages: {part!r} needs {len(LEVELS)} shares ({'/'.join(LEVELS)}) "
                            "in percent summing to 100")
        stages.append((start, end, tuple(v / 100 for v in values)))
    if stages[0][0] != 0 or stages[-1][1] != 100 or any(a[1] != b[0] for a, b in zip(stages, stages[1:])) \
            or any(s >= e for s, e, _ in stages):
        raise UserError(f"--curriculum-stages {spec!r}: stages must cover 0-100 in order without gaps")
    return stages


class BatchSampler:
    """Sample indices of global batch `step` (0-based), in order; `state()` is what a checkpoint keeps."""

    def __init__(self, difficulty, train_iters: int, global_batch_size: int, seed: int,
                 stages: list | None = None, log=print):
        self.difficulty = numpy.asarray(difficulty, dtype=numpy.int64)
        self.train_iters, self.gbs, self.seed = train_iters, global_batch_size, seed
        self.log = log
        self.step = 0
        if stages is not None and (self.difficulty < 0).all():
            log("warning: --curriculum: the data has no 'difficulty' field; sampling plainly (shuffled epochs)")
            stages = None
        elif stages is not None and (self.difficulty < 0).any():
            raise UserError(f"--curriculum: {int((self.difficulty < 0).sum())} samples have no 'difficulty'; give "
                            "every record one of " + ", ".join(LEVELS) + " (or train without --curriculum)")
        self.curriculum = stages is not None
        if self.curriculum:
            self.groups = [numpy.flatnonzero(self.difficulty == lv) for lv in range(len(LEVELS))]
            self.stages = []
            for start, end, shares in stages:
                shares = numpy.array([s if len(g) else 0.0 for s, g in zip(shares, self.groups)])
                if shares.sum() == 0:
                    raise UserError(f"--curriculum: stage {start}-{end}% draws only from levels with no samples")
                self.stages.append((start * train_iters // 100, end * train_iters // 100, shares / shares.sum()))
            missing = [lv for lv, g in zip(LEVELS, self.groups) if not len(g)]
            if missing:
                log(f"warning: --curriculum: no samples of level {', '.join(missing)}; its share goes to the others")
        else:
            self.groups = [numpy.arange(len(self.difficulty))]
            self.stages = [(0, train_iters, numpy.ones(1))]
        self.levels_by_step = self._assign_levels()
        self.draws = self._draws()
        # offsets[step, level]: draws a level made before `step`
        per_step = numpy.stack([(self.levels_by_step == lv).sum(1) for lv in range(len(self.groups))], axis=1)
        self.offsets = numpy.concatenate([numpy.zeros((1, len(self.groups)), numpy.int64), per_step.cumsum(0)])

    def _assign_levels(self) -> numpy.ndarray:
        """[train_iters, gbs] level index of every sample slot (before the in-batch shuffle)."""
        out = numpy.zeros((self.train_iters, self.gbs), dtype=numpy.int64)
        for start, end, shares in self.stages:
            assigned = numpy.zeros(len(shares))
            for step in range(start, end):
                for slot in range(self.gbs):
                    level = int(numpy.argmax(shares * (assigned.sum() + 1) - assigned - 1e-12 * numpy.arange(len(shares))))
                    assigned[level] += 1
                    out[step, slot] = level
        return out

    def _draws(self) -> list[numpy.ndarray]:
        """Per level, the sample indices it hands out in order over the whole run."""
        draws = []
        for level, group in enumerate(self.groups):
            need = int((self.levels_by_step == level).sum())
            rng = numpy.random.default_rng([self.seed, level])
            if self.curriculum and need > len(group):  # a short level: resampled with replacement
                draws.append(group[rng.integers(0, len(group), size=need)])
            else:  # shuffled epochs (one epoch covers a curriculum level's whole need)
                epochs = -(-need // max(1, len(group)))
                draws.append(numpy.concatenate([rng.permutation(group) for _ in range(max(1, epochs))])[:need])
        return draws

    def stage_of(self, step: int) -> int:
        return next(i for i, (s, e, _) in enumerate(self.stages) if s <= step < e or (e == self.train_iters and step >= e))

    def batch(self, step: int) -> numpy.ndarray:
        if step >= self.train_iters:
            raise UserError(f"step {step + 1} is past --train-iters {self.train_iters}")
        levels = self.levels_by_step[step]
        offsets = list(self.offsets[step])
        picked = []
        for lv in levels:
            picked.append(self.draws[lv][offsets[lv]])
            offsets[lv] += 1
        order = numpy.random.default_rng([self.seed, 1 << 20, step]).permutation(self.gbs)
        return numpy.asarray(picked)[order]

    def next(self) -> numpy.ndarray:
        if self.curriculum:
            stage = self.stage_of(self.step)
            start, end, shares = self.stages[stage]
            if self.step == start:
                mix = " ".join(f"{lv} {100 * s:.0f}%" for lv, s in zip(LEVELS, shares))
                self.log(f"curriculum: stage {stage + 1}/{len(self.stages)} (steps {start + 1}-{end}): {mix}")
        out = self.batch(self.step)
        self.step += 1
        return out

    def counts(self, upto: int | None = None) -> list[dict]:
        """The report: what stages drew up to step `upto` (default: the current step)."""
        upto = self.step if upto is None else upto
        report = []
        for start, end, _ in self.stages:
            rows = self.levels_by_step[start:min(end, upto)]
            names = LEVELS if self.curriculum else ("all",)
            report.append({"start_step": start, "end_step": end,
                           "counts": {n: int((rows == i).sum()) for i, n in enumerate(names)}})
        return report

    def state(self) -> dict:
        return {"step": self.step, "seed": self.seed, "curriculum": self.curriculum,
                "stages": [[s, e, [float(x) for x in sh]] for s, e, sh in self.stages], "counts": self.counts()}

    def restore(self, saved: dict | None, step: int) -> None:
        """Continue at `step`; a saved state must be the one this sampler reaches there."""
        self.step = step
        if self.curriculum and 0 < step < self.train_iters and self.stages[self.stage_of(step)][0] != step:
            stage = self.stage_of(step)
            self.log(f"curriculum: resuming at step {step + 1} in stage {stage + 1}/{len(self.stages)}")
        if saved is not None and saved != self.state():
            raise UserError("the checkpoint's SFT sampler state differs from this run's (other --curriculum-seed, "
                            "--curriculum-stages, --global-batch-size, --train-iters or data); resume with the "
                            "same settings")
