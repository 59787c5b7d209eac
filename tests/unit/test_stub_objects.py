"""trident.stub_objects: finished BLS iterators are let go late, on the retirement's own thread;
responses carry only the outputs a request asked for."""
import threading
import time
import weakref

from trident.stub_objects import Retirement, requested_only


class Tracked:
    """Records the thread that drops its last reference."""

    def __init__(self, log):
        self._log = log

    def __del__(self):
        self._log.append(threading.current_thread().name)


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_kept_objects_live_for_the_hold_then_die_on_the_retirement_thread():
    now = [100.0]
    retirement = Retirement(hold=5.0, clock=lambda: now[0], name="retire-test")
    try:
        dropped = []
        obj = Tracked(dropped)
        ref = weakref.ref(obj)
        retirement.keep(obj)
        del obj
        time.sleep(0.05)
        assert ref() is not None and dropped == []  # held: the hold has not passed
        now[0] += 4.9
        time.sleep(0.05)
        assert ref() is not None
        now[0] += 0.2
        wait_until(lambda: ref() is None)
        assert dropped == ["retire-test"]  # the last reference went on the retirement's thread
        assert retirement.released == 1 and len(retirement) == 0
    finally:
        retirement.stop()


def test_objects_are_released_in_order_of_their_hold():
    now = [0.0]
    retirement = Retirement(hold=1.0, clock=lambda: now[0])
    try:
        dropped = []
        refs = []
        for i in range(3):
            obj = Tracked(dropped)
            refs.append(weakref.ref(obj))
            retirement.keep(obj)
            del obj
            now[0] += 0.5
        # now 1.5: the first two are due (at 1.0 and 1.5), the third (at 2.0) is not
        wait_until(lambda: refs[0]() is None and refs[1]() is None)
        assert refs[2]() is not None
        now[0] += 1.0
        wait_until(lambda: refs[2]() is None)
        assert retirement.released == 3
    finally:
        retirement.stop()


def test_many_threads_keep_at_once():
    retirement = Retirement(hold=0.01)
    try:
        def keep_many():
            for _ in range(500):
                retirement.keep(object())

        threads = [threading.Thread(target=keep_many) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: retirement.released == 4000)
        assert len(retirement) == 0
    finally:
        retirement.stop()


def test_requested_only_keeps_what_the_request_named():
    arrays = {"text_output": 1, "server": 2, "finish_reason": 3}
    assert requested_only(arrays, frozenset({"text_output", "finish_reason"})) == {"text_output": 1, "finish_reason": 3}
    assert requested_only(arrays, frozenset()) == arrays  # Triton fills "none named" with every output
    assert requested_only(arrays, None) == arrays
