"""The bench's scheduler: which step runs when, and with how much memory.

A bench (:mod:`kembed.bench`) or a tuning grid (``kembed tune``) is a list of :class:`Step`
subprocesses with needs. :func:`execute` runs them, up to ``jobs`` at once, keeping the expected
peak memory of the steps that run together within the machine's (:func:`startable`), and
resumes nothing itself: a step whose output exists is skipped, and an interrupted one resumes
from its own checkpoints when it runs again. :func:`expected` turns recorded step times and
peaks into expectations for steps not recorded yet; :func:`longest_first` orders the steps by
them and :func:`simulate` / :func:`forecast` predict the wall time (``kembed bench --plan``).
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Callable

# in a step's argv: the step copies a finished run (kembed.bench.reuse_run) instead of training one
REUSE_CALL = "from kembed.bench import reuse_run"


@dataclass
class Step:
    """One subprocess of a bench: ``argv()`` is built when it runs; ``done()`` says whether its
    output already exists; ``needs``: the labels of steps that must have succeeded;
    ``copies_tuning``: a test run expected to be a copy of the selected tuning run
    (:func:`kembed.bench._train_or_reuse`), not a training."""

    label: str
    argv: Callable[[], list[str]]
    done: Callable[[], bool] = lambda: False
    needs: list[str] = field(default_factory=list)
    copies_tuning: bool = False


def step_kind(label: str, domains: list[str]) -> str:
    """What a step does, apart from where: ``"<model>: <step>"`` without the domain and the
    seed (``"rlag: train"``, ``"base: eval closed-book-raw"``); a tuning step is its method's
    training (``"tune current-events rlag (lr x2, epochs x1): train"`` -> ``"rlag: train"``)."""
    if label.startswith("tune "):
        return label.split(" ")[2] + ": train"
    domain = domain_of(label, domains)
    rest = label[len(domain) + 1:] if domain else label
    return re.sub(r" \(seed \d+\)", "", rest)


def group_of(label: str, domains: list[str]) -> str:
    """``"tuning"`` for a step of a tuning grid, else the step's domain (``"other"`` if none)."""
    return "tuning" if label.startswith("tune ") else domain_of(label, domains) or "other"


def domain_of(label: str, domains: list[str]) -> str | None:
    """The domain a step label (``"<domain> <model>: <step>"``) belongs to; None for a tuning
    step or another label."""
    return next((d for d in domains if label.startswith(f"{d} ")), None)


def expected(steps: list[Step], values: dict[str, float], domains: list[str], of_kind=fmean,
             questions: dict[str, int] | None = None) -> dict[str, float]:
    """Label -> what each step is expected to take (seconds or MiB, :func:`kembed.bench.recorded`): 0 for a
    copy of a tuning run (``Step.copies_tuning``), else its own recorded value (``values``, by
    label), else ``of_kind`` (the mean; :func:`expected_memory` takes the largest) of the
    recorded values of its kind (:func:`step_kind`), else, for a step that
    does not train, the mean of the same step of the other models (``eval
    retrieved-context-raft``: scoring costs about the same whatever trained the model; a
    training's cost depends on its method; a retention step, of every retention step, whatever
    domain it scores: a medical model's ``retention current-events`` before any ran), else 0.

    ``questions``: domain -> questions each of its evaluations scores (``eval_sample`` or the
    whole split). When given, an evaluation (``eval ...``) not recorded itself is expected per
    question: recorded evaluations count per question of their domain, times the questions of
    its own (medical's 300 sampled questions took about twice current-events' 162 each); it
    names every domain of ``domains``."""
    questions = questions or {}
    kinds: dict[str, list[float]] = {}

    def per_question(label: str) -> float:
        if not _action(step_kind(label, domains)).startswith(": eval "):
            return 1.0
        return questions.get(domain_of(label, domains), 1.0)

    for label, value in values.items():
        kind = step_kind(label, domains)
        kinds.setdefault(kind, []).append(value / per_question(label))
        kinds.setdefault(_action(kind), []).append(value / per_question(label))

    def guess(label: str) -> float:
        kind = step_kind(label, domains)
        same = kinds.get(kind) or (kinds.get(_action(kind)) if _action(kind) != ": train" else None)
        if not same and _action(kind).startswith(": retention "):
            same = [v for k, vs in kinds.items() if k.startswith(": retention ") for v in vs]
        return of_kind(same or [0.0]) * per_question(label)

    return {s.label: 0.0 if s.copies_tuning else values.get(s.label, guess(s.label)) for s in steps}


def expected_memory(steps: list[Step], memory: dict[str, float], domains: list[str]) -> dict[str, float]:
    """Label -> each step's expected peak resident memory in MiB: :func:`expected` of the
    recorded peaks (``memory``, :func:`kembed.bench.recorded` of ``max_rss_mb``) with the largest of a kind,
    not its mean, for a step not recorded itself: a peak that does not fit is an
    out-of-memory kill, not a late finish (medical's RLAG training peaked at 9.4 GB, its
    current-events trainings' mean was 8.9)."""
    return expected(steps, memory, domains, of_kind=max)


def _action(kind: str) -> str:
    """What a step of kind ``"<model>: <step>"`` (:func:`step_kind`) does, whatever the model:
    ``": <step>"`` (``": eval closed-book-raw"``, ``": train"``)."""
    return ": " + kind.split(": ", 1)[-1]


def longest_first(steps: list[Step], seconds: dict[str, float], domains: list[str],
                  questions: dict[str, int] | None = None) -> list[Step]:
    """``steps`` ordered for :func:`execute` with several jobs: by the expected seconds of the
    longest chain each step starts (itself and what needs it, transitively), longest first,
    plan order among equals, so that the longest training starts early instead of running alone
    at the end. ``seconds``: recorded step times by label (:func:`kembed.bench.recorded`, :func:`expected`).
    Needs keep their order: a step waits for them whatever its place. ``questions``: see :func:`expected`."""
    took = expected(steps, seconds, domains, questions=questions)
    dependents: dict[str, list[str]] = {}
    for step in steps:
        for need in step.needs:
            dependents.setdefault(need, []).append(step.label)
    chain: dict[str, float] = {}
    for step in reversed(steps):  # a step comes after its needs in a plan
        after = [chain.get(d, 0.0) for d in dependents.get(step.label, [])]
        chain[step.label] = took[step.label] + max(after, default=0.0)
    return sorted(steps, key=lambda s: -chain[s.label])


@functools.cache  # asked at every start decision of execute and simulate; the machine's memory does not change
def physical_memory_mb() -> float:
    """This machine's physical memory, in MiB."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def memory_limit_mb() -> float:
    """90% of this machine's physical memory, in MiB: what the expected peaks of steps running
    at once may add up to (:func:`execute`)."""
    return 0.9 * physical_memory_mb()


def startable(step: Step, running: list[str], done: set[str], jobs: int, memory_mb: dict[str, float] | None,
              alone: set[str] = frozenset()) -> bool:
    """The rule by which :func:`execute` starts ``step`` now, beside the ``running`` step labels:
    every step it needs is ``done``, fewer than ``jobs`` run, and the expected peak memory
    (``memory_mb``, MiB by label; None: not checked) of it and the running ones stays within
    :func:`memory_limit_mb` (a step alone always starts); a step in ``alone`` (killed once by
    SIGKILL) starts only with nothing running, and nothing starts beside it."""
    fits = (not memory_mb or not running
            or sum(memory_mb.get(x, 0.0) for x in [step.label, *running]) <= memory_limit_mb())
    return (all(n in done for n in step.needs) and len(running) < jobs and fits
            and (step.label not in alone or not running) and not any(label in alone for label in running))


def simulate(steps: list[Step], seconds: dict[str, float], memory: dict[str, float], domains: list[str],
             jobs: int, questions: dict[str, int] | None = None) -> float:
    """Seconds until every step has finished when :func:`execute` runs ``steps`` in list order
    with ``jobs`` jobs and each takes its expected time and memory (:func:`expected` of the
    recorded ``seconds`` and ``memory``, :func:`kembed.bench.recorded`). A need that is not among ``steps``
    counts as done. ``questions``: see :func:`expected`."""
    import heapq

    took, rss = expected(steps, seconds, domains, questions=questions), expected_memory(steps, memory, domains)
    pending, running, now = list(steps), [], 0.0
    finished = {n for s in steps for n in s.needs} - {s.label for s in steps}
    while pending or running:
        for step in list(pending):
            if startable(step, [label for _, label in running], finished, jobs, rss):
                pending.remove(step)
                heapq.heappush(running, (now + took[step.label], step.label))
        if not running:  # needs that nothing provides
            break
        now, label = heapq.heappop(running)
        finished.add(label)
    return now


def forecast(steps: list[Step], seconds: dict[str, float], memory: dict[str, float], domains: list[str],
             jobs: int, console, questions: dict[str, int] | None = None) -> float:
    """Print what ``steps`` are expected to cost (``kembed bench --plan``): per tuning grid and
    domain the steps, their expected minutes and how many have no recorded time of their kind,
    then the wall time :func:`simulate` gives with ``jobs``. Returns that wall time in seconds.
    ``questions``: see :func:`expected`."""
    from rich.table import Table

    took = expected(steps, seconds, domains, questions=questions)
    table = Table("steps of", "steps", "expected min", "no recorded time")
    copies = {s.label for s in steps if s.copies_tuning}  # these take no time, recorded or not
    groups: dict[str, list[str]] = {}
    for step in steps:
        groups.setdefault(group_of(step.label, domains), []).append(step.label)
    for group, labels in groups.items():
        table.add_row(group, str(len(labels)), f"{sum(took[x] for x in labels) / 60:.0f}",
                      str(sum(x not in seconds and took[x] == 0 and x not in copies for x in labels)))
    wall = simulate(steps, seconds, memory, domains, jobs, questions)
    console.print(table)
    console.print(f"{len(steps)} step(s) to run, {sum(took.values()) / 60:.0f} min of expected step time: about "
                  f"{wall / 60:.0f} min of wall time with --jobs {jobs}. Expected from the step times the committed "
                  "reports and this output folder recorded (of the same step, else the mean of its kind, else, "
                  "but for a training, of the same step of the other models, else 0; an evaluation per question "
                  "scored, times its domain's questions; "
                  f"{len(copies)} test run(s) that copy their selected tuning run, 0); "
                  "they hold for the machine kind that recorded them.", highlight=False)
    return wall


def available_memory_mb() -> float:
    """The memory available to new work (``MemAvailable`` of /proc/meminfo), in MiB; infinite
    where there is no /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


MEMORY_RESERVE = 0.08  # of physical memory: below it available, execute stops the step started last


def execute(steps: list[Step], console, log_dir: Path, jobs: int = 1, on_step_end=None,
            memory_mb: dict[str, float] | None = None, available_mb=available_memory_mb) -> list[dict]:
    """Run the steps, skipping those already done and those whose needs failed.

    With ``jobs`` = 1 the steps run one after the other in order, their output on the console.
    With more, up to ``jobs`` steps run at once (each started in order as soon as
    :func:`startable` allows; :func:`longest_first` gives a good order), each with ``OMP_NUM_THREADS`` = CPU
    cores // jobs and its output in ``log_dir/logs/<step>.log``.

    ``memory_mb``: each step's expected peak resident memory (:func:`expected`); with it, a step
    does not start beside running ones while their expected peaks together would pass 90% of
    the machine's memory (the next step that fits starts instead; a step alone always starts).

    A step killed by SIGKILL (on Linux, most often the out-of-memory killer, which may pick it
    for memory that other processes hold) runs once more, alone, once the running steps have
    ended, instead of failing what needs it. Before that happens: while several steps run and
    ``available_mb()`` (MiB) falls below :data:`MEMORY_RESERVE` of the machine's memory (peaks
    differ between domains: a text-length-bound training may need more than its kind did
    elsewhere), the step started last is stopped, recorded as interrupted, and queued to run
    again alone. A step queued to run alone takes the next slots: once its needs are met,
    nothing else starts until the running steps have ended and it has started.

    ``on_step_end()`` is called after each step that ran. Each step that ran appends
    ``{"step", "returncode", "seconds", "max_rss_mb"}`` (wall time; the peak resident memory of
    its largest process) to ``log_dir/bench-steps.jsonl``, the source of the report's time
    breakdown.

    SIGTERM, like SIGINT, interrupts the bench: the running steps get SIGTERM (SIGKILL after
    30 s), each is recorded with ``"interrupted": true`` and its exit code, and
    KeyboardInterrupt propagates. A step killed mid-way reruns next time; training resumes from
    its last finished iteration.

    Returns:
        The failures: ``{"step", "returncode"}``, or ``{"step", "blocked_by"}`` for a step skipped
        because a step it needs failed.

    Raises:
        KeyboardInterrupt: on SIGINT or SIGTERM, once the running steps have stopped.
    """
    import os
    import re
    import signal
    import threading

    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        (log_dir / "logs").mkdir(parents=True, exist_ok=True)
    failed: set[str] = set()
    succeeded: set[str] = set()
    failures: list[dict] = []
    pending = list(enumerate(steps, 1))
    number = {step.label: i for i, step in pending}
    running: dict[str, tuple] = {}
    alone: set[str] = set()  # steps killed once (SIGKILL), to run again with nothing beside them
    start = time.time()

    def reap(proc, block: bool) -> tuple[int, float] | None:
        """(exit code, peak RSS in MiB) of an ended step; None while it runs."""
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, usage.ru_maxrss / 1024  # Linux: KiB

    def finish(step: Step, rc: int, rss_mb: float, seconds: float, copied: bool = False,
               interrupted: bool = False) -> None:
        with open(log_dir / "bench-steps.jsonl", "a") as f:
            f.write(json.dumps({"step": step.label, "returncode": rc, "seconds": round(seconds, 1),
                                "max_rss_mb": round(rss_mb), **({"copied": True} if copied else {}),
                                **({"interrupted": True} if interrupted else {})}) + "\n")
        if interrupted:
            return
        if on_step_end is not None:
            on_step_end()
        if rc == 0:
            succeeded.add(step.label)
            return
        if rc == -signal.SIGKILL and step.label not in alone:
            alone.add(step.label)
            pending.insert(0, (number[step.label], step))
            console.print(f"[yellow]killed[/] {step.label} (SIGKILL: out of memory?); it runs again alone")
            return
        failed.add(step.label)
        failures.append({"step": step.label, "returncode": rc})
        console.print(f"[red]failed[/] {step.label} (exit {rc}); going on with the rest")

    def stop(label: str) -> int:
        """SIGTERM to a running step (SIGKILL after 30 s), recorded as interrupted with its peak
        so far; returns its exit code."""
        proc, step, log, began, copied = running.pop(label)
        os.kill(proc.pid, signal.SIGTERM)  # not Popen.terminate: its poll() would reap the step, and its peak with it
        deadline = time.time() + 30
        while (result := reap(proc, block=False)) is None and time.time() < deadline:
            time.sleep(0.1)
        if result is None:
            os.kill(proc.pid, signal.SIGKILL)
            result = reap(proc, block=True)
        if log is not None:
            log.close()
        finish(step, *result, seconds=time.time() - began, copied=copied, interrupted=True)
        return result[0]

    def stop_running() -> None:
        for proc, *_ in running.values():
            os.kill(proc.pid, signal.SIGTERM)  # all at once; stop() waits for each
        for label in list(running):
            rc = stop(label)
            console.print(f"[yellow]stopped[/] {label} (exit {rc}); it runs again next time", highlight=False)

    def preempt_if_memory_short() -> None:
        """With several steps running and less than :data:`MEMORY_RESERVE` of the machine's
        memory available, stop the step started last (SIGTERM: a training resumes from its last
        checkpoint) and queue it to run again alone, before the out-of-memory killer picks
        one."""
        if len(running) < 2 or available_mb() >= MEMORY_RESERVE * physical_memory_mb():
            return
        label = max(running, key=lambda x: running[x][3])
        step = running[label][1]
        stop(label)
        alone.add(label)
        pending.insert(0, (number[label], step))
        console.print(f"[yellow]stopped[/] {label}: memory short ({available_mb():.0f} MiB available); "
                      "it runs again alone", highlight=False)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        while pending or running:
            before = len(pending)
            # a step to run alone whose needs are met waits for the running steps to end, and
            # nothing else starts meanwhile: with a free slot filled again and again it would never run
            draining = any(s.label in alone and all(n in succeeded for n in s.needs) for _, s in pending)
            for item in list(pending):
                i, step = item
                if draining and step.label not in alone:
                    continue
                head = f"[bold]bench {i}/{len(steps)}[/] {step.label}"
                blocked = [n for n in step.needs if n in failed]
                if blocked:
                    pending.remove(item)
                    failed.add(step.label)
                    failures.append({"step": step.label, "blocked_by": blocked[0]})
                    console.print(f"{head}: [yellow]skipped[/] ({blocked[0]} failed)")
                elif startable(step, list(running), succeeded, jobs, memory_mb, alone):
                    pending.remove(item)
                    if step.done():
                        succeeded.add(step.label)
                        console.print(f"{head}: done before", highlight=False)
                        continue
                    console.print(f"{head} ({time.time() - start:.0f}s elapsed)", highlight=False)
                    began = time.time()
                    argv = step.argv()
                    copied = REUSE_CALL in " ".join(argv)
                    if jobs == 1:  # its output on the console
                        running[step.label] = (proc := subprocess.Popen(argv), step, None, began, copied)
                        result = reap(proc, block=True)
                        del running[step.label]
                        finish(step, *result, seconds=time.time() - began, copied=copied)
                        break  # in order: look at the next step only now
                    log = open(log_dir / "logs" / (re.sub(r"[^A-Za-z0-9._-]+", "-", step.label).strip("-") + ".log"), "a")
                    running[step.label] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env),
                                           step, log, began, copied)
                elif jobs == 1:
                    break
            ended = False
            for label, (proc, step, log, began, copied) in list(running.items()):
                result = reap(proc, block=False)
                if result is not None:
                    ended = True
                    log.close()
                    del running[label]
                    console.print(f"finished {label} (exit {result[0]}, {time.time() - start:.0f}s elapsed)",
                                  highlight=False)
                    finish(step, *result, seconds=time.time() - began, copied=copied)
            if running:
                preempt_if_memory_short()
                time.sleep(1)
            elif pending and len(pending) == before and not ended:  # needs no step provides: those never start
                stuck = [item for item in pending if any(n not in succeeded for n in item[1].needs)]
                for item in stuck:
                    pending.remove(item)
                    failed.add(item[1].label)
                    failures.append({"step": item[1].label, "blocked_by": next(n for n in item[1].needs if n not in succeeded)})
                if not stuck:
                    break
    except KeyboardInterrupt:
        stop_running()
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return failures

