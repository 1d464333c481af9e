"""Where a run's loop stands: one value that the stages update and the checkpoint meta,
the stall watchdog's message and the preemption save read."""

import dataclasses
import time


@dataclasses.dataclass
class Progress:
  """Where the loop stands; mutated by the stages as they go."""

  epoch: int  # the epoch being trained
  step: int  # its batches done
  saved: int | None  # global step of the latest checkpoint
  history: list[dict]  # one record per finished epoch (metrics.jsonl)
  eval_hash: str | None  # the last evaluation's candidates digest
  hash_steps: int | None  # batches of the running epoch that state.hash_chain covers
  elapsed_before: float  # wall seconds of the run before this process resumed it
  reached: int | None = None  # the epoch that reached config.hr_threshold
  stop_early: bool = False
  preempted: bool = False
  stop_reason: str | None = None  # what stopped it midway: 'SIGTERM' or 'Ctrl-C'
  calls: int = 0  # train calls in this process (the preemption check's counter)
  evaluations: int = 0  # evaluations in this process (the first one compiles)
  t_start: float = dataclasses.field(default_factory=time.time)
  t_epoch: float = 0.0

  @property
  def finished(self) -> bool:
    return self.reached is not None or self.stop_early

  def wall_s(self) -> float:
    return self.elapsed_before + (time.time() - self.t_start)
