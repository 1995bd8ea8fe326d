"""When a training run pauses to save: on a signal (a scheduler's preemption, Ctrl-C) and every few minutes.

`StopSignals` turns the first SIGTERM or SIGINT into a request that the training loop sees after its current step
(it then saves and exits); a second Ctrl-C stops at once, as usual. Data loading workers, of training and of
evaluation, ignore both signals (`ignore_stop_signals`): a terminal's Ctrl-C and srun's SIGTERM reach every process
of the job, and a worker that died would end the step (or the validation) instead of letting the main process
stop it and save. The cost: DataLoader's last resort for a worker that does not exit when told, a SIGTERM, no
longer ends it (such a worker is stuck in a read, and ends with it).

Other commands only need SIGTERM to end them as Ctrl-C does, cleaning up: utils.errors.run_cli does that.
"""
import signal
import threading
import time


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT set `received` (the signal's name) instead of stopping.
    Entered outside the main thread (train.main run by a service or a GUI in a worker thread) it installs nothing:
    Python takes handlers only from the main thread and runs them only there, so the caller's own handling stays."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: finishing the current step, then saving a checkpoint "
              "(Ctrl-C again stops at once, losing the work since the last checkpoint)", flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + signal.Signals[self.received].value if self.received else 0


def ignore_stop_signals(worker_id: int = 0) -> None:
    """`worker_init_fn` of the training and evaluation DataLoaders (see the module docstring)."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class CheckpointTimer:
    """`due()` once `minutes` have passed since the last `reset()` (never when `minutes` is 0)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds
