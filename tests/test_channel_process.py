"""Channels between real processes: a producer and a consumer, a kill -9 storm on several of each,
and channels that outlive a primary's kill -9 with their contents."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap

import pytest
from conftest import PYTHON, kill_session, needs_hugepages, run_python, spawn_worker, start_storm, storm_result
from test_heap_process import settled

pytestmark = [needs_hugepages, pytest.mark.process]

HUGE = ("--memory", "64M", "--huge-pages", "on")


REAP = textwrap.dedent("""
    import os, time


    def reap(pid, bound=20):
        \"\"\"The exit code of child ``pid``; killed (-9) if it still runs after ``bound`` seconds, so
        that a child stuck for good says so by its status.\"\"\"
        deadline = time.monotonic() + bound
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(pid, 9)
            time.sleep(0.01)
""")  # prepended to worker scripts that fork


def drain(prefix: str, root: str, *names: str) -> int:
    """Receive and free every message left in the channels ``names``; how many."""
    code = f"""
        import hugeshmd
        n = 0
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            for name in {list(names)!r}:
                ch = shm.channel(name)
                while True:
                    try:
                        got = ch.recv_many(256, timeout=0)
                    except hugeshmd.ChannelTimeout:
                        break
                    for buf in got:
                        buf.free()
                    n += len(got)
        print(n)
    """
    return int(run_python(textwrap.dedent(code), root).stdout.strip().splitlines()[-1])


def test_a_producer_hands_buffers_to_a_consumer_in_order(start_primary, prefix, root):
    start_primary(*HUGE)
    consumer = spawn_worker(["-c", textwrap.dedent(f"""
        import struct, sys, hugeshmd
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            ch = shm.channel("jobs", 16)
            print("ready", flush=True)
            seen = []
            while len(seen) < 2000:
                for buf in ch.recv_many(64, timeout=20):
                    seen.append(struct.unpack_from("<Q", buf.view())[0])
                    buf.free()
            print(seen == list(range(2000)), flush=True)
    """)], root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert consumer.stdout is not None
    assert consumer.stdout.readline().strip() == "ready"
    run_python(textwrap.dedent(f"""
        import struct, hugeshmd
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            ch = shm.channel("jobs", 16)
            for n in range(2000):
                buf = shm.alloc(64 if n % 10 else 100_000)
                struct.pack_into("<Q", buf.view(), 0, n)
                ch.send(buf, timeout=20)
    """), root)
    out, err = consumer.communicate(timeout=60)
    assert out.strip() == "True", err
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    assert report["figures"]["allocations"] == 0, report["figures"]


def test_a_storm_of_kill_9_on_producers_and_consumers_loses_and_doubles_nothing(start_primary, prefix, root):
    start_primary("--memory", "128M", "--huge-pages", "on")
    kills = os.environ.get("STORM_KILLS", "400")
    result = storm_result(start_storm("channel_storm.py", prefix, root, "2", "2", kills, "60"))
    assert result["kills"] >= 100, result
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    left = drain(prefix, root, "work", "back")  # every queued message can be received
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    figures = report["figures"]
    # Nothing is lost for good: with every worker dead and the channels drained, no allocation
    # is left (what dead producers made and dead consumers held was freed by the primary).
    assert (figures["allocations"], figures["handed"], figures["queued"]) == (0, 0, 0), (figures, left)


def test_channels_and_their_contents_survive_a_primary_kill_9(start_primary, prefix, root):
    first = start_primary(*HUGE)
    run_python(textwrap.dedent(f"""
        import hugeshmd
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            ch = shm.channel("kept", 8)
            for n, size in enumerate((64, 5000, 200_000)):
                buf = shm.alloc(size)
                buf.view()[:4] = bytes([n]) * 4
                ch.send(buf)
    """), root)  # the sender exits: the channel holds what it sent
    first.stop(signal.SIGKILL)
    second = start_primary(*HUGE)
    assert "adopted prefix" in second.text, second.text
    report = settled(prefix, root)
    assert report["violations"] == [] and report["figures"]["queued"] == 3, report
    status = subprocess.run([PYTHON, "-m", "hugeshmd", "status", "--prefix", prefix, "--runtime-root", root],
                            capture_output=True, text=True, timeout=60).stdout
    assert "channels   1 (3 messages queued), 3 allocations handed on" in status, status
    got = run_python(textwrap.dedent(f"""
        import hugeshmd
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            ch = shm.channel("kept")
            got = ch.recv_many(8, timeout=5)
            print([(b.size, bytes(b.view()[:4]).hex()) for b in got])
            for b in got:
                b.free()
    """), root).stdout.strip().splitlines()[-1]
    assert got == "[(64, '00000000'), (5000, '01010101'), (200000, '02020202')]"
    assert settled(prefix, root)["figures"]["allocations"] == 0


def test_a_storm_goes_through_a_primary_kill_9_and_its_adoption(start_primary, prefix, root):
    first = start_primary("--memory", "128M", "--huge-pages", "on")
    storm = start_storm("channel_storm.py", prefix, root, "2", "2", "1000", "8")
    try:
        storm.wait(2.0)  # let it run: the storm goes on for 8 s
    except subprocess.TimeoutExpired:
        pass
    first.stop(signal.SIGKILL)  # while workers die and hand buffers around, no primary reclaims
    second = start_primary("--memory", "128M", "--huge-pages", "on")
    assert "adopted prefix" in second.text, second.text
    storm_result(storm)
    drain(prefix, root, "work", "back")
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    figures = report["figures"]
    assert (figures["allocations"], figures["handed"], figures["queued"]) == (0, 0, 0), figures


def test_arecv_works_in_a_forked_child_of_a_process_whose_waker_runs(start_primary, prefix, root):
    start_primary(*HUGE)
    out = run_python(REAP + textwrap.dedent(f"""
        import asyncio, os, threading, time, hugeshmd
        from hugeshmd.shm._waker import waker_for
        shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
        ch = shm.channel("forked", 8)

        async def wait_one(delay, timeout):
            if delay is not None:  # two: the parent's waiter may take one
                threading.Timer(delay, lambda: ch.send_many([shm.alloc(64), shm.alloc(64)])).start()
            got = await ch.arecv(timeout=timeout)
            got.free()
            return got.size

        waiting = threading.Thread(target=lambda: print("parent", asyncio.run(wait_one(None, 30)), flush=True))
        waiting.start()  # the parent's waker thread runs while the fork happens
        while waker_for(ch)._thread is None:
            time.sleep(0.001)
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if asyncio.run(wait_one(0.2, 3)) == 64 else 3)
            except BaseException:
                os._exit(4)
        code = reap(pid)
        ch.send(shm.alloc(64))  # the parent's own waiter
        waiting.join(30)
        print("child", code, flush=True)
    """), root).stdout.split()
    assert out == ["parent", "64", "child", "0"], out


def test_arecv_in_a_child_forked_while_another_thread_held_the_wakers_guard(start_primary, prefix, root):
    """A lock another thread held at the fork stays held in the child for good: the wakers' guard
    is made anew there, so the child's arecv still gives up at its timeout (it hung for good)."""
    start_primary(*HUGE)
    out = run_python(REAP + textwrap.dedent(f"""
        import asyncio, os, time, hugeshmd
        from hugeshmd.shm import _waker
        shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
        ch = shm.channel("guarded", 8)
        with _waker._guard:  # as a waker thread stopping, or another thread's arecv, at the fork
            pid = os.fork()
            if pid == 0:
                try:
                    asyncio.run(ch.arecv(timeout=0.2))
                    os._exit(3)
                except hugeshmd.ChannelTimeout:
                    os._exit(0)
                except BaseException:
                    os._exit(4)
        print("child", reap(pid), flush=True)
    """), root).stdout.split()
    assert out == ["child", "0"], out


def test_a_channel_open_in_another_live_worker_is_not_removed(start_primary, prefix, root):
    start_primary(*HUGE)
    holder = spawn_worker(["-c", textwrap.dedent(f"""
        import sys, hugeshmd
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            ch = shm.channel("held", 8)
            ch.send(shm.alloc(64))
            print("ready", flush=True)
            sys.stdin.readline()
    """)], root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "ready"
        os.kill(holder.pid, signal.SIGSTOP)  # frozen, it still holds the channel open
        refused = run_python(textwrap.dedent(f"""
            import hugeshmd
            with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
                try:
                    shm.remove_channel("held")
                except hugeshmd.ChannelBusy as err:
                    print(err.pid, err.stopped, err.message)
        """), root).stdout
        assert refused.startswith(f"{holder.pid} True channel 'held' is open in 1 live worker(s): pid {holder.pid}")
        os.kill(holder.pid, signal.SIGCONT)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0  # it detached: its handle is closed
    finally:
        kill_session(holder)
    dropped = run_python(textwrap.dedent(f"""
        import hugeshmd
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            print(shm.remove_channel("held"))
    """), root).stdout.strip()
    assert dropped == "1"
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    assert (report["figures"]["channels"], report["figures"]["allocations"]) == (0, 0), report["figures"]


def test_a_remover_killed_at_random_points_loses_nothing_and_the_next_one_finishes(start_primary, prefix, root):
    """kill -9 of a worker removing a channel of small and large buffers, at a random moment of
    its removal; the next remove_channel finishes it (or finds it gone), and nothing is lost."""
    import random
    import time

    start_primary(*HUGE)
    rng = random.Random(11)
    fill = """
        ch = shm.channel(NAME, 64)
        for n in range(30):
            ch.send(shm.alloc(100_000 if n % 7 == 0 else 64 + n))
        ch.close()
    """
    finish = """
        try:
            shm.remove_channel(NAME)
        except hugeshmd.NotFound:
            pass
    """

    def step(finishing: str | None, filling: str | None) -> None:
        code = f"import hugeshmd\nwith hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:\n"
        for part, name in ((finish, finishing), (fill, filling)):
            if name is not None:
                code += textwrap.indent(textwrap.dedent(part).replace("NAME", repr(name)), "    ")
        run_python(code, root)

    step(None, "c0")
    rounds = 16
    for i in range(rounds):
        remover = spawn_worker(["-c", textwrap.dedent(f"""
            import sys, hugeshmd
            with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
                shm.alloc(64).free()  # its arena claimed before the race
                print("ready", flush=True)
                sys.stdin.readline()
                shm.remove_channel("c{i}")
                print("removed", flush=True)
        """)], root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert remover.stdout is not None and remover.stdin is not None
            assert remover.stdout.readline().strip() == "ready"
            remover.stdin.write("\n")
            remover.stdin.flush()
            time.sleep(rng.uniform(0.002, 0.02))  # its removal takes about 5-15 ms from here
        finally:
            kill_session(remover)
        step(f"c{i}", f"c{i + 1}" if i + 1 < rounds else None)
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    assert (report["figures"]["channels"], report["figures"]["allocations"]) == (0, 0), report["figures"]


def test_the_primary_finishes_a_removal_whose_remover_was_killed_with_no_one_coming_after(start_primary, prefix,
                                                                                           root):
    """A remover killed with -9 after marking the channel and taking its consumer lock: no worker
    touches the channel again, and the primary frees what it held at its next heartbeat."""
    start_primary(*HUGE)
    remover = spawn_worker(["-c", textwrap.dedent(f"""
        import os, hugeshmd
        from hugeshmd import _sys
        from hugeshmd.shm.channel import CLOCK_AT, REMOVER_AT, _remover_word
        shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
        ch = shm.channel("orphaned", 64)
        for n in range(30):
            ch.send(shm.alloc(100_000 if n % 7 == 0 else 64 + n))
        heap = shm._heap
        ch.close()
        words = ch._words
        words[REMOVER_AT // 8] = _remover_word(heap.openings.owner(heap))  # remove_channel's mark
        assert _sys.mutex_lock(ch._address + CLOCK_AT, 1) == 0
        words[{256 // 8}] += 1  # one message taken, then killed
        os.kill(os.getpid(), 9)
    """)], root)
    assert remover.wait(60) == -9
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    assert (report["figures"]["channels"], report["figures"]["allocations"]) == (0, 0), report["figures"]


def test_a_forked_child_uses_its_inherited_handle_under_its_own_registration(start_primary, prefix, root):
    """A child forked with an open handle uses it, recorded under a registration of its own at
    its first call: what the child opens and lets go of never lets go of the parent's."""
    start_primary(*HUGE)
    parent = spawn_worker(["-c", textwrap.dedent(f"""
        import os, sys, hugeshmd
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            ch = shm.channel("f", 8)
            pid = os.fork()
            if pid == 0:
                ch.send(shm.alloc(64))  # the inherited handle, now recorded under the child's registration
                with shm.channel("f") as own:
                    own.send(shm.alloc(64))
                ch.close()
                shm.close()
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            print("child", os.waitstatus_to_exitcode(status), flush=True)
            sys.stdin.readline()
            ch.send(shm.alloc(64))  # still the parent's to use
    """)], root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert parent.stdout is not None and parent.stdin is not None

    def remove() -> str:
        return run_python(textwrap.dedent(f"""
            import hugeshmd
            with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
                try:
                    print(shm.remove_channel("f"))
                except hugeshmd.ChannelBusy as err:
                    print("busy", err.pid)
        """), root).stdout.strip()

    try:
        assert parent.stdout.readline().strip() == "child 0"
        assert remove() == f"busy {parent.pid}"
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.wait(30) == 0
    finally:
        kill_session(parent)
    assert remove() == "3"  # the child's two messages and the parent's last
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    assert report["figures"]["allocations"] == 0, report["figures"]


def test_detaching_lets_go_of_channels_before_the_registration(start_primary, prefix, root):
    """A removal must not pass between the two: the words are cleared while the registration still
    stands, so no removal happens while this process could still write one."""
    start_primary(*HUGE)
    out = run_python(textwrap.dedent(f"""
        import hugeshmd
        from hugeshmd.shm.registry import Registry
        seen = []
        real = Registry.unregister
        def unregister(self, owner):
            seen.append(list(words))
            real(self, owner)
        Registry.unregister = unregister
        shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
        ch = shm.channel("d", 8)
        words = ch._openers
        assert words[shm.owner.slot] != 0
        shm.close()
        print(seen[0][shm.owner.slot] if seen else "never")
    """), root).stdout.strip()
    assert out == "0"


def test_a_receiver_killed_asleep_stops_costing_senders_a_wake(start_primary, prefix, root):
    """A receiver killed in its futex wait leaves itself counted asleep: senders wake it (a system
    call each) until two periods later, when its count is known dead; a live receiver that sleeps
    after that is counted and woken as before."""
    start_primary(*HUGE)
    sleeper = spawn_worker(["-c", textwrap.dedent(f"""
        import hugeshmd
        with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
            ch = shm.channel("nap", 8)
            print("ready", flush=True)
            ch.recv(timeout=60)
    """)], root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert sleeper.stdout is not None and sleeper.stdout.readline().strip() == "ready"
        out = run_python(textwrap.dedent(f"""
            import json, os, signal, threading, time, hugeshmd
            from hugeshmd import _sys
            from hugeshmd.shm import channel
            wakes = []
            real_wake = _sys.futex_wake
            _sys.futex_wake = lambda *a: (wakes.append(a), real_wake(*a))
            with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
                ch = shm.channel("nap", 8)
                deadline = time.monotonic() + 10
                while not ch._words[channel.RWAIT_AT // 8] and time.monotonic() < deadline:
                    time.sleep(0.01)  # the receiver counted itself asleep
                os.kill({sleeper.pid}, signal.SIGKILL)
                while True:  # gone from the futex's queue once it is a zombie
                    try:
                        with open("/proc/{sleeper.pid}/stat") as f:
                            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                                break
                    except FileNotFoundError:
                        break
                    time.sleep(0.01)
                result = {{}}
                ch.send(shm.alloc(64))
                result["wakes now"] = len(wakes)
                now = channel._period()
                channel._period = lambda: now + 2  # two periods later: what a dead receiver left
                del wakes[:]
                for _ in range(5):  # the first message is still there: room for 7
                    ch.send(shm.alloc(64))
                result["wakes later"] = len(wakes)
                for buf in ch.recv_many(64, timeout=0):
                    buf.free()
                got = []
                t = threading.Thread(target=lambda: got.append(ch.recv(timeout=10)))
                t.start()
                i = channel.RWAIT_AT // 4
                while ch._u32[i + 2] != now + 2:  # the new receiver counted itself, clearing the dead one
                    time.sleep(0.01)
                result["count"] = ch._u32[i] + ch._u32[i + 1]
                del wakes[:]
                ch.send(shm.alloc(64))
                t.join(10)
                result["woken"] = len(got) == 1 and len(wakes) == 1
                got[0].free()
            print(json.dumps(result))
        """), root).stdout.strip().splitlines()[-1]
    finally:
        kill_session(sleeper)
    import json

    result = json.loads(out)
    assert result["wakes now"] == 1, result  # within the period, a dead sleeper cannot be told apart
    assert result["wakes later"] == 0, result
    assert result["woken"] and result["count"] == 1, result
