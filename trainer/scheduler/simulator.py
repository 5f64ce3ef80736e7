"""Replay of a training step as tasks on a compute stream and a communication stream.

Each stream runs its tasks one at a time in the order they were issued; a task
starts when the previous task on its stream and all its dependencies are done.
Streams: "compute", "comm" (the MoE all-to-alls, on the ep communicator) and
"grad" (gradient reductions, on the dp/edp communicators, which run beside the
all-to-alls as separate communicators do). Contention: while compute and any
communication run together, all of them run `overlap_slowdown` times slower
(they share memory bandwidth, cores or SMs); communication streams running
together share the link equally. That is how overlap stops being free.
The cost model builds the tasks (from a profile or a hardware description);
the planner compares the makespans of candidate plans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Stream = Literal["compute", "comm", "grad"]
STREAMS: tuple[Stream, ...] = ("compute", "comm", "grad")


@dataclass
class Task:
    name: str
    stream: Stream
    seconds: float
    deps: list[int] = field(default_factory=list)
    start: float = -1.0
    end: float = -1.0


@dataclass(frozen=True)
class Timeline:
    tasks: list[Task]
    makespan: float

    def busy(self, stream: Stream) -> float:
        return sum(t.end - t.start for t in self.tasks if t.stream == stream)

    def work(self, stream: Stream, prefix: str = "") -> float:
        """Seconds of work issued to a stream (at full speed), optionally only tasks named prefix*."""
        return sum(t.seconds for t in self.tasks if t.stream == stream and t.name.startswith(prefix))

    @property
    def exposed_comm(self) -> float:
        """Time the compute stream sat idle: communication (and waiting) that was not hidden."""
        return self.makespan - self.busy("compute")


class Schedule:
    """Builder: add tasks in program order, then `run()`."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def add(self, name: str, stream: Stream, seconds: float, deps: list[int] | tuple[int, ...] = ()) -> int:
        if seconds < 0:
            raise ValueError(f"task {name} has negative duration {seconds}")
        self.tasks.append(Task(name, stream, seconds, [d for d in deps if d is not None]))
        return len(self.tasks) - 1

    def run(self, overlap_slowdown: float = 1.0) -> Timeline:
        tasks = self.tasks
        queues: dict[str, list[int]] = {stream: [] for stream in STREAMS}
        for i, t in enumerate(tasks):
            queues[t.stream].append(i)
        heads = {s: 0 for s in queues}
        remaining = [t.seconds for t in tasks]
        running: dict[str, int] = {}
        now = 0.0
        done = 0
        while done < len(tasks):
            for stream, queue in queues.items():
                if stream in running or heads[stream] >= len(queue):
                    continue
                i = queue[heads[stream]]
                if all(tasks[d].end >= 0 and tasks[d].end <= now for d in tasks[i].deps):
                    running[stream] = i
                    tasks[i].start = now
            if not running:
                blocked = [tasks[q[heads[s]]].name for s, q in queues.items() if heads[s] < len(q)]
                raise ValueError(f"schedule deadlocks: {blocked} wait on tasks that never run")
            comm_running = sum(1 for stream in running if stream != "compute")
            contended = 1.0 / overlap_slowdown if comm_running and "compute" in running else 1.0
            rate = {stream: contended / (comm_running if stream != "compute" else 1) for stream in running}
            step = min(remaining[i] / rate[stream] for stream, i in running.items())
            now += step
            for stream, i in list(running.items()):
                remaining[i] -= step * rate[stream]
                if remaining[i] <= 1e-15:
                    tasks[i].end = now
                    heads[stream] += 1
                    del running[stream]
                    done += 1
        return Timeline(tasks, now)
