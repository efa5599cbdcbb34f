FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY worker ./worker
COPY web ./web
RUN pip install --no-cache-dir -c constraints.txt .
USER nobody
