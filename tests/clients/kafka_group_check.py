#!/usr/bin/env python3
"""A group of librdkafka consumers (confluent-kafka) against a Tributary node:
members join, one leaves, one is killed with SIGKILL, one joins late; every
record produced must be consumed by the group, the committed offsets must end
at the partitions' ends, and every rebalance must complete.

usage: kafka_group_check.py BOOTSTRAP TOPIC GROUP ASSIGNOR
  ASSIGNOR: range, roundrobin or cooperative-sticky
The topic exists with several partitions. Prints one JSON line:
{"produced": N, "consumed_distinct": N, "committed": N, "members_final": N, ...};
exits 1 with {"errors": [...]} on any failure.

Consumer mode (run by this script in child processes):
kafka_group_check.py consume BOOTSTRAP TOPIC GROUP ASSIGNOR NAME
prints a JSON line per record consumed and per assignment change.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition


def consume(bootstrap, topic, group, assignor, name):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def out(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def assigned(consumer, parts):
        out({"event": "assigned", "name": name, "partitions": [p.partition for p in parts]})

    def revoked(consumer, parts):
        out({"event": "revoked", "name": name, "partitions": [p.partition for p in parts]})

    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "client.id": name,
        "partition.assignment.strategy": assignor,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "topic.metadata.refresh.interval.ms": 2000,
    })
    c.subscribe([topic], on_assign=assigned, on_revoke=revoked)
    unsaved = False
    while not stop.is_set():
        msgs = c.consume(num_messages=100, timeout=0.2)
        if unsaved and not msgs:
            # A commit refused during a rebalance is made again once it is over.
            try:
                c.commit(asynchronous=False)
                unsaved = False
            except Exception:
                pass
        good = [m for m in msgs if m.error() is None]
        for m in msgs:
            if m.error() is not None:
                out({"event": "error", "name": name, "error": str(m.error())})
        if good:
            for m in good:
                out({"event": "record", "name": name, "p": m.partition(), "o": m.offset(),
                     "k": m.key().decode()})
            try:
                c.commit(asynchronous=False)
            except Exception as e:  # a commit refused during a rebalance is retried later
                unsaved = True
                out({"event": "commit_failed", "name": name, "error": str(e)})
    c.close()  # leaves the group (LeaveGroup)
    out({"event": "closed", "name": name})


class Member:
    def __init__(self, args, name, log):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "consume", *args, name],
            stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self.read, args=(log,), daemon=True)
        self.thread.start()

    def read(self, log):
        for line in self.proc.stdout:
            try:
                log.append(json.loads(line))
            except ValueError:
                log.append({"event": "garbage", "name": self.name, "line": line})


def main():
    bootstrap, topic, group, assignor = sys.argv[1:5]
    log = []
    errors = []

    def wait_for(cond, what, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return True
            time.sleep(0.2)
        errors.append(f"timed out waiting for {what}")
        return False

    # Idempotent: a batch sent again after its broker died (the answer lost,
    # the records stored) is stored once, so the log holds each record once.
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                  "enable.idempotence": True})
    produced = set()

    def produce(n, start):
        def delivered(err, msg):
            if err is not None:
                errors.append(str(err))
            else:
                produced.add((msg.partition(), msg.offset()))
        for i in range(start, start + n):
            p.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), on_delivery=delivered)
        if p.flush(30):
            errors.append("records not delivered")

    meta = p.list_topics(topic, timeout=10)
    partitions = sorted(meta.topics[topic].partitions)

    def consumed():
        return {(e["p"], e["o"]) for e in log if e["event"] == "record"}

    def consumed_keys():
        return {e["k"] for e in log if e["event"] == "record"}

    def current_assignment():
        # The latest assigned/revoked per live member, folded.
        owned = {}
        for e in list(log):
            if e["event"] == "assigned":
                owned.setdefault(e["name"], set()).update(e["partitions"])
                if assignor != "cooperative-sticky":
                    owned[e["name"]] = set(e["partitions"])
            elif e["event"] == "revoked":
                owned.setdefault(e["name"], set()).difference_update(e["partitions"])
            elif e["event"] == "closed":
                owned.pop(e["name"], None)
        return owned

    def covers(names):
        def check():
            owned = current_assignment()
            got = sorted(p for n in names for p in owned.get(n, set()))
            return got == partitions and all(owned.get(n) for n in names[:len(partitions)])
        return check

    args = [bootstrap, topic, group, assignor]
    a, b, c = (Member(args, n, log) for n in ("a", "b", "c"))
    wait_for(covers(["a", "b", "c"]), "a, b and c to share the partitions")
    produce(600, 0)
    wait_for(lambda: produced <= consumed(), "the first records to be consumed")

    # c dies without leaving: its session ends and a and b take over.
    c.proc.send_signal(signal.SIGKILL)
    c.proc.wait()
    produce(600, 600)
    wait_for(covers(["a", "b"]), "a and b to take over c's partitions after its session ended")
    wait_for(lambda: produced <= consumed(), "records after the kill to be consumed")

    # b leaves cleanly; d joins late.
    b.proc.send_signal(signal.SIGTERM)
    b.proc.wait(timeout=30)
    d = Member(args, "d", log)
    produce(600, 1200)
    wait_for(covers(["a", "d"]), "a and d to share the partitions")
    wait_for(lambda: produced <= consumed(), "records after the late join to be consumed")

    # Committed offsets of the group reach every partition's end.
    check = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    ends = {}
    for part in partitions:
        _, high = check.get_watermark_offsets(TopicPartition(topic, part), timeout=10)
        ends[part] = high
    committed = {}

    def all_committed():
        for tp in check.committed([TopicPartition(topic, x) for x in partitions], timeout=10):
            committed[tp.partition] = tp.offset
        return committed == ends
    wait_for(all_committed, "committed offsets to reach the ends", timeout=30)
    check.close()

    for m in (a, d):
        m.proc.send_signal(signal.SIGTERM)
    for m in (a, d):
        m.proc.wait(timeout=30)
        m.thread.join(timeout=10)
    b.thread.join(timeout=10)

    missing = produced - consumed()
    if missing:
        errors.append(f"{len(missing)} records never consumed, e.g. {sorted(missing)[:5]}")
    failures = [e for e in log if e["event"] in ("error", "garbage")]
    if failures:
        errors.append(f"consumer errors: {failures[:3]}")
    closed = sorted(e["name"] for e in log if e["event"] == "closed")
    if closed != ["a", "b", "d"]:
        errors.append(f"members that closed cleanly: {closed}")
    summary = {
        "produced": len(produced),
        "consumed_distinct": len(consumed()),
        "consumed_keys": len(consumed_keys()),
        "consumed_total": sum(1 for e in log if e["event"] == "record"),
        "committed": sum(committed.values()),
        "ends": sum(ends.values()),
        "assignments": sum(1 for e in log if e["event"] == "assigned"),
        "commit_retries": sum(1 for e in log if e["event"] == "commit_failed"),
    }
    if errors:
        summary["errors"] = errors
        print(json.dumps(summary))
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "consume":
        consume(*sys.argv[2:7])
    else:
        main()
