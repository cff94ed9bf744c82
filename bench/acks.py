#!/usr/bin/env python3
"""Single-ack throughput against a running server: creates an organization,
ingests THREADS*PER events in batches, then THREADS keep-alive clients ack
PER events each. Prints acks/s and the UPDATE statements the server ran.
  bench/acks.py PORT THREADS PER   (e.g. bench/acks.py 18393 16 200)"""
import http.client, json, sys, threading, time, urllib.request
port = int(sys.argv[1]); threads = int(sys.argv[2]); per = int(sys.argv[3])
def req(method, path, body=None, key=None, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port)
    h = {"Content-Type": "application/json"}
    if key: h["X-API-Key"] = key
    c.request(method, path, body=body, headers=h)
    r = c.getresponse(); data = r.read()
    return r.status, data
st, d = req("POST", "/api/keys/generate", json.dumps({"organization_name": "a", "tier": "enterprise"}))
key = json.loads(d)["api_key"]
ids = []
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(0, threads * per, 1000):
    st, d = req("POST", "/api/events/batch", json.dumps({"events": [{"type": "t", "payload": {"i": j}} for j in range(1000)]}), key, c)
    ids += [r["id"] for r in json.loads(d)["results"]]
ids = ids[:threads*per]
def work(k):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for id in ids[k*per:(k+1)*per]:
        st, _ = req("POST", "/api/ack/" + id, None, key, c)
        assert st == 200, st
t0 = time.time()
ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
dt = time.time() - t0
m = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port).read().decode()
b = sum(int(l.split()[-1]) for l in m.splitlines() if l.startswith("triggers_ack_batches_total"))
print("acks %d in %.2fs: %.0f acks/s, statements %d" % (threads*per, dt, threads*per/dt, b))
