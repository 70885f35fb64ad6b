# One image for every Python component (policy server, RM server, feedback service, consumer,
# trainer, simulator, web gateway); the command picks the component. Kafka, Prometheus and Grafana use their
# own images in deploy/docker-compose.yml and deploy/k8s/.
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml ./
COPY common ./common
COPY protos ./protos
COPY serve ./serve
COPY feedback ./feedback
COPY train ./train
COPY sim ./sim
COPY online ./online
COPY web ./web
COPY data ./data
RUN pip install --no-cache-dir -e . && python -m protos.build
# models and the model store are volumes (/app/models); nothing is downloaded at run time
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
EXPOSE 50051 50052 50061 8080 9101 9102 9103 9104
CMD ["python", "-m", "serve", "--help"]
