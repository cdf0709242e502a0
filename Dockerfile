# syntax=docker/dockerfile:1
# Build: docker build -t aihub .   Run: docker run -p 8000:8000 --env-file .env aihub

FROM python:3.11-slim AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir uv
WORKDIR /app
# Dependencies exactly as `requirements.lock` pins them (versions and hashes; regenerate it with
# `uv pip compile pyproject.toml --universal --generate-hashes --python-version 3.11 -o
# requirements.lock`), then the project itself, editable as `uv sync` installs it (the CLI finds
# alembic.ini and migrations/ beside src/).
RUN uv venv /app/.venv
COPY requirements.lock ./
RUN uv pip install --python /app/.venv/bin/python --require-hashes -r requirements.lock
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY src ./src
RUN uv pip install --python /app/.venv/bin/python --no-deps -e .

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 aihub
WORKDIR /app
COPY --from=build --chown=aihub:aihub /app /app
ENV PATH="/app/.venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data
RUN mkdir -p -m 700 /data && chown aihub:aihub /data
VOLUME ["/data"]
USER aihub
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8000\")}/api/ready')"
# `aihub serve` applies migrations, then serves.
CMD ["aihub", "serve"]
