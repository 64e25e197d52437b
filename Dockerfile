# x402-tee-proxy image: gunicorn serving the proxy. Configure it with X402_* variables and
# REDIS_URL at run time (docker run --env-file ...); nothing secret is baked in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/x402-metrics X402_BIND=0.0.0.0:8402

RUN useradd --create-home --uid 10402 x402
WORKDIR /opt/x402-proxy
# editable install: migrations/ and contracts/ are found beside the package
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
COPY contracts ./contracts
COPY wsgi.py gunicorn.conf.py ./
RUN pip install --no-cache-dir -e . && mkdir -p /tmp/x402-metrics && chown x402 /tmp/x402-metrics

USER x402
EXPOSE 8402
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8402/healthz').status != 200)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
