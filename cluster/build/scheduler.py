"""Run units of work over a pool of Ray actors: one unit per call, retried when a worker dies.

Actors are created with max_restarts, so Ray restarts an actor whose node went away (on
another node) and retries its in-flight call; a call that still fails is resubmitted here
up to `max_attempts` times. Results are handed to `on_result` on the driver (which records
them in the job manifest), with a progress bar of units done, items/s and ETA.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class UnitFailedError(RuntimeError):
    """A unit failed on every attempt; the message names it and the last error."""


def run_on_actors(
    actors: Sequence[Any],
    units: Sequence[str],
    submit: Callable[[Any, str], "ray.ObjectRef"],
    on_result: Callable[[str, dict], None],
    desc: str,
    timeout_s: float = 3600.0,
    max_attempts: int = 3,
    progress: bool = True,
) -> None:
    """Call `submit(actor, unit)` for every unit, at most one in flight per actor."""
    pending = deque(units)
    attempts = {u: 0 for u in units}
    in_flight: dict[Any, tuple[Any, str]] = {}
    idle = list(actors)
    rows, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(units), desc=desc, unit="shard", disable=not progress)
    try:
        while pending or in_flight:
            while idle and pending:
                actor, unit = idle.pop(), pending.popleft()
                attempts[unit] += 1
                in_flight[submit(actor, unit)] = (actor, unit)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout_s)
            if not ready:
                raise UnitFailedError(f"{desc}: no unit finished in {timeout_s:.0f} s "
                                      f"(in flight: {sorted(u for _, u in in_flight.values())[:5]})")
            for ref in ready:
                actor, unit = in_flight.pop(ref)
                idle.append(actor)
                try:
                    result = ray.get(ref, timeout=timeout_s)
                except (RayActorError, RayTaskError, GetTimeoutError) as err:
                    if attempts[unit] >= max_attempts:
                        raise UnitFailedError(f"{desc}: {unit} failed {attempts[unit]} times: {err}") from err
                    log.warning("%s: %s failed (attempt %d), retrying: %s", desc, unit, attempts[unit],
                                str(err).splitlines()[0])
                    pending.appendleft(unit)
                    continue
                on_result(unit, result)
                rows += int(result.get("rows", 0))
                bar.update(1)
                bar.set_postfix(items=rows, items_per_s=f"{rows / max(time.perf_counter() - t0, 1e-9):,.0f}")
    finally:
        bar.close()


def run_tasks(
    calls: Sequence[tuple[str, Callable[[], "ray.ObjectRef"]]],
    on_result: Callable[[str, Any], None],
    desc: str,
    timeout_s: float = 3600.0,
    max_attempts: int = 3,
    progress: bool = True,
) -> None:
    """Run Ray tasks (already remote functions with max_retries) and resubmit any that fail."""
    refs = {make(): (name, make) for name, make in calls}
    attempts = {name: 1 for name, _ in calls}
    bar = tqdm(total=len(calls), desc=desc, unit="task", disable=not progress)
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout_s)
            if not ready:
                raise UnitFailedError(f"{desc}: no task finished in {timeout_s:.0f} s")
            for ref in ready:
                name, make = refs.pop(ref)
                try:
                    result = ray.get(ref, timeout=timeout_s)
                except (RayActorError, RayTaskError, GetTimeoutError) as err:
                    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
                    if isinstance(cause, ValueError) or attempts[name] >= max_attempts:
                        raise cause if isinstance(cause, ValueError) else UnitFailedError(
                            f"{desc}: {name} failed {attempts[name]} times: {err}") from None
                    attempts[name] += 1
                    refs[make()] = (name, make)
                    continue
                on_result(name, result)
                bar.update(1)
    finally:
        bar.close()
