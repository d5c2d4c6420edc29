"""A fake AWS instance metadata endpoint for tests/e2e/batch.sh preempt.

GET /latest/meta-data/spot/instance-action answers 404 until the file FLAG
exists, then 200 with the instance-action JSON, as EC2 does two minutes
before it reclaims a spot instance. Listens on 127.0.0.1 on a free port,
written to PORTFILE once it accepts connections.

usage: fake_aws.py FLAG PORTFILE
"""
import http.server
import os
import sys

flag, portfile = sys.argv[1], sys.argv[2]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/latest/meta-data/spot/instance-action":
            code, body = 400, b"Bad Request"
        elif os.path.exists(flag):
            code, body = 200, b'{"action": "terminate", "time": "2026-11-28T21:00:00Z"}'
        else:
            code, body = 404, b"Not Found"
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if code == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
with open(portfile + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(portfile + ".tmp", portfile)
server.serve_forever()
