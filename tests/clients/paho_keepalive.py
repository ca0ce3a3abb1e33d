#!/usr/bin/env python3
"""v5 server keep alive with paho-mqtt, against a broker whose maximum keep
alive is 5 s: a client asking 60 or 0 (none) is told ServerKeepAlive 5 in
CONNACK; one asking 3 gets no ServerKeepAlive property.
Usage: paho_keepalive.py HOST PORT. Exit 0 when that held."""
import sys
import threading

import paho.mqtt.client as mqtt

host, port = sys.argv[1], int(sys.argv[2])
seen = {}
for asked, want in [(60, 5), (0, 5), (3, None)]:
    connected = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ka-{asked}", protocol=mqtt.MQTTv5)

    def on_connect(client, userdata, flags, reason_code, properties, asked=asked):
        seen[asked] = (reason_code.value, getattr(properties, "ServerKeepAlive", None))
        connected.set()

    c.on_connect = on_connect
    c.connect(host, port, keepalive=asked)
    c.loop_start()
    if not connected.wait(10):
        sys.exit(f"keepalive {asked}: no CONNACK")
    c.disconnect()
    c.loop_stop()
    if seen[asked] != (0, want):
        sys.exit(f"keepalive {asked}: CONNACK (reason, ServerKeepAlive) {seen[asked]}, expected {(0, want)}")
print(f"asked keep alive -> (reason, ServerKeepAlive): {seen}")
