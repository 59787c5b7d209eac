"""thread_events.Events against the lost-event race of defaultdict(threading.Event)."""
import sys
import threading
from collections import defaultdict

from thread_events import Events


def lost_events(make, trials=300, keys=32):
    """One thread sets every key's event while another takes them, both creating on first use;
    returns how many events the taker got that nobody set."""
    lost = 0
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows at once
    try:
        for _ in range(trials):
            events, taken = make(), {}
            names = [str(i) for i in range(keys)]

            def set_all(events=events, names=names):
                for name in names:
                    events[name].set()

            def take_all(events=events, names=names, taken=taken):
                for name in names:
                    taken[name] = events[name]

            threads = [threading.Thread(target=set_all), threading.Thread(target=take_all)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            lost += sum(not event.is_set() for event in taken.values())
    finally:
        sys.setswitchinterval(before)
    return lost


def test_events_made_by_two_threads_at_once_are_one_event():
    assert lost_events(Events) == 0


def test_defaultdict_loses_events_under_the_same_race():
    """The reason for Events: if this ever stops failing, the race check above proves nothing."""
    assert lost_events(lambda: defaultdict(threading.Event)) > 0
