"""A plain Flask hello-world, the baseline of ``benchmarks.challenge``: same route, same gunicorn config.

python -m gunicorn -c gunicorn.conf.py benchmarks.hello_app:app
"""

from flask import Flask

app = Flask("hello")


@app.route("/v1/chat/completions", methods=["GET", "POST"])
def hello() -> str:
    return "Hello, World!"


@app.get("/healthz")
def healthz() -> str:
    return "ok"
