"""The stepper threads: a team of their own for the optimizer step, one thread for everything else."""

from __future__ import annotations

import threading

import pytest
import torch

from service.stepper import Stepper, available_cores


def _in_a_new_thread() -> int:
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_steppers_have_their_team_and_other_threads_keep_the_default() -> None:
    before, fresh = torch.get_num_threads(), _in_a_new_thread()
    wanted = fresh + 2  # a size no other thread has
    stepper = Stepper(steppers=2, threads=wanted)
    try:
        names = set()
        for _ in range(8):
            assert stepper.run(torch.get_num_threads) == wanted
            names.add(stepper.run(lambda: threading.current_thread().name))
        assert len(names) <= 2 and all(n.startswith("step") for n in names)
        assert torch.get_num_threads() == before  # the thread that made the stepper
        assert _in_a_new_thread() == fresh  # threads started later get the global default, not the steppers'
    finally:
        stepper.close()


def test_the_default_team_is_every_available_core_and_errors_come_back() -> None:
    stepper = Stepper()
    try:
        assert stepper.threads == available_cores() and stepper.run(torch.get_num_threads) == available_cores()

        def fails() -> None:
            raise ValueError("from the stepper")

        with pytest.raises(ValueError, match="from the stepper"):
            stepper.run(fails)
    finally:
        stepper.close()
