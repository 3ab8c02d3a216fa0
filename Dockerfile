# One image for every modelcd service; compose.yaml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY modelcd modelcd
COPY events events
COPY store store
COPY placement placement
COPY runtimes runtimes
COPY ingest ingest
COPY serving serving
COPY shadow shadow
COPY rollout rollout
COPY retirement retirement
COPY fleet fleet
COPY console console
RUN pip install --no-cache-dir '.[all]'
ENV MODELCD_LOG_FORMAT=json MODELCD_HOME=/var/lib/modelcd
ENTRYPOINT ["modelcd"]
