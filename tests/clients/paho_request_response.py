#!/usr/bin/env python3
"""v5 request/response with paho-mqtt: a requester asking
RequestResponseInformation gets CONNACK ResponseInformation
`response/<client id>`, uses it as the base of its ResponseTopic, and the
responder's answer comes back there with the CorrelationData intact.
Usage: paho_request_response.py HOST PORT. Exit 0 when that held."""
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, port = sys.argv[1], int(sys.argv[2])
CORRELATION = b"\x00\x01corr\xff\xfe"


def client(name, connect_props=None):
    ready = threading.Event()
    info = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)

    def on_connect(client, userdata, flags, reason_code, properties):
        info["response"] = getattr(properties, "ResponseInformation", None)
        ready.set()

    c.on_connect = on_connect
    c.on_subscribe = lambda *a: info.setdefault("suback", threading.Event()).set()
    c.connect(host, port, keepalive=30, properties=connect_props)
    c.loop_start()
    if not ready.wait(10):
        sys.exit(f"{name}: no CONNACK")
    return c, info


def subscribe(c, info, topic_filter):
    info["suback"] = threading.Event()
    c.subscribe(topic_filter, qos=1)
    if not info["suback"].wait(10):
        sys.exit(f"no SUBACK for {topic_filter}")


# The responder answers every request on its ResponseTopic.
responder, rinfo = client("rr-responder")
if rinfo["response"] is not None:
    sys.exit(f"ResponseInformation {rinfo['response']!r} without asking")


def respond(client, userdata, msg):
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = msg.properties.CorrelationData
    client.publish(msg.properties.ResponseTopic, b"answer to " + msg.payload, qos=1, properties=props)


responder.on_message = respond
subscribe(responder, rinfo, "service/req")

asking = Properties(PacketTypes.CONNECT)
asking.RequestResponseInformation = 1
requester, info = client("rr-requester", asking)
if info["response"] != "response/rr-requester":
    sys.exit(f"CONNACK ResponseInformation {info['response']!r}")
reply_topic = f"{info['response']}/reply"
answers = []
answered = threading.Event()


def on_answer(client, userdata, msg):
    answers.append((msg.topic, msg.payload, msg.properties.CorrelationData))
    answered.set()


requester.on_message = on_answer
subscribe(requester, info, reply_topic)
props = Properties(PacketTypes.PUBLISH)
props.ResponseTopic = reply_topic
props.CorrelationData = CORRELATION
requester.publish("service/req", b"q1", qos=1, properties=props).wait_for_publish(10)
if not answered.wait(10):
    sys.exit("no answer on the response topic")
if answers != [(reply_topic, b"answer to q1", CORRELATION)]:
    sys.exit(f"answers {answers}")
print(f"request/response via {reply_topic}: correlation data intact")
