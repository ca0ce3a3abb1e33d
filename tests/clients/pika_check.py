#!/usr/bin/env python3
"""Publish through an AMQP 0-9-1 server with pika 1.x (PyPI `pika`, a client we
did not write), with publisher confirms on a BlockingConnection.

Usage:
  pika_check.py --host H --port P --exchange E --routing-key R --count N
                [--user U --password PW] [--vhost V] [--body-size B]
                [--expect-auth-failure | --mandatory-unroutable | --expect-nack]
                [--verify-url http://H:P]

Default mode: publish N persistent messages, each waited on until the server
confirms it (pika raises NackError on basic.nack), body {"n": i, "src": "pika"}
(or B pseudo-random non-UTF-8 bytes with --body-size), content_type
application/json, message_id pika-{i}, headers {"n": i, "client": "pika"},
timestamp = the run's start in whole seconds. Prints {"published": N}, exit 0.

--expect-auth-failure: connecting must fail with ProbableAuthenticationError
  or AuthenticationError (printed); exit 0 if so, 1 if the connection opens.
--mandatory-unroutable: publish N with mandatory=True to a destination that
  routes nowhere; each must come back (basic.return, then ack) as pika's
  UnroutableError. Exit 0 if all did.
--expect-nack: each of the N publishes must be nacked (NackError). Exit 0 if so.
--verify-url: after publishing, read the records back over Tributary's HTTP API
  (topic E, or R when E is ""; key R) and check body, key, headers and
  timestamp of every message this run sent.

Exit 1 (with the reason on stderr) on anything else.
"""
import argparse
import base64
import json
import random
import sys
import time
import urllib.error
import urllib.request

import pika
import pika.exceptions as px

SRC = "pika"


def fail(msg):
    print(f"pika_check: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--exchange", default="")
    p.add_argument("--routing-key", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    p.add_argument("--vhost", default="/")
    p.add_argument("--body-size", type=int, default=None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--expect-auth-failure", action="store_true")
    mode.add_argument("--mandatory-unroutable", action="store_true")
    mode.add_argument("--expect-nack", action="store_true")
    p.add_argument("--verify-url", default=None)
    return p.parse_args()


def body_for(i, size):
    if size is None:
        return json.dumps({"n": i, "src": SRC}).encode()
    # Deterministic per message; 0xff marks it as not UTF-8 (so not JSON).
    b = bytearray(random.Random(i).randbytes(size))
    if size:
        b[0] = 0xFF
    return bytes(b)


def connect(a):
    params = pika.ConnectionParameters(
        host=a.host,
        port=a.port,
        virtual_host=a.vhost,
        credentials=pika.PlainCredentials(a.user, a.password),
        connection_attempts=1,
        socket_timeout=10,
        stack_timeout=20,
        blocked_connection_timeout=30,
    )
    return pika.BlockingConnection(params)


def http_json(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def end_offsets(base, topic):
    t = http_json(f"{base}/v1/topics/{topic}")
    if t is None:
        return {}
    return {p["partition"]: p["end_offset"] for p in t["partitions"]}


def header(rec, name):
    h = rec.get("headers") or []
    if isinstance(h, dict):
        return h.get(name)
    for kv in h:
        if kv.get("key") == name:
            return kv.get("value")
    return None


def verify(a, topic, before, ts_seconds):
    """Reads every record appended after `before` and checks this run's."""
    base = a.verify_url.rstrip("/")
    after = end_offsets(base, topic)
    seen = {}
    for part, end in after.items():
        off = before.get(part, 0)
        while off < end:
            page = http_json(
                f"{base}/v1/topics/{topic}/partitions/{part}/records?offset={off}&limit=1000"
            )
            if not page or not page["records"]:
                break
            for rec in page["records"]:
                mid = header(rec, "amqp.message_id")
                if mid and mid.startswith(f"{SRC}-"):
                    seen[mid] = rec
            off = page["next_offset"]
    for i in range(a.count):
        rec = seen.get(f"{SRC}-{i}")
        if rec is None:
            fail(f"verify: message {SRC}-{i} not found in topic {topic} ({len(seen)} found)")
        key = rec.get("key")
        if key is not None and rec.get("encoding") == "base64":
            key = base64.b64decode(key).decode("utf-8", "replace")
        if key != a.routing_key:
            fail(f"verify: {SRC}-{i} key {key!r} != {a.routing_key!r}")
        if a.body_size is None:
            want = {"n": i, "src": SRC}
            if rec.get("value") != want:
                fail(f"verify: {SRC}-{i} value {rec.get('value')!r} != {want!r}")
        elif rec.get("encoding") != "base64":
            fail(f"verify: {SRC}-{i} binary body not fetched as base64: {rec!r:.300}")
        elif base64.b64decode(rec["value"]) != body_for(i, a.body_size):
            fail(f"verify: {SRC}-{i} body differs")
        if header(rec, "client") != SRC:
            fail(f"verify: {SRC}-{i} header client = {header(rec, 'client')!r}")
        if header(rec, "content-type") != "application/json":
            fail(f"verify: {SRC}-{i} header content-type = {header(rec, 'content-type')!r}")
        if rec.get("timestamp") != ts_seconds * 1000:
            fail(f"verify: {SRC}-{i} timestamp {rec.get('timestamp')} != {ts_seconds * 1000}")
    return len(seen)


def main():
    a = parse_args()
    topic = a.exchange or a.routing_key
    before = end_offsets(a.verify_url.rstrip("/"), topic) if a.verify_url else {}

    try:
        conn = connect(a)
    except (px.ProbableAuthenticationError, px.AuthenticationError) as e:
        if a.expect_auth_failure:
            print(json.dumps({"auth_failure": type(e).__name__, "detail": str(e)}))
            sys.exit(0)
        fail(f"authentication failed: {type(e).__name__}: {e}")
    except px.AMQPConnectionError as e:
        fail(f"connect failed: {type(e).__name__}: {e!r}")
    if a.expect_auth_failure:
        conn.close()
        fail("connection opened although authentication failure was expected")

    ch = conn.channel()
    ch.confirm_delivery()
    ts = int(time.time())
    published = returned = nacked = 0
    reply = None
    for i in range(a.count):
        props = pika.BasicProperties(
            content_type="application/json",
            message_id=f"{SRC}-{i}",
            headers={"n": i, "client": SRC},
            delivery_mode=2,
            timestamp=ts,
        )
        try:
            ch.basic_publish(
                a.exchange,
                a.routing_key,
                body_for(i, a.body_size),
                properties=props,
                mandatory=a.mandatory_unroutable,
            )
        except px.UnroutableError as e:
            if not a.mandatory_unroutable:
                fail(f"message {i} returned as unroutable: {e!r}")
            m = e.messages[0].method if e.messages else None
            reply = {"reply_code": getattr(m, "reply_code", None), "reply_text": getattr(m, "reply_text", None)}
            returned += 1
            continue
        except px.NackError as e:
            if not a.expect_nack:
                fail(f"message {i} was nacked: {e!r}")
            nacked += 1
            continue
        except px.AMQPError as e:
            fail(f"message {i}: {type(e).__name__}: {e!r}")
        if a.mandatory_unroutable:
            fail(f"message {i} was confirmed although it should be unroutable")
        if a.expect_nack:
            fail(f"message {i} was acked although a nack was expected")
        published += 1
    conn.close()

    if a.mandatory_unroutable:
        print(json.dumps({"unroutable": returned, **(reply or {})}))
    elif a.expect_nack:
        print(json.dumps({"nacked": nacked}))
    else:
        out = {"published": published}
        if a.verify_url:
            verify(a, topic, before, ts)
            out["verified"] = a.count
        print(json.dumps(out))


if __name__ == "__main__":
    # pika has no overall timeout: a server that never confirms would hang the
    # test run; die loudly instead.
    import signal
    signal.alarm(120)
    main()
