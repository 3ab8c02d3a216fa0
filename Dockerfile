# One image for every modelcd service; compose.yaml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY modelcd modelcd
COPY events events
COPY ingest ingest
COPY serving serving
COPY shadow shadow
COPY retirement retirement
RUN pip install --no-cache-dir '.[all]'
ENV MODELCD_LOG_FORMAT=json MODELCD_HOME=/var/lib/modelcd
ENTRYPOINT ["modelcd"]
