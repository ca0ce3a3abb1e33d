#!/usr/bin/env python3
"""Log compaction seen by clients we did not write: confluent-kafka
(librdkafka) creates a compacted topic, writes many updates over few keys
(some keys end in a tombstone), and then reads the topic back from the
earliest offset until it holds exactly the latest acknowledged write of
every live key, at the offset that write was acknowledged with, and nothing
of a deleted key. paho-mqtt reads the same through a persistent session.

usage: kafka_compaction_check.py BOOTSTRAP TOPIC MODE STATEFILE [options]

Modes (each prints one JSON summary line; exit 1 on a mismatch):
  create          create TOPIC over CreateTopics with the compaction configs
                  (unless it exists) and read them back with DescribeConfigs.
  produce         (creates TOPIC first if it does not exist) check that a
                  keyless record is refused, write --records updates over
                  --keys keys, then one filler record per partition, and
                  write the expected state to STATEFILE. With --round N > 0
                  the state of the earlier rounds is read from STATEFILE and
                  continued (other keys deleted, deleted ones written again).
  verify          read TOPIC from the earliest offset with a fresh consumer,
                  again and again until what is read equals STATEFILE or
                  --deadline-s has passed.
  mqtt-subscribe  open a persistent MQTT 3.1.1 session --client-id on --mqtt
                  HOST:PORT subscribed to TOPIC/# at QoS 1 and leave it (do
                  this after `create`, before `produce`: a new subscription
                  starts at the end).
  mqtt-verify     resume that session: what it receives must be STATEFILE as
                  MQTT messages (topic TOPIC/<key>, one per live key, its
                  latest value), received until --deadline-s.

STATEFILE: {"topic", "partitions", "produced" (records acknowledged, filler
included, over all rounds), "rounds", "keyless_error", "filler": [keys],
"keys": {key: {"partition", "offset", "value" (null: deleted)}}}.

Why filler records: the cleaner never touches the newest stored batch of a
partition (Kafka's active segment), so a key whose final write sits in that
batch may keep older duplicates until more arrives. After every update is
acknowledged, one record per partition is written alone (key
`filler-<partition>-r<round>`, with an explicit partition), in its own
produce: it is its own stored batch, the newest, and every other key's final
write lies below it. Each round's filler keys are new (as in Kafka, the
newest batch is not in the cleaner's map either, so a key written again only
there would keep its older record): an earlier round's filler is then an
ordinary live key with one record.
"""
import argparse
import functools
import json
import os
import random
import sys
import threading
import time
from collections import defaultdict

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

ap = argparse.ArgumentParser()
ap.add_argument("bootstrap")
ap.add_argument("topic")
ap.add_argument("mode", choices=["create", "produce", "verify", "mqtt-subscribe", "mqtt-verify"])
ap.add_argument("statefile")
ap.add_argument("--partitions", type=int, default=3)
ap.add_argument("--records", type=int, default=100_000)
ap.add_argument("--keys", type=int, default=1000)
ap.add_argument("--value-bytes", type=int, default=40)
ap.add_argument("--delete-retention-ms", type=int, default=3000)
ap.add_argument("--max-compaction-lag-ms", type=int, default=100)
ap.add_argument("--min-cleanable-dirty-ratio", default="0.01")
ap.add_argument("--round", type=int, default=0)
ap.add_argument("--deadline-s", type=float, default=60)
ap.add_argument("--mqtt", help="HOST:PORT of the node's MQTT listener")
ap.add_argument("--client-id", default="compaction-check")
a = ap.parse_args()
topic = a.topic


def topic_config():
    return {
        "cleanup.policy": "compact",
        "delete.retention.ms": str(a.delete_retention_ms),
        "min.compaction.lag.ms": "0",
        "max.compaction.lag.ms": str(a.max_compaction_lag_ms),
        "min.cleanable.dirty.ratio": a.min_cleanable_dirty_ratio,
    }


def finish(summary, ok, problems=()):
    """Prints the summary line (and problems on stderr); exits 0 or 1."""
    for p in list(problems)[:10]:
        print(p, file=sys.stderr)
    summary["ok"] = ok
    print(json.dumps(summary))
    sys.exit(0 if ok else 1)


def create():
    """Creates the topic unless it exists; returns its described configs."""
    admin = AdminClient({"bootstrap.servers": a.bootstrap})
    # Metadata for all topics: asking for this one would create it (an edge
    # creates topics on first use) with the default policy.
    if topic not in admin.list_topics(timeout=15).topics:
        for f in admin.create_topics([NewTopic(topic, a.partitions, 1, config=topic_config())]).values():
            f.result(timeout=30)
    r = ConfigResource("topic", topic)
    described = admin.describe_configs([r])[r].result(timeout=30)
    return {name: described[name].value for name in topic_config() if name in described}


def keyless_refused():
    """Produces one keyless record; returns the delivery report's error name
    (Kafka: INVALID_RECORD) or "delivered" if it was stored."""
    got = []
    # Not idempotent: a refused batch must not disturb a sequence.
    p = Producer({"bootstrap.servers": a.bootstrap, "acks": "all",
                  "message.timeout.ms": 20000, "enable.idempotence": False})
    p.produce(topic, value=b"a keyless record", partition=0,
              on_delivery=lambda err, msg: got.append(err))
    p.flush(30)
    if not got:
        return "no delivery report"
    return "delivered" if got[0] is None else got[0].name()


def value_of(key, rnd, n, i):
    pad = "x" * (a.value_bytes + (i * 7 + n) % 23)
    return f"{key} r{rnd} n{n} {pad}"


def produce():
    configs = create()
    if a.round > 0:
        with open(a.statefile, encoding="utf-8") as f:
            state = json.load(f)
    else:
        state = {"topic": topic, "partitions": a.partitions, "produced": 0, "rounds": 0,
                 "keys": {}, "filler": []}
    partitions = state["partitions"]
    # First: nothing of it may be stored, so it also comes before the filler.
    keyless = keyless_refused()
    state["keyless_error"] = keyless

    rnd = a.round
    rng = random.Random(1000 + rnd)
    names = [f"k{i:04d}" for i in range(a.keys)]
    order = [i % a.keys for i in range(a.records)]
    rng.shuffle(order)
    counts = [0] * a.keys
    for i in order:
        counts[i] += 1
    # 10% of the keys end in a tombstone, another 10% each round than the
    # last (so keys deleted before come back); 5% have one in the middle of
    # their writes (a later value must survive it).
    deleted = {i for i in range(a.keys) if i % 10 == (3 + rnd) % 10}
    middle = {i for i in range(a.keys) if i % 20 == 7}

    errors = []
    acked = {}  # key -> (partition, offset, value, n)
    last_sent = {}  # key -> n of its last produce call
    delivered_count = [0]

    def delivered(n, err, msg):
        if err is not None:
            errors.append(f"not delivered: {err}")
            return
        delivered_count[0] += 1
        k = msg.key().decode()
        v = msg.value()
        prev = acked.get(k)
        if prev is None or msg.offset() > prev[1]:
            acked[k] = (msg.partition(), msg.offset(), None if v is None else v.decode(), n)
        if prev is not None and prev[0] != msg.partition():
            errors.append(f"{k} in partitions {prev[0]} and {msg.partition()}")

    p = Producer({
        "bootstrap.servers": a.bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        # Compressed batches in one round, plain in the other: the cleaner
        # reads both.
        "compression.type": "lz4" if rnd % 2 == 0 else "none",
        "message.timeout.ms": 120000,
    })
    seq = [0] * a.keys
    for i in order:
        k, n = names[i], seq[i]
        seq[i] += 1
        last = n == counts[i] - 1
        tomb = (last and i in deleted) or (i in middle and counts[i] > 2 and n == counts[i] // 2)
        value = None if tomb else value_of(k, rnd, n, i).encode()
        last_sent[k] = n
        while True:
            try:
                p.produce(topic, key=k.encode(), value=value,
                          on_delivery=functools.partial(delivered, n))
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    left = p.flush(120)
    if left:
        errors.append(f"{left} records not delivered")

    # The filler: alone in a produce of its own, after every update is
    # acknowledged, so it is the newest stored batch of its partition.
    filler = [f"filler-{q}-r{rnd}" for q in range(partitions)]
    for q, k in enumerate(filler):
        last_sent[k] = 0
        p.produce(topic, key=k.encode(), value=f"{k} r{rnd}".encode(), partition=q,
                  on_delivery=functools.partial(delivered, 0))
    left = p.flush(60)
    if left:
        errors.append(f"{left} filler records not delivered")

    # The final write of a key is the one with the highest offset; with an
    # idempotent producer it is also the last one sent.
    order_ok = all(acked.get(k, (0, 0, None, -1))[3] == n for k, n in last_sent.items())
    for k, (part, off, v, _) in acked.items():
        state["keys"][k] = {"partition": part, "offset": off, "value": v}
    state["filler"] = filler
    state["produced"] += delivered_count[0]
    state["rounds"] = rnd + 1
    tmp = a.statefile + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, a.statefile)

    live = [k for k, e in state["keys"].items() if e["value"] is not None and k not in filler]
    summary = {
        "mode": "produce", "round": rnd, "produced": delivered_count[0],
        "produced_total": state["produced"], "keys": len(state["keys"]) - len(filler),
        "live_keys": len(live), "deleted_keys": len(state["keys"]) - len(filler) - len(live),
        "filler_keys": len(filler), "keyless_error": keyless, "order_ok": order_ok,
        "configs": configs, "errors": errors[:5],
    }
    finish(summary, not errors and order_ok and keyless == "INVALID_RECORD"
           and delivered_count[0] == a.records + partitions)


def read_once(partitions):
    """Every record of the topic from the earliest offset, with a fresh
    consumer (no group position), until each partition reports its end.
    Returns ([(key, partition, offset, value)], complete)."""
    c = Consumer({
        "bootstrap.servers": a.bootstrap,
        "group.id": f"compaction-check-{os.getpid()}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
    })
    c.assign([TopicPartition(topic, q, OFFSET_BEGINNING) for q in range(partitions)])
    records, ended, problems = [], set(), []
    progress = time.monotonic()
    # A reader stuck before a gap gets no record and no end: 15 s without
    # either ends the read incomplete.
    while len(ended) < partitions and time.monotonic() - progress < 15:
        for m in c.consume(1000, 0.5):
            progress = time.monotonic()
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    ended.add(m.partition())
                else:
                    problems.append(str(m.error()))
                continue
            records.append((m.key(), m.partition(), m.offset(), m.value()))
    c.close()
    return records, len(ended) == partitions and not problems, problems


def compare(state, records):
    """What was read against the state: counts and examples."""
    keys = state["keys"]
    seen = defaultdict(list)
    unexpected, examples = 0, []
    for key, part, off, value in records:
        k = None if key is None else key.decode(errors="replace")
        if k not in keys:
            unexpected += 1
            if len(examples) < 5:
                examples.append(f"unexpected record {k!r} at {part}/{off}")
            continue
        seen[k].append((part, off, None if value is None else value.decode(errors="replace")))
    missing = duplicates = stale = wrong_offset = deleted_seen = 0
    for k, e in keys.items():
        got = seen.get(k, [])
        want = (e["partition"], e["offset"], e["value"])
        if e["value"] is None:
            if got:
                deleted_seen += 1
                if len(examples) < 5:
                    examples.append(f"deleted {k}: still {got[-3:]}")
            continue
        if not got:
            missing += 1
        if len(got) > 1:
            duplicates += 1
        if any(v != e["value"] for _, _, v in got):
            stale += 1
        if any((q, o) != (e["partition"], e["offset"]) for q, o, _ in got):
            wrong_offset += 1
        if got != [want] and len(examples) < 5:
            examples.append(f"{k}: want {want}, read {got[-3:]} ({len(got)} records)")
    filler = set(state["filler"])
    live = [k for k, e in keys.items() if e["value"] is not None and k not in filler]
    return {
        "produced": state["produced"], "rounds": state["rounds"],
        "live_keys": len(live), "filler_keys": len(filler),
        "deleted_keys": len(keys) - len(filler) - len(live),
        "read": len(records),
        "latest_ok": missing == 0 and stale == 0,
        "offsets_ok": missing == 0 and wrong_offset == 0,
        "missing": missing, "duplicates": duplicates, "stale": stale,
        "wrong_offset": wrong_offset, "deleted_seen": deleted_seen,
        "tombstones_read": sum(1 for r in records if r[3] is None),
        "unexpected": unexpected, "keyless_error": state.get("keyless_error"),
    }, examples


def verify():
    with open(a.statefile, encoding="utf-8") as f:
        state = json.load(f)
    start = time.monotonic()
    passes = 0
    while True:
        passes += 1
        records, complete, problems = read_once(state["partitions"])
        s, examples = compare(state, records)
        s["complete"] = complete
        ok = (complete and s["latest_ok"] and s["offsets_ok"] and s["duplicates"] == 0
              and s["deleted_seen"] == 0 and s["unexpected"] == 0
              and s["read"] == s["live_keys"] + s["filler_keys"])
        # Polled until the cleaner is done or the deadline: the sleep only
        # paces the reads.
        if ok or time.monotonic() - start > a.deadline_s:
            break
        time.sleep(0.5)
    s.update({"mode": "verify", "reads": passes, "elapsed_s": round(time.monotonic() - start, 1)})
    finish(s, ok, problems + examples)


def mqtt_client(persistent_session):
    import paho.mqtt.client as mqtt
    host, port = a.mqtt.rsplit(":", 1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id,
                    protocol=mqtt.MQTTv311, clean_session=not persistent_session)
    return c, host, int(port)


def mqtt_subscribe():
    c, host, port = mqtt_client(True)
    granted, done = [], threading.Event()
    c.on_connect = lambda cl, u, flags, rc, props: cl.subscribe(f"{topic}/#", qos=1) if rc == 0 else done.set()
    c.on_subscribe = lambda cl, u, mid, rcs, props: (granted.extend(r.value for r in rcs), done.set())
    c.connect(host, port, keepalive=30)
    c.loop_start()
    done.wait(20)
    c.disconnect()
    c.loop_stop()
    finish({"mode": "mqtt-subscribe", "granted": granted}, granted == [1])


def mqtt_verify():
    with open(a.statefile, encoding="utf-8") as f:
        state = json.load(f)
    keys = state["keys"]
    want = {f"{topic}/{k}": e["value"] for k, e in keys.items() if e["value"] is not None}
    deleted = {f"{topic}/{k}" for k, e in keys.items() if e["value"] is None}
    got = defaultdict(list)
    lock = threading.Lock()
    present = []
    last = [time.monotonic()]

    def on_message(cl, u, msg):
        with lock:
            got[msg.topic].append(msg.payload.decode(errors="replace"))
            last[0] = time.monotonic()

    c, host, port = mqtt_client(True)
    # No SUBSCRIBE: the session kept its subscription and its position.
    c.on_connect = lambda cl, u, flags, rc, props: present.append(bool(flags.session_present))
    c.on_message = on_message
    c.connect(host, port, keepalive=30)
    c.loop_start()
    start = time.monotonic()
    while time.monotonic() - start < a.deadline_s:
        if present[:1] == [False]:
            break  # the session is gone: nothing will come
        with lock:
            all_in = all(t in got for t in want)
            quiet = time.monotonic() - last[0]
        # Everything expected came, and 3 s passed without more (duplicates
        # or stale values would come in that time too).
        if all_in and quiet > 3:
            break
        time.sleep(0.2)
    c.disconnect()
    c.loop_stop()
    with lock:
        received = sum(len(v) for v in got.values())
        missing = [t for t in want if t not in got]
        duplicates = [t for t in want if len(got.get(t, [])) > 1]
        stale = [t for t in want if any(v != want[t] for v in got.get(t, []))]
        deleted_seen = [t for t in deleted if t in got]
        unexpected = [t for t in got if t not in want and t not in deleted]
    s = {"mode": "mqtt-verify", "session_present": present[:1] == [True],
         "expected": len(want), "received": received, "missing": len(missing),
         "duplicates": len(duplicates), "stale": len(stale),
         "deleted_seen": len(deleted_seen), "unexpected": len(unexpected)}
    examples = ([f"missing {t}" for t in missing[:3]]
                + [f"{t}: {got[t][-3:]} (want {want[t]!r})" for t in (duplicates + stale)[:3]]
                + [f"deleted {t}: {got[t][-3:]}" for t in deleted_seen[:3]]
                + [f"unexpected {t}" for t in unexpected[:3]])
    finish(s, s["session_present"] and received == len(want) and not examples, examples)


if a.mode == "create":
    configs = create()
    finish({"mode": "create", "configs": configs}, configs == topic_config())
elif a.mode == "produce":
    produce()
elif a.mode == "verify":
    verify()
elif a.mode == "mqtt-subscribe":
    mqtt_subscribe()
else:
    mqtt_verify()
