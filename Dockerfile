# The drp worker image used by docker-compose.temporal.yml.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc libpq-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN DRP_VENV=/opt/drp/venv bash scripts/bootstrap.sh
ENV PATH=/opt/drp/venv/bin:$PATH
RUN useradd --system --no-create-home postgres
CMD ["drp", "worker"]
