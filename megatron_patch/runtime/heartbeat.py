"""A stopped or dead rank is found within seconds, not at the process group's timeout.

Every rank beats (a counter and its current step) into the process group's key-value store from a daemon
thread, and watches the next rank in a ring. A beat that has not changed for `timeout` seconds (measured
on the watcher's own clock: no clock skew between nodes) means that rank stopped (SIGSTOP, a dead node,
a frozen process): the watcher posts an abort naming it and the step, and every rank, polling the abort
key, prints one `error:` line and exits with code 3. A rank busy in a long step keeps beating (the thread
runs beside it), so only a process that no longer runs at all is reported; a hang inside a collective is
bounded by --distributed-timeout-minutes. A new step beats at once, so the last beat of a rank that stops or dies
names the step it was in. A rank that dies (SIGKILL, a lost node) breaks the survivors' next collective first:
they name it from the beats (gone_ranks) rather than by gloo's or NCCL's socket error.

The heartbeat starts on the rendezvous store, before the process group is made (gloo and NCCL wait there for
every rank for the whole process-group timeout): a rank stopped or dead during start-up (`step` None, "start-up"
in the lines) is reported within the same timeout as one stopped mid-training.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from megatron_patch.runtime.distributed_init import record_step

EXIT_CODE = 3
_ABORT = "mp_heartbeat/abort"
STARTUP = "start-up"


class Heartbeat:
    def __init__(self, store, rank: int, world: int, timeout: float, on_abort=None, watch: bool = True):
        """`watch=False`: only beat (a supervisor outside the ranks watches, runtime.multirank); the rank still
        ends itself (exit 3) when the store stops answering."""
        # its own connection: a store client serialises its calls, and the main thread may wait in one for long
        # (gloo's start-up waits there for every rank's address)
        self.store, self.rank, self.world, self.timeout = store.clone(), rank, world, timeout
        self._step: int | None = None  # None: start-up (before the first training step)
        self.on_abort, self.watch = on_abort, watch
        self.interval = max(0.2, min(5.0, timeout / 5))
        self._stop = threading.Event()
        self._new_step = threading.Event()  # wakes the beating thread (the main thread never waits on the store)
        self._beats = 0
        self._beat()
        record_step(STARTUP)
        self._thread = threading.Thread(target=self._run, name="mp-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"mp_heartbeat/{rank}"

    @staticmethod
    def step_of(value: str | None) -> str:
        """The step a beat value ("COUNT STEP") names; STARTUP when there is no beat yet."""
        return value.split()[1] if value else STARTUP

    @property
    def step(self) -> int | None:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """A new step beats at once: the last beat of a rank that stops or dies then names its true step (beats
        every interval alone lagged up to an interval, several steps, behind), and torchrun's agent can name it."""
        self._step = value
        record_step(value)
        self._new_step.set()

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(self._key(self.rank), f"{self._beats} {STARTUP if self.step is None else self.step}")

    def _last_beats(self) -> dict[int, str | None]:
        keys = {rank: self._key(rank) for rank in range(self.world) if rank != self.rank}
        return {rank: self.store.get(key).decode() if self.store.check([key]) else None for rank, key in keys.items()}

    def gone_ranks(self) -> dict[int, str]:
        """After a collective failed because a peer dropped its connection: the ranks whose beat does not move
        for two beat intervals and half a second (a dead process beats no more; a live one beats from its thread,
        stuck or not), each with the step of its last beat. Of two ranks, the peer that dropped is the other."""
        first = self._last_beats()
        step = {rank: self.step_of(value) for rank, value in first.items()}
        if self.world == 2:
            return step
        self._new_step.set()  # beat now: the other survivors see this rank alive at once
        silent, deadline = set(first), time.monotonic() + 2 * self.interval + 0.5
        while silent and time.monotonic() < deadline:
            time.sleep(self.interval / 4)  # every rank's key each time: not too often
            now = self._last_beats()
            silent = {rank for rank in silent if now[rank] == first[rank]}
        return {rank: step[rank] for rank in sorted(silent)}

    def _run(self) -> None:
        watched = (self.rank + 1) % self.world
        interval = self.interval
        last, changed = None, time.monotonic()
        due = time.monotonic() + interval
        while True:
            self._new_step.wait(max(0.0, due - time.monotonic()))
            self._new_step.clear()
            if self._stop.is_set():
                return
            try:
                self._beat()
                if time.monotonic() < due:  # woken by a new step: beat only
                    continue
                due = time.monotonic() + interval
                if not self.watch:
                    continue
                if self.store.check([_ABORT]):
                    self._abort(self.store.get(_ABORT).decode())
                if self.store.check([self._key(watched)]):
                    value = self.store.get(self._key(watched)).decode()
                    if value != last:
                        last, changed = value, time.monotonic()
                if time.monotonic() - changed > self.timeout:
                    step = self.step_of(last)
                    silent = f"no heartbeat for {self.timeout:.0f} s"
                    message = (f"rank {watched} stopped responding during start-up ({silent}" if step == STARTUP else
                               f"rank {watched} stopped responding ({silent}, the last one at step {step}")
                    message += f"; seen by rank {self.rank})"
                    self.store.set(_ABORT, message)
                    self._abort(message)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                if self._stop.is_set():
                    return
                self._abort(f"the job's key-value store stopped answering (its host gone?) at {self.where()}")

    def _abort(self, message: str) -> None:
        if self._stop.is_set():
            return
        print(f"error: {message}; rank {self.rank} ({self.where()}) exits with code {EXIT_CODE}",
              file=sys.stderr, flush=True)
        if self.on_abort is not None:
            self.on_abort(EXIT_CODE)
        os._exit(EXIT_CODE)

    def describe_gone(self) -> str:
        """'rank 1 is gone (last heartbeat at step 6)': the ranks gone_ranks() finds, for the survivors' line."""
        gone = self.gone_ranks()
        if not gone:
            return "another rank is gone (its connection closed, though every rank still beats)"
        return "; ".join(f"rank {rank} is gone (last heartbeat " + (
            "during start-up)" if step == STARTUP else f"at step {step})") for rank, step in gone.items())

    def where(self) -> str:
        return STARTUP if self.step is None else f"step {self.step}"

    def stop(self) -> None:
        self._stop.set()
        self._new_step.set()
