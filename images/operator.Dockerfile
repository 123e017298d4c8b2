# kubelora operator: kopf + kubernetes client + the spec models; no torch (about 150 MB).
#   docker build -f images/operator.Dockerfile -t ghcr.io/kubelora/operator:0.1.0 .
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY trainer ./trainer
COPY operator ./operator
RUN pip install --no-cache-dir -c constraints.txt ".[operator]" \
    && useradd --uid 1000 --create-home kubelora
USER 1000
ENV PYTHONUNBUFFERED=1
EXPOSE 8080 9401
# liveness: GET :8080/healthz; Prometheus metrics: :9401/metrics
CMD ["python", "-m", "kubelora_operator"]
