# x402-tee-proxy image: gunicorn serving the proxy. Configure it with X402_* variables and
# REDIS_URL at run time (docker run --env-file ...); nothing secret is baked in.

# The wheel: the package, its catalog and migrations; no Solidity, no tests.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps . -w /dist

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/x402-metrics X402_BIND=0.0.0.0:8402

RUN useradd --create-home --uid 10402 x402
# The production lock, hash-checked (requirements/update re-pins it), then the wheel without resolving again.
COPY requirements/prod.lock /tmp/prod.lock
RUN pip install --no-cache-dir --require-hashes -r /tmp/prod.lock && rm /tmp/prod.lock
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-cache-dir --no-deps /tmp/dist/x402_tee_proxy-*.whl && rm -r /tmp/dist \
    && mkdir -p /tmp/x402-metrics && chown x402 /tmp/x402-metrics

USER x402
WORKDIR /home/x402
EXPOSE 8402
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8402/healthz').status != 200)"
# gunicorn -c python:app.gunicorn_conf app.wsgi:app, in place of the CLI (PID 1 gets the signals)
CMD ["x402-proxy", "serve"]
